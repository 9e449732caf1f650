// Text <-> token ids for a model directory, through Hugging Face's tokenizers.js reading the
// directory's own tokenizer.json and tokenizer_config.json (no network).
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { CheckpointError } from "./safetensors.ts";

export interface EncodeOptions {
  /** Put the beginning-of-sequence token first, if the tokenizer has one. */
  readonly addBos: boolean;
}

export class Tokenizer {
  private constructor(
    private readonly hf: HfTokenizer,
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
    return new Tokenizer(hf, idOf(config.bos_token), [...eos], template);
  }

  encode(text: string, options: EncodeOptions): number[] {
    const ids = this.hf.encode(text, { add_special_tokens: false }).ids;
    return options.addBos && this.bosId !== undefined ? [this.bosId, ...ids] : ids;
  }

  /** Text of `ids`, leaving out special tokens such as <s> and </s>. */
  decode(ids: readonly number[]): string {
    return this.hf.decode([...ids], { skip_special_tokens: true });
  }
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
