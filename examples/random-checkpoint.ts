// Writes tiny LLaMA-family checkpoints (llama, mistral, qwen2, gemma) with seeded random weights in the
// Hugging Face layout, each with its family's config.json keys, for tests,
// the README demo and benchmarks. Run it to make the `tiny` model of examples/llama-tiny.milora:
//   node --import tsx examples/random-checkpoint.ts models/tiny --preset tiny
import { mulberry32 } from "../runtime/random.ts";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";
import type { BaseModel } from "../compiler/model.ts";
import { INDEX_FILE, SINGLE_FILE } from "../runtime/formats/checkpoint.ts";
import { checkpointTensors } from "../compiler/families.ts";
import type { RopeScaling } from "../runtime/package/format.ts";
import { DTYPE_BYTES, SafetensorsFile, elementCount, writeSafetensors, type FloatDtype, type TensorToWrite } from "../runtime/formats/safetensors.ts";

/** The families a random checkpoint can have, with their transformers class and model_type. */
const FAMILY_CONFIG = {
  llama: { architectures: ["LlamaForCausalLM"], model_type: "llama" },
  mistral: { architectures: ["MistralForCausalLM"], model_type: "mistral" },
  qwen2: { architectures: ["Qwen2ForCausalLM"], model_type: "qwen2" },
  gemma: { architectures: ["GemmaForCausalLM"], model_type: "gemma" },
} as const;
export type RandomFamily = keyof typeof FAMILY_CONFIG;

export interface RandomCheckpointOptions {
  /** llama unless given. */
  readonly family?: RandomFamily;
  /** Mistral's sliding_window (mistral only). */
  readonly slidingWindow?: number;
  readonly hiddenSize: number;
  readonly layers: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly intermediateSize: number;
  readonly vocabSize: number;
  /** hiddenSize / heads unless given. */
  readonly headDim?: number;
  readonly maxPositions?: number;
  readonly ropeTheta?: number;
  /** Written as config.json's rope_scaling (with rope_type); a dynamic one's original context must be maxPositions. */
  readonly ropeScaling?: RopeScaling;
  readonly rmsNormEps?: number;
  readonly tieEmbeddings?: boolean;
  /** How the weights are stored; F32 unless given. */
  readonly dtype?: FloatDtype;
  /** Split the weights over this many files with an index; 1 (one model.safetensors) unless given. */
  readonly shards?: number;
  readonly seed: number;
  /** Also write a byte-level BPE tokenizer with exactly vocabSize tokens. */
  readonly tokenizer?: boolean;
}

/** The base of examples/llama-tiny.milora. */
export const PRESETS = {
  tiny: {
    hiddenSize: 64,
    layers: 2,
    heads: 4,
    kvHeads: 2,
    intermediateSize: 176,
    vocabSize: 512,
    maxPositions: 256,
    tokenizer: true,
    seed: 1,
  },
} satisfies Record<string, RandomCheckpointOptions>;

export { mulberry32 };

/** A seeded standard normal generator (Box-Muller over mulberry32). */
export function seededNormal(seed: number): () => number {
  const uniform = mulberry32(seed);
  return () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
}

/** The base model a set of options describes; `configPath` is where its config.json is (to be) written. */
export function randomCheckpointBase(o: RandomCheckpointOptions, configPath?: string): BaseModel {
  const headDim = o.headDim ?? o.hiddenSize / o.heads;
  const counts = { hiddenSize: o.hiddenSize, layers: o.layers, heads: o.heads, kvHeads: o.kvHeads, headDim, intermediateSize: o.intermediateSize, vocabSize: o.vocabSize };
  for (const [key, value] of Object.entries(counts)) {
    if (!Number.isInteger(value) || value < 1) throw new Error(`random checkpoint: ${key} must be a positive integer, got ${value}`);
  }
  if (o.heads % o.kvHeads !== 0) throw new Error(`random checkpoint: heads ${o.heads} is not a multiple of kvHeads ${o.kvHeads}`);
  if (headDim % 2 !== 0) throw new Error(`random checkpoint: head size ${headDim} must be even for rotary embeddings`);
  const s = o.ropeScaling;
  if (s?.type === "dynamic" && s.originalMaxPositions !== (o.maxPositions ?? 256))
    throw new Error(`random checkpoint: dynamic rope scaling scales from max_position_embeddings, so its original context must be maxPositions`);
  const at = { offset: 0, line: 1, column: 1 };
  return {
    name: configPath ? basename(dirname(resolve(configPath))) : "random",
    family: o.family ?? "llama",
    ...counts,
    ...(o.slidingWindow === undefined ? {} : { slidingWindow: o.slidingWindow }),
    ropeTheta: o.ropeTheta ?? 10000,
    ...(s === undefined ? {} : { ropeScaling: s }),
    rmsNormEps: o.rmsNormEps ?? 1e-6,
    maxPositions: o.maxPositions ?? 256,
    tieEmbeddings: o.tieEmbeddings ?? false,
    ...(configPath ? { configPath: resolve(configPath) } : {}),
    span: { file: configPath ?? "<random>", start: at, end: at },
  };
}

/** Seeded weights for every tensor of the base, in checkpoint order; scaled so a tiny model's logits differ. */
export function randomWeights(base: BaseModel, seed: number): { name: string; shape: number[]; data: Float32Array }[] {
  const normal = seededNormal(seed);
  return checkpointTensors(base).map(({ name, shape }) => {
    const data = new Float32Array(elementCount(shape));
    if (name.endsWith("norm.weight")) {
      // Norm gains near 1 but not equal to it, so a kernel that ignores them fails the reference test;
      // gemma stores gain - 1.
      const offset = base.family === "gemma" ? 0 : 1;
      for (let i = 0; i < data.length; i++) data[i] = offset + 0.1 * normal();
    } else if (name.endsWith(".bias")) {
      for (let i = 0; i < data.length; i++) data[i] = 0.5 * normal();
    } else {
      // Embeddings ~ N(0, 1); linear weights [out, in] ~ N(0, 1/in) keep activations O(1) layer to layer.
      const std = name === "model.embed_tokens.weight" ? 1 : 1 / Math.sqrt(shape[1]!);
      for (let i = 0; i < data.length; i++) data[i] = std * normal();
    }
    return { name, shape: [...shape], data };
  });
}

const DTYPE_TORCH_NAME: Record<FloatDtype, string> = { F32: "float32", F16: "float16", BF16: "bfloat16" };
const GENERATOR = "milora examples/random-checkpoint.ts";
const BOS_ID = 1;
const EOS_ID = 2;

/** A rope_scaling as config.json holds it (Llama 3.2's key order). */
function hfRopeScaling(s: RopeScaling): Record<string, unknown> {
  if (s.type !== "llama3") return { factor: s.factor, rope_type: s.type };
  return { factor: s.factor, high_freq_factor: s.highFreqFactor, low_freq_factor: s.lowFreqFactor, original_max_position_embeddings: s.originalMaxPositions, rope_type: "llama3" };
}

/** config.json as transformers writes it for the base's family (LlamaConfig and its relatives). */
function configJson(base: BaseModel, dtype: FloatDtype): Record<string, unknown> {
  const family = base.family as RandomFamily;
  const own: Record<RandomFamily, Record<string, unknown>> = {
    llama: { rope_scaling: null, attention_bias: false, mlp_bias: false, pretraining_tp: 1 },
    mistral: { sliding_window: base.slidingWindow ?? null },
    // Qwen2's window applies only with use_sliding_window, which its released checkpoints leave false.
    qwen2: { use_sliding_window: false, sliding_window: 4096, max_window_layers: base.layers },
    // GemmaConfig reads hidden_activation; its released configs also keep the older hidden_act "gelu".
    gemma: { hidden_act: "gelu", hidden_activation: "gelu_pytorch_tanh" },
  };
  return {
    ...FAMILY_CONFIG[family],
    ...own[family],
    hidden_size: base.hiddenSize,
    intermediate_size: base.intermediateSize,
    num_hidden_layers: base.layers,
    num_attention_heads: base.heads,
    num_key_value_heads: base.kvHeads,
    head_dim: base.headDim,
    ...(family === "gemma" ? {} : { hidden_act: "silu" }),
    max_position_embeddings: base.maxPositions,
    rms_norm_eps: base.rmsNormEps,
    rope_theta: base.ropeTheta,
    ...(base.ropeScaling === undefined ? {} : { rope_scaling: hfRopeScaling(base.ropeScaling) }),
    attention_dropout: 0.0,
    tie_word_embeddings: base.tieEmbeddings,
    vocab_size: base.vocabSize,
    bos_token_id: BOS_ID,
    eos_token_id: EOS_ID,
    initializer_range: 0.02,
    use_cache: true,
    torch_dtype: DTYPE_TORCH_NAME[dtype],
  };
}

/**
 * Writes a random checkpoint to `dir`: config.json, weights (one file or `shards` files plus an index),
 * and optionally a tokenizer. The same options give the same bytes. Nothing is written if `dir` already
 * holds a checkpoint made with the same options; a different one this script made is replaced. The
 * directory appears whole or not at all (written beside it, then renamed).
 */
export function writeRandomCheckpoint(dir: string, o: RandomCheckpointOptions): void {
  // Top-level keys sorted (an array replacer would also drop the fields of a nested ropeScaling).
  const key = JSON.stringify(Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : 1))));
  if (existsSync(dir)) {
    const made = generatorOptions(dir);
    if (made === key) return;
    if (made === undefined) throw new Error(`${dir} exists and was not written by ${GENERATOR}; refusing to replace it`);
  }
  const temp = `${resolve(dir)}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  mkdirSync(temp, { recursive: true });
  try {
    fillCheckpointDir(temp, o, key);
    rmSync(dir, { recursive: true, force: true });
    renameSync(temp, dir);
  } catch (e) {
    rmSync(temp, { recursive: true, force: true });
    // Another process may have written the same checkpoint first.
    if (generatorOptions(dir) !== key) throw e;
  }
}

function fillCheckpointDir(dir: string, o: RandomCheckpointOptions, key: string): void {
  const base = randomCheckpointBase(o, join(dir, "config.json"));
  const dtype = o.dtype ?? "F32";
  writeFileSync(join(dir, "config.json"), JSON.stringify(configJson(base, dtype), null, 2) + "\n");
  const tensors: TensorToWrite[] = randomWeights(base, o.seed).map((t) => ({ ...t, dtype }));
  const metadata = { format: "pt", generator: GENERATOR, options: key };
  const shards = o.shards ?? 1;
  if (shards === 1) {
    writeSafetensors(join(dir, SINGLE_FILE), tensors, metadata);
  } else {
    const groups = splitEvenly(tensors, shards);
    const weightMap: Record<string, string> = {};
    groups.forEach((group, i) => {
      const file = shardFileName(i, shards);
      writeSafetensors(join(dir, file), group, metadata);
      for (const t of group) weightMap[t.name] = file;
    });
    const totalSize = tensors.reduce((n, t) => n + t.data.length * DTYPE_BYTES[dtype], 0);
    writeFileSync(join(dir, INDEX_FILE), JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2) + "\n");
  }
  if (o.tokenizer) writeTokenizerFiles(dir, base);
}

function shardFileName(index: number, count: number): string {
  const pad = (n: number) => String(n).padStart(5, "0");
  return `model-${pad(index + 1)}-of-${pad(count)}.safetensors`;
}

/** `count` consecutive groups of nearly equal tensor counts, none empty. */
function splitEvenly(tensors: TensorToWrite[], count: number): TensorToWrite[][] {
  if (!Number.isInteger(count) || count < 1 || count > tensors.length) {
    throw new Error(`random checkpoint: shards must be between 1 and ${tensors.length}, got ${count}`);
  }
  const groups: TensorToWrite[][] = Array.from({ length: count }, () => []);
  tensors.forEach((t, i) => groups[Math.floor((i * count) / tensors.length)]!.push(t));
  return groups;
}

/** The options a directory was generated with, or undefined if this script did not write it. */
function generatorOptions(dir: string): string | undefined {
  const weights = [join(dir, SINGLE_FILE), join(dir, shardFileName(0, indexShardCount(dir)))];
  const file = weights.find((p) => existsSync(p));
  if (!file) return undefined;
  try {
    const st = SafetensorsFile.open(file);
    st.close();
    return st.metadata.generator === GENERATOR ? st.metadata.options : undefined;
  } catch {
    return undefined;
  }
}

function indexShardCount(dir: string): number {
  try {
    const index = JSON.parse(readFileSync(join(dir, INDEX_FILE), "utf8")) as { weight_map: Record<string, string> };
    return new Set(Object.values(index.weight_map)).size;
  } catch {
    return 1;
  }
}

// ---- tokenizer: byte-level BPE with merges learnt from a short English text ----

const SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"];
const MERGE_CORPUS = `hello world. hello there, how are you today? I am fine, thank you. the model reads the
prompt and the router picks the experts for every layer of the network. this is a tiny model with random
weights, so what it says means nothing, but the tokens it writes are real words and pieces of words. once
upon a time there was a small language model that wanted to learn how to write stories about the sea, the
sun and the stars. she said that they would come back in the morning and we went home together. what
would you like to know about the weather in the city? please answer the question in one short sentence.`;

/** GPT-2's reversible map from bytes to printable characters, so every byte is a visible token. */
function byteToChar(): string[] {
  const table: string[] = [];
  let next = 256;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    table.push(String.fromCodePoint(printable ? b : next++));
  }
  return table;
}

/** Merges learnt greedily from MERGE_CORPUS until `count`, then letter pairs if the corpus runs dry. */
function learnMerges(count: number, chars: string[]): [string, string][] {
  const words = new Map<string, number>();
  for (const w of MERGE_CORPUS.match(/ ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+/g) ?? []) {
    const mapped = [...Buffer.from(w, "utf8")].map((b) => chars[b]!).join("\u0000");
    words.set(mapped, (words.get(mapped) ?? 0) + 1);
  }
  let pieces = [...words].map(([w, n]) => ({ parts: w.split("\u0000"), n }));
  const merges: [string, string][] = [];
  const known = new Set(chars);
  while (merges.length < count) {
    const pairs = new Map<string, number>();
    for (const { parts, n } of pieces) {
      for (let i = 0; i + 1 < parts.length; i++) {
        const k = `${parts[i]}\u0000${parts[i + 1]}`;
        pairs.set(k, (pairs.get(k) ?? 0) + n);
      }
    }
    // Most frequent first; ties by text so the merges are the same on every run.
    const best = [...pairs].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))[0];
    if (!best) break;
    const [left, right] = best[0].split("\u0000") as [string, string];
    merges.push([left, right]);
    known.add(left + right);
    pieces = pieces.map(({ parts, n }) => ({ parts: mergePair(parts, left, right), n }));
  }
  const letters = "etaoinshrdlcumwfgypbvkjxqz";
  for (const a of letters) {
    for (const b of letters) {
      if (merges.length >= count) return merges;
      if (!known.has(a + b)) {
        merges.push([a, b]);
        known.add(a + b);
      }
    }
  }
  return merges;
}

function mergePair(parts: string[], left: string, right: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < parts.length; i++) {
    if (parts[i] === left && parts[i + 1] === right) {
      out.push(left + right);
      i++;
    } else out.push(parts[i]!);
  }
  return out;
}

/** tokenizer.json and tokenizer_config.json for a byte-level BPE of exactly base.vocabSize tokens. */
export function tinyTokenizerFiles(vocabSize: number, maxPositions: number): { tokenizer: object; config: object } {
  const chars = byteToChar();
  const fixed = SPECIAL_TOKENS.length + chars.length;
  if (vocabSize < fixed) throw new Error(`random checkpoint: a tokenizer needs vocabSize >= ${fixed}, got ${vocabSize}`);
  const merges = learnMerges(vocabSize - fixed, chars);
  if (merges.length !== vocabSize - fixed) throw new Error(`random checkpoint: vocabSize ${vocabSize} is too large for the tiny tokenizer`);
  const vocab: Record<string, number> = {};
  [...SPECIAL_TOKENS, ...chars, ...merges.map(([a, b]) => a + b)].forEach((t, id) => (vocab[t] = id));
  const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
  const bos = { SpecialToken: { id: "<s>", type_id: 0 } };
  const tokenizer = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: SPECIAL_TOKENS.map((content, id) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })),
    normalizer: null,
    pre_tokenizer: byteLevel,
    // Like LLaMA's own tokenizer.json: encoding with special tokens puts <s> first.
    post_processor: {
      type: "TemplateProcessing",
      single: [bos, { Sequence: { id: "A", type_id: 0 } }],
      pair: [bos, { Sequence: { id: "A", type_id: 0 } }, bos, { Sequence: { id: "B", type_id: 1 } }],
      special_tokens: { "<s>": { id: "<s>", ids: [BOS_ID], tokens: ["<s>"] } },
    },
    decoder: byteLevel,
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: merges.map(([a, b]) => `${a} ${b}`),
    },
  };
  const config = {
    tokenizer_class: "PreTrainedTokenizerFast",
    add_bos_token: true,
    add_eos_token: false,
    bos_token: "<s>",
    eos_token: "</s>",
    unk_token: "<unk>",
    model_max_length: maxPositions,
    clean_up_tokenization_spaces: false,
    chat_template:
      "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
  };
  return { tokenizer, config };
}

/** tokenizer.json, tokenizer_config.json and generation_config.json, as a hub repository ships them. */
function writeTokenizerFiles(dir: string, base: BaseModel): void {
  const { tokenizer, config } = tinyTokenizerFiles(base.vocabSize, base.maxPositions);
  writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tokenizer) + "\n");
  writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(config, null, 2) + "\n");
  const generation = { _from_model_config: true, bos_token_id: BOS_ID, eos_token_id: EOS_ID, transformers_version: "4.46.0" };
  writeFileSync(join(dir, "generation_config.json"), JSON.stringify(generation, null, 2) + "\n");
}

function main(argv: string[]): number {
  const usage = "usage: random-checkpoint.ts OUT_DIR [--preset tiny] [--seed N] [--dtype F32|F16|BF16] [--shards N]";
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { preset: { type: "string", default: "tiny" }, seed: { type: "string" }, dtype: { type: "string" }, shards: { type: "string" } },
    });
  } catch (e) {
    console.error(`${(e as Error).message}\n${usage}`);
    return 2;
  }
  const { values, positionals } = parsed;
  const preset = PRESETS[values.preset as keyof typeof PRESETS];
  if (positionals.length !== 1 || !preset) {
    console.error(`${preset ? "" : `unknown preset ${values.preset} (known: ${Object.keys(PRESETS).join(", ")})\n`}${usage}`);
    return 2;
  }
  if (values.seed !== undefined && !Number.isSafeInteger(Number(values.seed))) {
    console.error(`--seed must be an integer\n${usage}`);
    return 2;
  }
  if (values.dtype !== undefined && !["F32", "F16", "BF16"].includes(values.dtype)) {
    console.error(`--dtype must be F32, F16 or BF16\n${usage}`);
    return 2;
  }
  const options: RandomCheckpointOptions = {
    ...preset,
    ...(values.seed !== undefined ? { seed: Number(values.seed) } : {}),
    ...(values.dtype !== undefined ? { dtype: values.dtype as FloatDtype } : {}),
    ...(values.shards !== undefined ? { shards: Number(values.shards) } : {}),
  };
  const dir = positionals[0]!;
  try {
    writeRandomCheckpoint(dir, options);
  } catch (e) {
    console.error((e as Error).message);
    return 1;
  }
  console.log(`${dir}: random ${values.preset} checkpoint (seed ${options.seed})`);
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  process.exitCode = main(process.argv.slice(2));
}
