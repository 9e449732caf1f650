// `milora report OUT`: metrics.jsonl's curves as an SVG: a point per step for the train loss, a point
// per evaluation for the eval loss, the balance loss only when a router adds one; bad input named.
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { parseMetrics, trainingReportSvg } from "../../../runtime/pictures/training.ts";
import { elements, parseSvg } from "../../runtime/pictures/svg-dom.ts";

const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
const root = mkdtempSync(join(tmpdir(), "milora-report-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

const steps = Array.from({ length: 12 }, (_, i) => ({
  step: i + 1,
  epoch: Math.floor(i / 6),
  loss: 6 / (i + 1) + 0.05,
  lm_loss: 6 / (i + 1),
  balance_loss: 0.05,
  lr: 1e-4 * Math.min(1, (i + 1) / 3),
  grad_norm: 3 - i * 0.2,
  tokens_per_s: 900,
  ...((i + 1) % 4 === 0 ? { eval_loss: 6.5 / (i + 1) } : {}),
}));

const points = (svg: ReturnType<typeof parseSvg>, series: string) =>
  [...elements(svg, "circle", "point"), ...elements(svg, "rect", "point"), ...elements(svg, "path", "point")].filter((p) => p.getAttribute("data-series") === series);

test("the report's curves hold every step's loss and every evaluation", async () => {
  const out = join(root, "run");
  mkdirSync(out);
  writeFileSync(join(out, "metrics.jsonl"), steps.map((s) => JSON.stringify(s)).join("\n") + "\n");
  const { stdout } = await promisify(execFile)(process.execPath, [milora, "report", out], { timeout: 30_000 });
  assert.match(stdout, "12 steps");
  assert.match(stdout, `best eval loss ${(6.5 / 12).toFixed(4)} at step 12 (3 evaluations)`);
  const svg = parseSvg(readFileSync(join(out, "report.svg"), "utf8"));
  const train = points(svg, "train loss");
  assert.is(train.length, 12);
  for (const s of steps) assert.ok(train.some((p) => p.getAttribute("data-x") === String(s.step) && Number(p.getAttribute("data-y")) === s.loss), `step ${s.step}`);
  assert.equal(points(svg, "eval loss").map((p) => Number(p.getAttribute("data-x"))), [4, 8, 12]);
  assert.is(points(svg, "balance loss").length, 12);
  assert.is(points(svg, "lr").length, 12);
  assert.is(points(svg, "grad norm").length, 12);
  assert.is(elements(svg, "svg").length, 3, "loss, learning rate and gradient norm charts");
});

test("plain LoRA runs (balance loss 0) draw no balance curve", () => {
  const svg = parseSvg(trainingReportSvg(steps.map((s) => ({ ...s, balance_loss: 0 }))));
  assert.is(points(svg, "balance loss").length, 0);
  assert.is(points(svg, "train loss").length, 12);
});

test("a bad line is named; a missing run says what to give", async () => {
  assert.throws(() => parseMetrics('{"step":1}\n{oops\n', "m.jsonl"), /m\.jsonl:2: not JSON/);
  assert.throws(() => parseMetrics('{"loss":1}\n', "m.jsonl"), /m\.jsonl:1: a metrics line needs a numeric "step"/);
  const missing = await promisify(execFile)(process.execPath, [milora, "report", join(root, "nowhere")], { timeout: 30_000 }).catch((e: { code: number; stderr: string }) => e);
  assert.is((missing as { code: number }).code, 2, "a usage error");
  assert.match((missing as { stderr: string }).stderr, "give the --out directory of a milora train run");
});

test.run();
