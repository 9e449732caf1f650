// DoRA's factors (Liu et al. 2024, as Hugging Face PEFT computes them): a DoRA module's output is
// d * (W x + s B A x) with d = m / ||W + s B A||_row, the norm over each output row (PEFT's dim=1 for a
// Linear) and, as in PEFT, a constant of the weights rather than of the input. The engine computes d
// once per adapter and module when the adapter is loaded, on the CPU in float64, from the checkpoint's
// values of W (F32, F16 or BF16 read as f32), not from their f16 or q8 copy on the GPU: d is the trained
// adapter's own factor, and the GPU applies it to whatever W it holds (docs/formats.md, "DoRA").
import type { ExpertModule } from "../../compiler/model.ts";
import type { Plan } from "../package/format.ts";
import { loraKey, type LoadedAdapter, type LoraKey, type LoraWeights } from "../formats/adapter.ts";
import { openCheckpoint } from "../formats/checkpoint.ts";
import { userError } from "../errors.ts";

/** ||W[o] + s (B A)[o]||_2 for every output row o, accumulated in float64; W is [out, in] row-major. */
export function loraRowNorms(w: Float32Array, lora: Pick<LoraWeights, "a" | "b" | "rank" | "scaling">): Float64Array {
  const { a, b, rank, scaling } = lora;
  const inF = a.length / rank;
  const out = w.length / inF;
  if (!Number.isInteger(inF) || !Number.isInteger(out) || b.length !== out * rank) {
    throw new Error(`DoRA norms: W has ${w.length} values, A [${rank}, ${a.length / rank}], B ${b.length} values: shapes do not agree`);
  }
  const norms = new Float64Array(out);
  const row = new Float64Array(inF);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inF; i++) row[i] = w[o * inF + i]!;
    for (let j = 0; j < rank; j++) {
      const c = scaling * b[o * rank + j]!;
      if (c === 0) continue;
      for (let i = 0; i < inF; i++) row[i]! += c * a[j * inF + i]!;
    }
    let sum = 0;
    for (let i = 0; i < inF; i++) sum += row[i]! * row[i]!;
    norms[o] = Math.sqrt(sum);
  }
  return norms;
}

/**
 * d = m / ||W + s B A||_row of one module, rounded to f32 once. `where` names the module in the error a
 * zero row norm gives (d would be infinite; PEFT would produce inf or NaN there).
 */
export function doraFactors(w: Float32Array, lora: LoraWeights, where: string): Float32Array {
  const m = lora.magnitude;
  if (!m) throw new Error(`${where}: not a DoRA module (no magnitude)`);
  const norms = loraRowNorms(w, lora);
  if (m.length !== norms.length) throw new Error(`${where}: magnitude has ${m.length} values for ${norms.length} output rows`);
  const zero = norms.findIndex((n) => n === 0);
  if (zero >= 0) throw userError("adapter", `${where}: output row ${zero} of W + scaling * B A is all zeros, so DoRA's factor m / ||W + scaling * B A|| is undefined there`);
  return Float32Array.from(norms, (n, o) => m[o]! / n);
}

/**
 * The factors of every DoRA module of `adapter`, by module key, from the base weights in the checkpoint
 * directory `checkpointDir` (the one the engine was loaded from; tensor names from the plan). Empty for
 * an adapter without DoRA, which reads nothing.
 */
export function adapterDoraFactors(adapter: LoadedAdapter, plan: Plan<ExpertModule>, checkpointDir: string): Map<LoraKey, Float32Array> {
  const factors = new Map<LoraKey, Float32Array>();
  const modules = adapter.spec.experts.filter((e) => e.dora);
  if (modules.length === 0) return factors;
  const checkpoint = openCheckpoint(checkpointDir);
  try {
    for (const { layer, module } of modules) {
      const tensor = plan.tensors.find((t) => t.role === "linear" && t.layer === layer && t.module === module);
      if (tensor === undefined) throw new Error(`the plan has no linear weight for layer ${layer} ${module}`);
      const key = loraKey(layer, module);
      const w = checkpoint.readF32(tensor.name, tensor.shape);
      factors.set(key, doraFactors(w, adapter.lora.get(key)!, `adapter ${adapter.name}, layer ${layer} ${module}`));
    }
  } finally {
    checkpoint.close();
  }
  return factors;
}
