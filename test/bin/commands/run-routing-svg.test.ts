// `milora run --routing-svg FILE`: one panel per tenant, side by side, whose cells hold exactly the
// gates `--json` reports: layers x modules for the prompt-routed tenant, positions x layers for the
// per-token one, every module of plain LoRA at 1.
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../../compiler/check.ts";
import { EXPERT_MODULES } from "../../../compiler/model.ts";
import { writeRandomAdapter } from "../../../examples/random-adapter.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { elements, parseSvg } from "../../runtime/pictures/svg-dom.ts";

const SPEC = "examples/llama-tiny.milora";
const milora = new URL("../../../bin/milora.js", import.meta.url).pathname;
const root = mkdtempSync(join(tmpdir(), "milora-routing-svg-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

interface Line {
  readonly adapter: string;
  readonly tokens: number[];
  readonly routing?: { layer: number; position?: number; experts: Record<string, number> }[];
}

test("the heatmap holds the gates --json reports, a panel per tenant", async () => {
  const model = join(root, "model");
  writeRandomCheckpoint(model, { ...PRESETS.tiny, seed: 11, tokenizer: true });
  const specs = checkFiles([SPEC]).program.adapters;
  const tenants = ["tiny", "tiny_token", "tiny_lora"];
  tenants.forEach((name, i) => writeRandomAdapter(join(root, name), { spec: specs.find((a) => a.name === name)!, seed: 30 + i }));
  const file = join(root, "routing.svg");
  const args = [milora, "run", SPEC, "--base", model, ...tenants.flatMap((t) => ["--adapter", `${t}=${join(root, t)}`]), "--prompt", "The quick brown fox", "--max-tokens", "3", "--temperature", "0", "--json", "--routing-svg", file];
  const { stdout, stderr } = await promisify(execFile)(process.execPath, args, { timeout: 90_000 });
  assert.match(stderr, `routing heatmap written to ${file}`);
  const lines = stdout.trim().split("\n").map((l) => JSON.parse(l) as Line);
  const svg = parseSvg(readFileSync(file, "utf8"));
  const panels = elements(svg, "g", "panel");
  assert.equal(panels.map((p) => [p.getAttribute("data-tenant"), p.getAttribute("data-kind")]), [["tiny", "prompt"], ["tiny_token", "token"], ["tiny_lora", "prompt"]]);
  for (const [i, panel] of panels.entries()) {
    const cells = elements(panel, "rect", "cell");
    const gate = (layer: number, module: string, position?: number) =>
      cells.find((c) => c.getAttribute("data-layer") === String(layer) && c.getAttribute("data-module") === module && (position === undefined || c.getAttribute("data-position") === String(position)));
    const routing = lines[i]!.routing;
    if (routing === undefined) {
      // Plain LoRA: no router, every module of the adapter on at 1.
      assert.is(tenants[i], "tiny_lora");
      assert.is(cells.length, 2 * EXPERT_MODULES.length);
      assert.ok(cells.every((c) => c.getAttribute("data-gate") === "1"));
      continue;
    }
    assert.is(cells.length, routing.length * EXPERT_MODULES.length);
    for (const d of routing) for (const m of EXPERT_MODULES) assert.is(Number(gate(d.layer, m, d.position)!.getAttribute("data-gate")), d.experts[m] ?? 0, `${tenants[i]} ${d.layer} ${m} ${d.position}`);
  }
  // The per-token strip is labelled with the tokens: the prompt's, then the generated ones.
  const positions = new Set(lines[1]!.routing!.map((d) => d.position));
  assert.ok(positions.size >= 5, "prompt and output positions");
});

test.run();
