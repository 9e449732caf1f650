// `milora bench --random SIZE`: a random LLaMA checkpoint of a named size, with sizes changed by
// key=value pairs (`small,hidden=2048,layers=16`), written once under the cache directory.
import { join } from "node:path";
import { writeRandomCheckpoint, type RandomCheckpointOptions } from "../../examples/random-checkpoint.ts";
import { userError } from "../../runtime/errors.ts";
import { cacheDir } from "./calibration.ts";

/** tiny: bench/decode.ts's tiny model; small: the model of bench/milora.ts and bench/beam.ts (30M parameters). */
export const RANDOM_SIZES = {
  tiny: { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 512, maxPositions: 256, seed: 1 },
  small: { hiddenSize: 512, layers: 8, heads: 8, kvHeads: 4, intermediateSize: 1344, vocabSize: 4096, maxPositions: 256, seed: 3 },
} satisfies Record<string, RandomCheckpointOptions>;

const KEYS = {
  hidden: "hiddenSize",
  layers: "layers",
  heads: "heads",
  "kv-heads": "kvHeads",
  intermediate: "intermediateSize",
  vocab: "vocabSize",
  positions: "maxPositions",
  seed: "seed",
} as const satisfies Record<string, keyof RandomCheckpointOptions>;

/** The checkpoint options `text` names: a size of RANDOM_SIZES, then any `key=value` changes. */
export function randomModelOptions(text: string): RandomCheckpointOptions {
  const [name, ...changes] = text.split(",").map((s) => s.trim());
  const sizes = Object.keys(RANDOM_SIZES).join(", ");
  if (!(name! in RANDOM_SIZES)) throw userError("usage", `--random ${text}: the size must start with one of ${sizes}, e.g. small,hidden=2048,layers=16`);
  const options: Record<string, number> = { ...RANDOM_SIZES[name as keyof typeof RANDOM_SIZES] };
  for (const change of changes) {
    const [key, value, extra] = change.split("=");
    const field = KEYS[key as keyof typeof KEYS];
    const n = Number(value);
    if (field === undefined || extra !== undefined || value === undefined || value.trim() === "" || !Number.isInteger(n) || n < (key === "seed" ? 0 : 1)) {
      throw userError("usage", `--random ${text}: "${change}" must be KEY=N with a positive whole N and KEY one of ${Object.keys(KEYS).join(", ")}`);
    }
    options[field] = n;
  }
  if (options.hiddenSize! % options.heads! !== 0 || options.heads! % options.kvHeads! !== 0 || (options.hiddenSize! / options.heads!) % 2 !== 0) {
    throw userError("usage", `--random ${text}: hidden ${options.hiddenSize} must split into ${options.heads} heads of an even width, and heads into ${options.kvHeads} kv heads`);
  }
  return options as unknown as RandomCheckpointOptions;
}

/** Writes the checkpoint (once: an existing one of the same options is kept) and returns its directory. */
export function randomModelDir(options: RandomCheckpointOptions): string {
  const o = options as unknown as Record<string, number>;
  const dir = join(cacheDir(), "bench", Object.values(KEYS).map((k) => o[k]).join("-"));
  writeRandomCheckpoint(dir, options);
  return dir;
}

/** One line naming the model's sizes. */
export function modelSummary(o: { hiddenSize: number; layers: number; heads: number; kvHeads: number; intermediateSize: number; vocabSize: number }): string {
  return `hidden ${o.hiddenSize}, ${o.layers} layers, ${o.heads} heads / ${o.kvHeads} kv heads, intermediate ${o.intermediateSize}, vocab ${o.vocabSize}`;
}
