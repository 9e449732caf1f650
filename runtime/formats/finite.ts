// NaN and infinity in weights: refused at load, naming the tensor and the first bad element, because a
// single one turns every logit into NaN and the sampler then answers token 0 forever.
import { CheckpointError } from "./safetensors.ts";

/** Index of the first NaN or infinite element, or -1. Reads the bits: an all-ones exponent is either. */
export function firstNonFinite(data: Float32Array): number {
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  for (let i = 0; i < bits.length; i++) if ((bits[i]! & 0x7f800000) === 0x7f800000) return i;
  return -1;
}

/** Throws a CheckpointError naming `where`, the tensor, its shape and the first bad element's index. */
export function assertFinite(data: Float32Array, where: string, tensor: string, shape: readonly number[]): void {
  const at = firstNonFinite(data);
  if (at < 0) return;
  const index: number[] = [];
  let rest = at;
  for (let d = shape.length - 1; d >= 0; d--) {
    index.unshift(rest % shape[d]!);
    rest = Math.floor(rest / shape[d]!);
  }
  throw new CheckpointError(
    `${where}: tensor "${tensor}" [${shape.join(", ")}] holds ${data[at]} at [${index.join(", ")}]; ` +
      "weights must be finite (a NaN or infinity makes every logit NaN)",
  );
}
