// Training reads the frozen base as f32 only: a plan storing it as f16 or q8 is refused by the
// training graph, naming a tensor and the format, before anything is allocated.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES } from "../../../compiler/model.ts";
import { planBase } from "../../../compiler/plan.ts";
import { trainKernelResolver } from "../../../compiler/train-kernels.ts";
import { peftSpec, randomAdapter } from "../../../examples/random-adapter.ts";
import { randomCheckpointBase, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { MiloraError } from "../../../runtime/errors.ts";
import { openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { PipelineCache } from "../../../runtime/gpu/kernel-runner.ts";
import { TrainingGraph } from "../../../runtime/training/graph.ts";
import { TrainableParams } from "../../../runtime/training/params.ts";
import { uploadWeights } from "../../../runtime/engine/weights.ts";

const MODEL = { hiddenSize: 32, layers: 1, heads: 2, kvHeads: 1, intermediateSize: 48, vocabSize: 40, maxPositions: 16, seed: 3 };

test("a base stored as f16 or q8 is refused for training; f32 builds", async () => {
  const root = mkdtempSync(join(tmpdir(), "milora-train-weights-"));
  const gpu = await acquireDevice();
  try {
    const dir = join(root, "tiny");
    writeRandomCheckpoint(dir, MODEL);
    const base = randomCheckpointBase(MODEL);
    const adapter = randomAdapter({ spec: peftSpec({ base, modules: EXPERT_MODULES, rank: 2, alpha: 4, seed: 1 }), seed: 2 });
    for (const weights of ["f16", "q8", "f32"] as const) {
      const plan = planBase(base, { maxLoraRank: 2, weights });
      const checkpoint = openCheckpoint(dir);
      const uploaded = await uploadWeights(gpu.device, checkpoint, plan, plan.maxBindingBytes);
      checkpoint.close();
      const params = new TrainableParams(gpu.device, adapter);
      const build = () => new TrainingGraph({ device: gpu.device, plan, weights: uploaded, params, kernel: trainKernelResolver(), pipelines: new PipelineCache(gpu.device), maxRows: 8 });
      try {
        if (weights === "f32") build();
        else {
          assert.throws(build, (e: Error) => e instanceof MiloraError && e.kind === "unsupported" && e.message.includes(`stores "model.layers.0.self_attn.q_proj.weight" as ${weights}`));
        }
      } finally {
        uploaded.destroy();
        params.destroy();
      }
    }
  } finally {
    gpu.destroy();
    rmSync(root, { recursive: true, force: true });
  }
});

test.run();
