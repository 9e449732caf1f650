// How the engine tests drive one sequence and compare its logits with the float64 reference.
import * as assert from "uvu/assert";
import type { Engine } from "../../../runtime/engine/engine.ts";
import type { Sequence } from "../../../runtime/engine/sequence.ts";

/**
 * Prefills the sequence's prompt (the logits of every position), then decodes `steps` tokens greedily
 * one step at a time (each step's logits): `generated` is the tokens fed back, so the reference runs
 * over prompt + generated and gives one row per returned logits row.
 */
export async function runSequence(engine: Engine, seq: Sequence, steps: number): Promise<{ logits: Float32Array[]; generated: number[] }> {
  seq.logits = "all";
  const first = (await engine.prefill([seq])).get(seq)!;
  const logits = [...first.logits!];
  const generated = [first.token];
  seq.logits = "last";
  for (let i = 0; i < steps; i++) {
    seq.append([generated.at(-1)!]);
    const out = (await engine.decode([seq])).get(seq)!;
    logits.push(out.logits![0]!);
    generated.push(out.token);
  }
  return { logits, generated: generated.slice(0, steps) };
}

/** ||got - want|| / ||want|| over all rows (Frobenius norms). */
export function relativeError(got: readonly Float32Array[], want: readonly Float64Array[]): number {
  assert.is(got.length, want.length);
  let diff = 0;
  let norm = 0;
  want.forEach((row, r) => row.forEach((w, i) => ((diff += (got[r]![i]! - w) ** 2), (norm += w * w))));
  return Math.sqrt(diff / norm);
}
