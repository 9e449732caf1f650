// What a spec fixes in the plan of the engine `milora run` loads: the adapter its tenants run under, so
// that the routers' kernels come from the plan and none is generated outside it.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { Adapter } from "../../../compiler/model.ts";
import { planBase, plannedKey, routerKernelRequests } from "../../../compiler/plan.ts";
import { modelSource, planOptions } from "../../../bin/commands/model-source.ts";
import { adapterSpecFromPeft } from "../../../runtime/formats/adapter.ts";
import { writeRandomPeftAdapter } from "../../../examples/random-adapter.ts";

const spec = new URL("../../../examples/llama-tiny.milora", import.meta.url).pathname;
// A directory without config.json: the spec's base is taken as it stands.
const root = mkdtempSync(join(tmpdir(), "milora-model-source-"));
const source = modelSource(spec, root);
const adapter = (name: string): Adapter => source.adapters.find((a) => a.name === name)!;

test.after(() => rmSync(root, { recursive: true, force: true }));

test("one adapter of the spec run, by one tenant or two: the plan serves it and holds every router kernel", () => {
  const tiny = adapter("tiny");
  for (const tenants of [[tiny], [tiny, tiny]]) {
    const options = planOptions(source, { ctx: 32, maxLoraRank: 8, tenants });
    assert.is(options.adapter, tiny);
    const plan = planBase(source.base, { ctx: options.ctx!, maxLoraRank: options.maxLoraRank!, adapter: options.adapter! });
    assert.equal(plan.routers.map((r) => r.layer), tiny.layers);
    for (const r of plan.routers) {
      const requests = routerKernelRequests(tiny.router!, plan.dims.hidden, r.experts);
      for (const request of [requests.score, requests.pool, requests.gate]) if (request) assert.ok(plannedKey(plan, request), `${request.family} of layer ${r.layer} is planned`);
    }
  }
});

test("several adapters, none, or an adapter outside the spec: the plan serves the base and routers fall back", () => {
  assert.is(planOptions(source, { tenants: [adapter("tiny"), adapter("tiny_token")] }).adapter, undefined);
  assert.is(planOptions(source, { ctx: 32 }).adapter, undefined);
  const dir = join(root, "peft");
  writeRandomPeftAdapter(dir, { base: source.base, modules: ["q_proj"], rank: 4, alpha: 8, seed: 1 });
  const own = adapterSpecFromPeft(dir, source.base, "peft");
  assert.equal(planOptions(source, { ctx: 32, tenants: [own] }), { ctx: 32 });
});

test.run();
