// `milora serve` with a per-token baseline among its tenants: a MixLoRA adapter directory given at start
// (its MIXLORA config plans the engine's feed-forward passes) served beside a plain PEFT adapter and
// the base, concurrent requests batched together, each answer the float64 reference's greedy tokens.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { join } from "node:path";
import { readHfConfig } from "../../../../compiler/hf-config.ts";
import { adapterSpecFromPeft, loadAdapter } from "../../../../runtime/formats/adapter.ts";
import { peftSpec, writeRandomAdapter } from "../../../../examples/random-adapter.ts";
import { argmax, loadReferenceWeights, referenceLogits } from "../../../reference/llama.ts";
import { referenceMiloraLogits } from "../../../reference/milora.ts";
import { referenceMoeGreedy } from "../../../reference/moe-lora.ts";
import { MODEL, startFixture, type Fixture } from "./fixture.ts";
import type { Adapter } from "../../../../compiler/model.ts";

let f: Fixture;
let checkpoint = "";

test.before(async () => {
  f = await startFixture({
    adapterNames: ["plain"],
    fromCheckpoint: (dir) => {
      checkpoint = dir;
      const base = readHfConfig(dir);
      const spec: Adapter = {
        ...peftSpec({ base, modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank: 4, alpha: 8, seed: 0, name: "mix" }),
        moe: { placement: "per_ffn", experts: 4, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 },
      };
      const mixDir = join(dir, "..", "adapters", "mix");
      writeRandomAdapter(mixDir, { spec, seed: 7 });
      return { adapters: [["plain", join(dir, "..", "adapters", "plain")], ["mix", mixDir]] };
    },
  });
});
test.after(() => f.close());

test("a MixLoRA tenant, a plain LoRA tenant and the base in one batch: each answers as the reference", async () => {
  const prompt = [1, 40, 41, 42, 7, 9];
  const ask = (model: string) => f.client.completions.create({ model, prompt, max_tokens: 4, temperature: 0 }) as Promise<unknown> as Promise<{ milora: { token_ids: number[] } }>;
  const [mix, plain, base] = await Promise.all([ask("mix"), ask("plain"), ask(MODEL)]);
  const ref = loadReferenceWeights(checkpoint);
  const baseModel = readHfConfig(checkpoint);
  const mixAdapter = loadAdapter(join(f.root, "adapters", "mix"), { name: "mix", base: baseModel });
  assert.is(adapterSpecFromPeft(join(f.root, "adapters", "mix"), baseModel, "mix").moe?.placement, "per_ffn");
  const greedy = (logitsOf: (tokens: number[]) => Float64Array[]) => {
    const tokens = [...prompt];
    for (let i = 0; i < 4; i++) tokens.push(argmax(logitsOf(tokens).at(-1)!));
    return tokens.slice(prompt.length);
  };
  const plainAdapter = loadAdapter(join(f.root, "adapters", "plain"), { name: "plain", base: baseModel });
  assert.equal(mix.milora.token_ids, referenceMoeGreedy(ref.base, ref.weights, mixAdapter, prompt, 4).tokens, "MixLoRA tenant");
  assert.equal(plain.milora.token_ids, greedy((t) => referenceMiloraLogits(ref.base, ref.weights, plainAdapter, t).logits), "plain LoRA tenant");
  assert.equal(base.milora.token_ids, greedy((t) => referenceLogits(ref.base, ref.weights, t)), "base");
});

test.run();
