// The page of `milora serve` in headless Chromium (Debian's chromium, driven by playwright-core; the
// setup script installs it with apt, nothing downloads a browser): a served random model with two
// tenants (one routed per prompt, one per token), behind an API key that the page takes as an HTTP
// Basic password. After one request per tenant through the API, the page's heatmaps hold exactly the
// gates the responses carried, its charts and tables the requests and tokens, and a screenshot is saved.
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type Browser } from "playwright-core";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../../compiler/check.ts";
import { EXPERT_MODULES } from "../../../../compiler/model.ts";
import { writeRandomAdapter } from "../../../../examples/random-adapter.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../../examples/random-checkpoint.ts";

const CHROMIUM = process.env.MILORA_CHROMIUM ?? "/usr/bin/chromium";
const SPEC = "examples/llama-tiny.milora";
const KEY = "page-test-key";
/** Everything, server start included, must be done by then; the test fails (and cleans up) past it. */
const DEADLINE_MS = 75_000;
const milora = new URL("../../../../bin/milora.js", import.meta.url).pathname;

interface Decision {
  readonly layer: number;
  readonly position?: number;
  readonly experts: Record<string, number>;
}
interface Completion {
  readonly usage: { readonly completion_tokens: number };
  readonly milora: { readonly routing: Decision[]; readonly token_ids: number[] };
}
interface PageCell {
  readonly layer: number;
  readonly module: string;
  readonly position: number | null;
  readonly gate: number;
}

function withDeadline<T>(what: string, p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms)))]).finally(() =>
    clearTimeout(timer),
  );
}

async function listening(child: ChildProcess, stderr: () => string): Promise<string> {
  for (;;) {
    const url = /milora serve: (http:\/\/[^\s]+)\/v1/.exec(stderr())?.[1];
    if (url) return url;
    if (child.exitCode !== null) throw new Error(`milora serve exited:\n${stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

if (!existsSync(CHROMIUM)) {
  console.log(
    `\n  SKIPPED page.test.ts: no Chromium at ${CHROMIUM}. scripts/setup.sh installs Debian's chromium with apt when run as root ` +
      `(apt-get install chromium); set MILORA_CHROMIUM to use another Chromium build.\n`,
  );
  test.skip("the page shows the routing and the numbers the API returned", () => undefined);
} else {
  test("the page shows the routing and the numbers the API returned", async () => {
    const root = mkdtempSync(join(tmpdir(), "milora-ui-"));
    const model = join(root, "tiny");
    writeRandomCheckpoint(model, { ...PRESETS.tiny, seed: 11, tokenizer: true });
    const adapters = checkFiles([SPEC]).program.adapters;
    writeRandomAdapter(join(root, "alice"), { spec: adapters.find((a) => a.name === "tiny")!, seed: 21 });
    writeRandomAdapter(join(root, "bob"), { spec: adapters.find((a) => a.name === "tiny_token")!, seed: 22 });
    const tenants = ["tiny:alice", "tiny_token:bob"];
    const args = [milora, "serve", SPEC, "--base", model, "--port", "0", "--api-key", KEY, "--max-sequences", "2", "--adapter", `tiny:alice=${join(root, "alice")}`, "--adapter", `tiny_token:bob=${join(root, "bob")}`];
    const child = spawn(process.execPath, args, { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr!.on("data", (d) => (stderr += d.toString()));
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    const killer = setTimeout(() => child.kill("SIGKILL"), DEADLINE_MS + 10_000);
    let browser: Browser | undefined;
    try {
      await withDeadline("the whole check", check(), DEADLINE_MS);
    } finally {
      await browser?.close().catch(() => undefined);
      child.kill("SIGTERM");
      await withDeadline("milora serve exiting", exited, 10_000).catch(() => child.kill("SIGKILL"));
      clearTimeout(killer);
      rmSync(model, { recursive: true, force: true });
    }

    async function check(): Promise<void> {
      const url = await listening(child, () => stderr);
      assert.match(stderr, `page ${url}/`);
      const auth = { authorization: `Bearer ${KEY}`, "content-type": "application/json" };
      // Behind the key: a browser without it is asked for it (Basic), and a wrong one is refused.
      const bare = await fetch(`${url}/`);
      assert.is(bare.status, 401);
      assert.match(bare.headers.get("www-authenticate") ?? "", /^Basic realm="milora"/);
      const wrong = await fetch(`${url}/ui/state`, { headers: { authorization: `Basic ${Buffer.from("x:nope").toString("base64")}` } });
      assert.is(wrong.status, 401);

      const responses = new Map<string, Completion>();
      for (const [i, tenant] of tenants.entries()) {
        const body = { model: tenant, prompt: i === 0 ? "The quick brown fox" : "Hello there, friend", max_tokens: 4, temperature: 0, ignore_eos: true };
        const res = await fetch(`${url}/v1/completions`, { method: "POST", headers: auth, body: JSON.stringify(body) });
        assert.is(res.status, 200, await res.clone().text());
        responses.set(tenant, (await res.json()) as Completion);
      }
      assert.ok(responses.get(tenants[0]!)!.milora.routing.every((d) => d.position === undefined), "alice routes per prompt");
      assert.ok(responses.get(tenants[1]!)!.milora.routing.some((d) => d.position !== undefined), "bob routes per token");

      browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"], timeout: 20_000 });
      const context = await browser.newContext({ httpCredentials: { username: "milora", password: KEY, send: "always" }, viewport: { width: 1400, height: 1000 } });
      const page = await context.newPage();
      const errors: string[] = [];
      page.on("pageerror", (e) => errors.push(e.message));
      page.on("console", (m) => void (m.type() === "error" && errors.push(m.text())));
      // Nothing but the server itself is asked for anything: the page works offline.
      const foreign: string[] = [];
      page.on("request", (r) => void (r.url().startsWith(url) || foreign.push(r.url())));
      await page.goto(`${url}/`, { timeout: 15_000 });
      // (This file is type-checked without the DOM's types: the page's globals are reached through globalThis.)
      await page.waitForFunction(
        () => {
          const d = (globalThis as unknown as { document: { querySelectorAll(s: string): { length: number }; querySelector(s: string): unknown } }).document;
          return d.querySelectorAll("article.request[data-ready=true]").length === 2 && d.querySelector("#module-use svg") !== null && d.querySelector("#chart-ttft[data-points='2']") !== null;
        },
        undefined,
        { timeout: 15_000 },
      );

      // Heatmaps: one cell per (layer, module) or (position, layer, module), each holding the gate the API returned.
      for (const tenant of tenants) {
        const decisions = responses.get(tenant)!.milora.routing;
        const cells = await page.$$eval(`article.request[data-tenant="${tenant}"] rect.cell`, (rects) =>
          rects.map((r) => ({
            layer: Number(r.getAttribute("data-layer")),
            module: r.getAttribute("data-module")!,
            position: r.hasAttribute("data-position") ? Number(r.getAttribute("data-position")) : null,
            gate: Number(r.getAttribute("data-gate")),
          })),
        );
        assert.is(cells.length, decisions.length * EXPERT_MODULES.length, `${tenant}: one cell per decision and module`);
        const key = (layer: number, module: string, position: number | null | undefined) => `${layer}/${module}/${position ?? "-"}`;
        const shown = new Map(cells.map((c: PageCell) => [key(c.layer, c.module, c.position), c.gate]));
        for (const d of decisions) {
          for (const m of EXPERT_MODULES) assert.is(shown.get(key(d.layer, m, d.position)), d.experts[m] ?? 0, `${tenant} layer ${d.layer} ${m} position ${d.position ?? "-"}`);
        }
        // The per-tenant use view counts this one request's decisions.
        const use = await page.$$eval(`#module-use rect.cell[data-tenant="${tenant}"]`, (rects) =>
          rects.map((r) => ({ layer: Number(r.getAttribute("data-layer")), module: r.getAttribute("data-module")!, on: Number(r.getAttribute("data-on")) })),
        );
        for (const u of use) {
          const on = decisions.filter((d) => d.layer === u.layer && (d.experts[u.module] ?? 0) !== 0).length;
          assert.is(u.on, on, `${tenant}: layer ${u.layer} ${u.module} switched on ${on} times`);
        }
        assert.ok(use.length > 0);
        // Its request card reports the tokens the API returned.
        const tokens = await page.getAttribute(`article.request[data-tenant="${tenant}"]`, "data-completion-tokens");
        assert.is(Number(tokens), responses.get(tenant)!.usage.completion_tokens);
      }

      // Charts (uPlot): one TTFT and TPOT point per request; throughput sampled; slot use drawn. The
      // throughput is sampled once a second over a 5 s window: wait (bounded) for a sample to reach the page.
      await page
        .waitForFunction(
          () => {
            const c = (globalThis as unknown as { miloraCharts?: Record<string, { data: (number | null)[][] }> }).miloraCharts;
            return c?.throughput?.data[1]?.some((v) => v !== null && v > 0) ?? false;
          },
          undefined,
          { timeout: 10_000 },
        )
        .catch(() => undefined);
      const charts = await page.evaluate(() => {
        const c = (globalThis as unknown as { miloraCharts: Record<string, { data: (number | null)[][] }> }).miloraCharts;
        return Object.fromEntries(Object.entries(c).map(([k, u]) => [k, u.data.map((s) => [...s])]));
      });
      assert.is(charts.ttft![0]!.length, 2);
      assert.ok(charts.ttft![1]!.every((v) => v !== null && v > 0), "TTFT values");
      assert.ok(charts.tpot![1]!.every((v) => v !== null && v > 0), "TPOT values");
      assert.ok(charts.throughput![0]!.length >= 1 && charts.throughput![1]!.some((v) => v !== null && v > 0), "throughput sampled while tokens were generated");
      assert.ok(charts.slots![1]!.every((v) => v !== null && v >= 0 && v <= 2), "slots in use within the 2 slots");
      assert.ok((await page.$$("#chart-ttft canvas")).length > 0, "uPlot drew on a canvas");

      const total = [...responses.values()].reduce((n, r) => n + r.usage.completion_tokens, 0);
      assert.is(await page.textContent('#totals dd[data-key="tokens"]'), String(total));
      for (const name of tenants) assert.is(await page.getAttribute(`#adapters tr[data-adapter="${name}"]`, "data-resident"), "true");

      const screenshot = join(root, "page.png");
      await page.screenshot({ path: screenshot, fullPage: true, timeout: 15_000 });
      assert.ok(existsSync(screenshot));
      console.log(`\n  page screenshot: ${screenshot}`);
      assert.equal(errors, [], "no errors in the page");
      assert.equal(foreign, [], "no request beyond the server");
    }
  });
}

test.run();
