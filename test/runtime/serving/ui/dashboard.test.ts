// The page's routes without a browser: / and its files (uPlot from node_modules) with a strict content
// security policy, /ui/state after requests, the heatmaps as SVG, --no-ui, and the API key (Bearer for
// tools, HTTP Basic for browsers, and only on the page's paths).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { EXPERT_MODULES } from "../../../../compiler/model.ts";
import { MODEL, startFixture } from "../http/fixture.ts";
import { elements, parseSvg } from "../../pictures/svg-dom.ts";

const basic = (password: string) => `Basic ${Buffer.from(`anyone:${password}`).toString("base64")}`;

test("the page, its files and its state; the routing heatmap of each recent request", async () => {
  const f = await startFixture({ adapterNames: ["alice", "bob"] });
  try {
    const url = f.serving.server.url;
    const page = await fetch(`${url}/`);
    assert.is(page.status, 200);
    assert.match(page.headers.get("content-type")!, "text/html");
    assert.match(page.headers.get("content-security-policy")!, "script-src 'self'");
    const html = await page.text();
    assert.match(html, '<script src="/ui/uPlot.iife.min.js"');
    assert.not.match(html, /https?:\/\//, "nothing from elsewhere");
    for (const file of ["uPlot.iife.min.js", "uPlot.min.css", "page.js", "page.css"]) assert.is((await fetch(`${url}/ui/${file}`)).status, 200, file);
    assert.match(await (await fetch(`${url}/ui/uPlot.iife.min.js`)).text(), "uPlot");

    for (const model of ["alice", "bob", MODEL]) await f.client.completions.create({ model, prompt: [1, 72, 101, 108], max_tokens: 3, temperature: 0 });
    const state = (await (await fetch(`${url}/ui/state`)).json()) as {
      base: { name: string };
      adapters: { name: string; resident: boolean }[];
      slots: { total: number };
      totals: { generatedTokens: number };
      latency: { ttftMs: number[] };
      samples: { t: number[] };
      requests: { id: number; tenant: string; completionTokens: number; routingKind: string }[];
    };
    assert.is(state.base.name, MODEL);
    assert.equal(state.adapters.map((a) => [a.name, a.resident]), [["alice", true], ["bob", true]]);
    assert.is(state.slots.total, 4);
    assert.is(state.totals.generatedTokens, 9);
    assert.is(state.latency.ttftMs.length, 3);
    assert.ok(state.samples.t.length >= 1);
    assert.equal(state.requests.map((r) => [r.tenant, r.completionTokens]), [[MODEL, 3], ["bob", 3], ["alice", 3]], "newest first");
    // Plain PEFT tenants route nothing: their heatmap says so rather than inventing gates.
    const alice = state.requests.find((r) => r.tenant === "alice")!;
    const svg = await fetch(`${url}/ui/routing/${alice.id}.svg`);
    assert.match(svg.headers.get("content-type")!, "image/svg+xml");
    parseSvg(await svg.text());
    assert.is((await fetch(`${url}/ui/routing/99999.svg`)).status, 404);
    parseSvg(await (await fetch(`${url}/ui/use.svg`)).text());
  } finally {
    await f.close();
  }
});

test("a MiLoRA tenant's heatmap holds the gates of its response; module use counts them", async () => {
  const { modelSource, servingOptions } = await import("../../../../bin/commands/model-source.ts");
  const { checkFiles } = await import("../../../../compiler/check.ts");
  const { writeRandomAdapter } = await import("../../../../examples/random-adapter.ts");
  const { join } = await import("node:path");
  const SPEC = "examples/llama-tiny.milora";
  const f = await startFixture({ fromCheckpoint: (dir) => servingOptions(modelSource(SPEC, dir)), adapterLoading: true });
  try {
    const url = f.serving.server.url;
    const dir = join(f.root, "adapters", "alice");
    writeRandomAdapter(dir, { spec: checkFiles([SPEC]).program.adapters.find((a) => a.name === "tiny")!, seed: 21 });
    const added = await fetch(`${url}/v1/adapters`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ name: "tiny:alice", path: dir }) });
    assert.is(added.status, 201);
    const routings: { layer: number; experts: Record<string, number> }[][] = [];
    for (const prompt of [[1, 72, 101, 108, 108, 111], [1, 9, 200, 31]]) {
      const r = (await f.client.completions.create({ model: "tiny:alice", prompt, max_tokens: 2, temperature: 0 })) as unknown as { milora: { routing: { layer: number; experts: Record<string, number> }[] } };
      routings.push(r.milora.routing);
    }
    const state = (await (await fetch(`${url}/ui/state`)).json()) as { requests: { id: number; routingKind: string }[] };
    assert.equal(state.requests.map((r) => r.routingKind), ["prompt", "prompt"]);
    const cells = elements(parseSvg(await (await fetch(`${url}/ui/routing/${state.requests[0]!.id}.svg`)).text()), "rect", "cell");
    assert.is(cells.length, 2 * EXPERT_MODULES.length);
    for (const d of routings[1]!) {
      for (const m of EXPERT_MODULES) {
        const cell = cells.find((c) => c.getAttribute("data-layer") === String(d.layer) && c.getAttribute("data-module") === m)!;
        assert.is(Number(cell.getAttribute("data-gate")), d.experts[m] ?? 0);
      }
    }
    const use = elements(parseSvg(await (await fetch(`${url}/ui/use.svg`)).text()), "rect", "cell");
    for (const c of use) {
      const layer = Number(c.getAttribute("data-layer"));
      const m = c.getAttribute("data-module")!;
      const on = routings.filter((r) => (r.find((d) => d.layer === layer)?.experts[m] ?? 0) !== 0).length;
      assert.is(Number(c.getAttribute("data-on")), on, `layer ${layer} ${m}`);
      assert.is(Number(c.getAttribute("data-share")), on / 2);
    }
  } finally {
    await f.close();
  }
});

test("--no-ui: no page, no state", async () => {
  const f = await startFixture({ ui: false });
  try {
    assert.is((await fetch(`${f.serving.server.url}/`)).status, 404);
    assert.is((await fetch(`${f.serving.server.url}/ui/state`)).status, 404);
  } finally {
    await f.close();
  }
});

test("with an API key: the page asks for it (Basic), takes it as the password; API routes still want Bearer", async () => {
  const f = await startFixture({ apiKey: "k3y" });
  try {
    const url = f.serving.server.url;
    const bare = await fetch(`${url}/`);
    assert.is(bare.status, 401);
    assert.match(bare.headers.get("www-authenticate")!, 'Basic realm="milora"');
    assert.is((await fetch(`${url}/`, { headers: { authorization: basic("wrong") } })).status, 401);
    assert.is((await fetch(`${url}/`, { headers: { authorization: basic("k3y") } })).status, 200);
    assert.is((await fetch(`${url}/ui/state`, { headers: { authorization: basic("k3y") } })).status, 200);
    assert.is((await fetch(`${url}/ui/state`, { headers: { authorization: "Bearer k3y" } })).status, 200);
    // Basic opens the page only: the API's routes neither take it nor ask for it.
    const api = await fetch(`${url}/v1/models`, { headers: { authorization: basic("k3y") } });
    assert.is(api.status, 401);
    assert.is(api.headers.get("www-authenticate"), null);
  } finally {
    await f.close();
  }
});

test.run();
