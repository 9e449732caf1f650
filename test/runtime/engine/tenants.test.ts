// The adapter store's layout refusal: a shrink group's A is one storage binding, so a group whose A
// for the engine's slots and rank exceeds the device's largest binding is refused at construction,
// naming the group and the sizes, before any buffer is made.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { planBase } from "../../../compiler/plan.ts";
import { randomCheckpointBase } from "../../../examples/random-checkpoint.ts";
import { AdapterStore, AdapterStoreError } from "../../../runtime/engine/tenants.ts";

const base = randomCheckpointBase({ hiddenSize: 64, layers: 1, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 97, seed: 1 });

test("a group's A beyond the device's largest storage binding is refused, naming the group", () => {
  const plan = planBase(base, { maxLoraRank: 8 });
  // q/k/v for 4 slots of rank 8 over 64 inputs: 3 regions of 32 rows of 64 f32s, 24576 bytes
  const device = { limits: { maxStorageBufferBindingSize: 24575 }, createBuffer: () => assert.unreachable("no buffer is made before the check") } as unknown as GPUDevice;
  assert.throws(
    () => new AdapterStore({ device, plan, slots: 4, checkpointDir: "/nonexistent" }),
    (e: unknown) => e instanceof AdapterStoreError && /q_proj\/k_proj\/v_proj for 4 adapter slots of rank 8 takes 24576 bytes, more than the device's largest storage binding \(24575\)/.test((e as Error).message),
  );
});

test.run();
