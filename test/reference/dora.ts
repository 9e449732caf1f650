// DoRA's weight in float64, from its definition (Liu et al. 2024, eq. 5, with PEFT's row-wise norm of a
// Linear's [out, in] weight): W' = m * V / ||V||_row, V = W + scaling * B A. A module's change of the base
// weight, W' - W, is what a MiLoRA gate scales (docs/formats.md, "DoRA").
import type { ExpertModule } from "../../compiler/model.ts";
import type { LoraWeights } from "../../runtime/formats/adapter.ts";
import { hfModuleName, type ReferenceWeights } from "./llama.ts";

/** m * V / ||V||_row - W for one module, [out, in] row-major; `lora.magnitude` is m. */
export function doraWeightChange(weights: ReferenceWeights, layer: number, module: ExpertModule, lora: LoraWeights): Float64Array {
  const m = lora.magnitude;
  if (!m) throw new Error(`reference: layer ${layer} ${module} is not DoRA`);
  const w = weights.get(`${hfModuleName(layer, module)}.weight`);
  const out = m.length;
  const inF = w.length / out;
  const change = new Float64Array(w.length);
  for (let o = 0; o < out; o++) {
    const v = new Float64Array(inF);
    for (let i = 0; i < inF; i++) {
      let ba = 0;
      for (let j = 0; j < lora.rank; j++) ba += lora.b[o * lora.rank + j]! * lora.a[j * inF + i]!;
      v[i] = w[o * inF + i]! + lora.scaling * ba;
    }
    const norm = Math.sqrt(v.reduce((sum, x) => sum + x * x, 0));
    for (let i = 0; i < inF; i++) change[o * inF + i] = (m[o]! * v[i]!) / norm - w[o * inF + i]!;
  }
  return change;
}
