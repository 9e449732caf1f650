// Text <-> token ids for a model directory, through Hugging Face's tokenizers.js reading the
// directory's own tokenizer.json and tokenizer_config.json (no network). Long texts can be encoded on
// a worker thread (encodeAsync), so that a server's event loop keeps streaming meanwhile.
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { Worker } from "node:worker_threads";
import { CheckpointError } from "../formats/safetensors.ts";
import { tsWorker } from "../ts-worker.ts";

/**
 * Texts up to this many UTF-8 bytes are encoded on the calling thread by encodeAsync: tokenizers.js
 * encodes well over 1 MB/s on the tokenizers milora reads, so this is a few milliseconds at most;
 * longer texts go to the worker thread.
 */
export const INLINE_ENCODE_BYTES = 8 * 1024;

export interface EncodeOptions {
  /** Put the beginning-of-sequence token first, if the tokenizer has one. */
  readonly addBos: boolean;
}

export class Tokenizer {
  #worker: Worker | undefined;
  #pending = new Map<number, { resolve: (ids: number[]) => void; reject: (e: Error) => void }>();
  #nextJob = 0;

  private constructor(
    private readonly hf: HfTokenizer,
    /** The model directory it was read from (the worker reads it again). */
    readonly dir: string,
    /**
     * At most this many UTF-8 bytes of input make one token, so a text of more than ctx x this many
     * bytes cannot fit in ctx positions; it is checked before encoding (see maxBytesPerToken()).
     */
    readonly maxBytesPerToken: number,
    readonly bosId: number | undefined,
    /** Tokens that end generation: tokenizer_config's eos_token and generation_config's eos_token_id. */
    readonly eosIds: readonly number[],
    /** The Jinja chat template from tokenizer_config.json, if it has one. */
    readonly chatTemplate: string | undefined,
  ) {}

  /** The tokenizer of a model directory, or undefined if it has no tokenizer.json. */
  static async load(dir: string): Promise<Tokenizer | undefined> {
    if (!existsSync(join(dir, "tokenizer.json"))) return undefined;
    const json = readJson(dir, "tokenizer.json");
    const config = existsSync(join(dir, "tokenizer_config.json")) ? readJson(dir, "tokenizer_config.json") : {};
    let hf: HfTokenizer;
    try {
      hf = new HfTokenizer(json, config);
    } catch (e) {
      throw new CheckpointError(`${join(dir, "tokenizer.json")}: not a tokenizer this library reads (${(e as Error).message})`);
    }
    const idOf = (token: unknown): number | undefined => {
      const text = typeof token === "object" && token !== null ? (token as { content?: unknown }).content : token;
      return typeof text === "string" ? hf.token_to_id(text) : undefined;
    };
    const eos = new Set<number>();
    const configEos = idOf(config.eos_token);
    if (configEos !== undefined) eos.add(configEos);
    if (existsSync(join(dir, "generation_config.json"))) {
      const ids = readJson(dir, "generation_config.json").eos_token_id;
      for (const id of [ids].flat()) if (typeof id === "number") eos.add(id);
    }
    const template = typeof config.chat_template === "string" ? config.chat_template : undefined;
    return new Tokenizer(hf, dir, maxBytesPerToken(json), idOf(config.bos_token), [...eos], template);
  }

  encode(text: string, options: EncodeOptions): number[] {
    const ids = this.hf.encode(text, { add_special_tokens: false }).ids;
    return options.addBos && this.bosId !== undefined ? [this.bosId, ...ids] : ids;
  }

  /**
   * encode(), off the calling thread for texts over INLINE_ENCODE_BYTES: on one worker thread, started
   * at the first such text and kept (unreferenced, so it never holds the process open) until close().
   */
  encodeAsync(text: string, options: EncodeOptions): Promise<number[]> {
    if (Buffer.byteLength(text) <= INLINE_ENCODE_BYTES) return Promise.resolve(this.encode(text, options));
    const worker = this.#startWorker();
    const id = this.#nextJob++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      worker.postMessage({ id, text, addBos: options.addBos });
    });
  }

  /** Stops the worker thread, if one runs; encodes waiting on it fail. */
  close(): void {
    const worker = this.#worker;
    this.#worker = undefined;
    if (!worker) return;
    void worker.terminate();
    this.#failPending(new Error("the tokenizer was closed"));
  }

  #startWorker(): Worker {
    if (this.#worker) return this.#worker;
    const worker = tsWorker(new URL("./tokenize-worker.ts", import.meta.url), { workerData: { dir: this.dir } });
    worker.unref();
    worker.on("message", (m: { id: number; ids?: number[]; error?: string }) => {
      const job = this.#pending.get(m.id);
      this.#pending.delete(m.id);
      if (m.ids) job?.resolve(m.ids);
      else job?.reject(new Error(m.error ?? "the tokenizer worker gave no answer"));
    });
    worker.once("error", (e: Error) => this.#lost(worker, e));
    worker.once("exit", (code) => this.#lost(worker, new Error(`the tokenizer worker exited with code ${code}`)));
    this.#worker = worker;
    return worker;
  }

  /** A worker that died fails its jobs; the next long text starts a new one. */
  #lost(worker: Worker, e: Error): void {
    if (this.#worker !== worker) return;
    this.#worker = undefined;
    this.#failPending(e);
  }

  #failPending(e: Error): void {
    const jobs = [...this.#pending.values()];
    this.#pending.clear();
    for (const job of jobs) job.reject(e);
  }

  /** Text of `ids`, leaving out special tokens such as <s> and </s>. */
  decode(ids: readonly number[]): string {
    return this.hf.decode([...ids], { skip_special_tokens: true });
  }
}

/**
 * A bound on the UTF-8 bytes of input one token covers: twice the longest vocabulary entry's UTF-8
 * length (at least 4). Why it holds for the BPE tokenizers milora reads: a byte-level BPE token's
 * string has one character, of 1 or 2 UTF-8 bytes, per input byte; a SentencePiece-style token writes
 * a space as the 3-byte "\u2581" and a fallback byte as the 6-byte "<0xNN>"; so a token's string is at
 * least as long as the input it covers. The factor 2 covers normalisers that shorten text (NFKC maps
 * a few 3-byte characters to 2-byte ones). Only a normaliser that deletes input (stripping) breaks the
 * bound, and then a prompt that long was mostly deleted anyway.
 */
function maxBytesPerToken(json: Record<string, unknown>): number {
  let longest = 1;
  const see = (token: unknown) => {
    if (typeof token === "string") longest = Math.max(longest, Buffer.byteLength(token));
  };
  const vocab = (json.model as { vocab?: unknown } | undefined)?.vocab;
  if (Array.isArray(vocab)) for (const entry of vocab) see(Array.isArray(entry) ? entry[0] : entry);
  else if (typeof vocab === "object" && vocab !== null) for (const token of Object.keys(vocab)) see(token);
  if (Array.isArray(json.added_tokens)) for (const t of json.added_tokens) see((t as { content?: unknown } | null)?.content);
  return Math.max(4, 2 * longest);
}

function readJson(dir: string, file: string): Record<string, unknown> {
  const path = join(dir, file);
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new CheckpointError(`${path}: cannot read as JSON (${(e as Error).message})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw new CheckpointError(`${path}: not a JSON object`);
  return value as Record<string, unknown>;
}
