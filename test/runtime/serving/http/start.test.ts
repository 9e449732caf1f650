// Serving a spec's adapters: every adapter registered is checked against the spec's adapter of its
// name (or part before `:`), a MiLoRA tenant's routing comes back in the `milora` field exactly as `milora run --json`
// reports it, and the engine reserves LoRA room for the ranks served rather than a default.
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../../compiler/check.ts";
import { writeRandomAdapter } from "../../../../examples/random-adapter.ts";
import { modelSource, servingOptions } from "../../../../bin/commands/model-source.ts";
import { MODEL, miloraField, startFixture } from "./fixture.ts";
import { loadReferenceWeights } from "../../../reference/llama.ts";
import { referenceMiloraGreedy } from "../../../reference/milora.ts";
import { loadAdapter } from "../../../../runtime/formats/adapter.ts";

const SPEC = "examples/llama-tiny.milora";
const specAdapters = checkFiles([SPEC]).program.adapters;
const specAdapter = (name: string) => specAdapters.find((a) => a.name === name)!;
const milora = new URL("../../../../bin/milora.js", import.meta.url).pathname;

interface Decision {
  readonly layer: number;
  readonly experts: Record<string, number>;
}

async function post(url: string, body: unknown): Promise<{ status: number; json: { error?: { message: string } } }> {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return { status: res.status, json: (await res.json()) as { error?: { message: string } } };
}

test("a MiLoRA tenant of a spec: its routing in the `milora` field equals milora run --json's", async () => {
  // As `milora serve examples/llama-tiny.milora --base DIR` sets it up.
  const f = await startFixture({ fromCheckpoint: (dir) => servingOptions(modelSource(SPEC, dir)), adapterLoading: true });
  try {
    // Room for the largest rank the spec allows, as any adapter registered must match one of its adapters.
    assert.is(f.serving.engine.plan.maxLoraRank, Math.max(...specAdapters.flatMap((a) => a.experts.map((e) => e.rank))));
    const alice = join(f.root, "adapters", "alice");
    writeRandomAdapter(alice, { spec: specAdapter("tiny"), seed: 21 });
    const adapters = `${f.serving.server.url}/v1/adapters`;
    assert.is((await post(adapters, { name: "tiny:alice", path: alice })).status, 201);

    // Checked against the spec, not against the adapter's own config.
    const wrong = await post(adapters, { name: "tiny_lora:alice", path: alice });
    assert.is(wrong.status, 400);
    assert.match(wrong.json.error!.message, "does not match adapter spec tiny_lora");
    const unknown = await post(adapters, { name: "other", path: alice });
    assert.is(unknown.status, 400);
    assert.match(unknown.json.error!.message, `${SPEC} has no adapter other`);

    const prompt = [1, 72, 101, 108, 108, 111];
    const served = miloraField(await f.client.completions.create({ model: "tiny:alice", prompt, max_tokens: 3, temperature: 0 })) as ReturnType<typeof miloraField> & {
      routing: Decision[];
    };
    const checkpoint = join(f.root, MODEL);
    const args = [milora, "run", SPEC, "--base", checkpoint, "--adapter", `tiny=${alice}`, "--tokens", prompt.join(","), "--max-tokens", "3", "--json"];
    const { stdout } = await promisify(execFile)(process.execPath, args, { timeout: 60_000 });
    const ran = JSON.parse(stdout) as { tokens: number[]; routing: Decision[] };

    assert.equal(served.token_ids, ran.tokens);
    assert.equal(served.routing.map((d) => d.layer), [0, 1]);
    assert.equal(served.routing.map((d) => Object.keys(d.experts)), ran.routing.map((d) => Object.keys(d.experts)));
    served.routing.forEach((d, i) => {
      for (const [module, gate] of Object.entries(d.experts)) assert.ok(Math.abs(gate - ran.routing[i]!.experts[module]!) < 1e-6, `layer ${d.layer} ${module}`);
    });
  } finally {
    await f.close();
  }
});

test("a prompt-routed tenant takes a prompt of three steps' rows (--max-batch-rows 16): routed over chunks, tokens and gates as the float64 MiLoRA reference", async () => {
  const f = await startFixture({ fromCheckpoint: (dir) => servingOptions(modelSource(SPEC, dir)), ctx: 64, maxBatchRows: 16, adapterLoading: true });
  try {
    assert.is(f.serving.engine.maxRows, 16);
    const alice = join(f.root, "adapters", "alice");
    writeRandomAdapter(alice, { spec: specAdapter("tiny"), seed: 21 });
    assert.is((await post(`${f.serving.server.url}/v1/adapters`, { name: "tiny:alice", path: alice })).status, 201);
    const prompt = Array.from({ length: 48 }, (_, i) => (i * 37 + 5) % 500);
    const r = await f.client.completions.create({ model: "tiny:alice", prompt, max_tokens: 3, temperature: 0 });
    const served = miloraField(r) as ReturnType<typeof miloraField> & { routing: Decision[] };
    const { base, weights } = loadReferenceWeights(join(f.root, MODEL));
    const adapter = loadAdapter(alice, { name: "alice", base, spec: specAdapter("tiny") });
    const want = referenceMiloraGreedy(base, weights, adapter, prompt, 3);
    assert.equal(served.token_ids, want.tokens);
    assert.is(served.routing.length, want.routing.length);
    served.routing.forEach((d, i) => {
      assert.equal(Object.keys(d.experts).sort(), Object.keys(want.routing[i]!.experts).sort(), `layer ${d.layer}`);
      for (const [m, g] of Object.entries(d.experts)) assert.ok(Math.abs(g - (want.routing[i]!.experts as Record<string, number>)[m]!) < 1e-4, `layer ${d.layer} ${m}`);
    });
  } finally {
    await f.close();
  }
});

test("by default one step holds the context: a prompt-routed tenant takes a 200-token prompt, routed and decoded as the float64 MiLoRA reference", async () => {
  const f = await startFixture({ fromCheckpoint: (dir) => servingOptions(modelSource(SPEC, dir)), ctx: 256, adapterLoading: true });
  try {
    const alice = join(f.root, "adapters", "alice");
    writeRandomAdapter(alice, { spec: specAdapter("tiny"), seed: 21 });
    assert.is((await post(`${f.serving.server.url}/v1/adapters`, { name: "tiny:alice", path: alice })).status, 201);
    const prompt = Array.from({ length: 200 }, (_, i) => (i * 37 + 5) % 500);
    const r = await f.client.completions.create({ model: "tiny:alice", prompt, max_tokens: 3, temperature: 0 });
    const served = miloraField(r) as ReturnType<typeof miloraField> & { routing: Decision[] };
    const { base, weights } = loadReferenceWeights(join(f.root, MODEL));
    const adapter = loadAdapter(alice, { name: "alice", base, spec: specAdapter("tiny") });
    const want = referenceMiloraGreedy(base, weights, adapter, prompt, 3);
    assert.equal(served.token_ids, want.tokens);
    served.routing.forEach((d, i) => {
      assert.equal(Object.keys(d.experts).sort(), Object.keys(want.routing[i]!.experts).sort(), `layer ${d.layer}`);
      for (const [m, g] of Object.entries(d.experts)) assert.ok(Math.abs(g - (want.routing[i]!.experts as Record<string, number>)[m]!) < 1e-4, `layer ${d.layer} ${m}`);
    });
  } finally {
    await f.close();
  }
});

test("without a spec, the engine reserves LoRA room for the largest rank of the adapters given at start", async () => {
  // The fixture's PEFT adapters have rank 4; the engine's own default would be 16.
  const f = await startFixture({ adapterNames: ["a", "b"] });
  try {
    assert.is(f.serving.engine.plan.maxLoraRank, 4);
  } finally {
    await f.close();
  }
});

test.run();
