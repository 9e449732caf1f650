// Routing heatmaps by structure: a panel per tenant, one cell per (layer, module) or (position, layer,
// module) holding the exact gate, readable labels, a legend, viridis colours with "off" apart, and
// text from users escaped.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { interpolateViridis } from "d3-scale-chromatic";
import { EXPERT_MODULES } from "../../../compiler/model.ts";
import { OFF_FILL, cellFill, moduleUseSvg, routingSvg, visibleToken } from "../../../runtime/pictures/heatmap.ts";
import { elements, parseSvg, texts } from "./svg-dom.ts";

const prompt: { layer: number; experts: Record<string, number> }[] = [
  { layer: 0, experts: { q_proj: 0.6123456789, v_proj: 0.25 } },
  { layer: 1, experts: { o_proj: 0.41, down_proj: 0.3 } },
  { layer: 2, experts: { k_proj: 1 } },
];

test("a prompt-routed tenant: layers x modules, each cell its exact gate (0 where off)", () => {
  const root = parseSvg(routingSvg([{ title: "alice", routing: prompt }]));
  const cells = elements(root, "rect", "cell");
  assert.is(cells.length, 3 * EXPERT_MODULES.length);
  for (const d of prompt) {
    for (const m of EXPERT_MODULES) {
      const cell = cells.find((c) => c.getAttribute("data-layer") === String(d.layer) && c.getAttribute("data-module") === m)!;
      const gate = d.experts[m] ?? 0;
      assert.is(Number(cell.getAttribute("data-gate")), gate, `layer ${d.layer} ${m}`);
      assert.is(cell.getAttribute("fill"), cellFill(gate));
      assert.is(cell.getAttribute("data-tenant"), "alice");
      assert.match(cell.getElementsByTagName("title")[0]!.textContent!, gate === 0 ? `layer ${d.layer} · ${m}: off` : `layer ${d.layer} · ${m}: gate ${gate.toFixed(4)}`);
    }
  }
  assert.equal(texts(root, "text", "row-label"), ["L0", "L1", "L2"]);
  assert.equal(texts(root, "text", "column-label"), ["q", "k", "v", "o", "gate", "up", "down"]);
  // Values written in the cells that are on, rounded for reading.
  assert.equal(texts(root, "text", "cell-value"), ["0.61", "0.25", "0.41", "0.3", "1"]);
  assert.equal(texts(root, "text", "panel-title"), ["alice"]);
});

test("colours: viridis over 0..1, off is grey and apart from the scale; the legend shows both", () => {
  assert.is(cellFill(0), OFF_FILL);
  assert.is(cellFill(1), interpolateViridis(1));
  assert.is(cellFill(0.5), interpolateViridis(0.5));
  assert.is(cellFill(2), interpolateViridis(1));
  assert.is.not(cellFill(1e-6), OFF_FILL);
  const root = parseSvg(routingSvg([{ title: "alice", routing: prompt }]));
  assert.equal(texts(root, "text", "legend-tick"), ["0", "0.25", "0.5", "0.75", "1"]);
  const legend = elements(root, "g", "legend")[0]!;
  assert.match(legend.textContent!, "gate");
  assert.match(legend.textContent!, "off (0)");
  const stops = elements(root, "stop");
  assert.is(stops[0]!.getAttribute("stop-color"), interpolateViridis(1));
  assert.is(stops.at(-1)!.getAttribute("stop-color"), interpolateViridis(0));
});

test("several tenants side by side, a token-routed one as a tokens x layers strip", () => {
  const token = [0, 1, 2, 3].flatMap((position) => [0, 1].map((layer) => ({ layer, position, experts: { [EXPERT_MODULES[(position + layer) % 7]!]: 0.1 * (position + 1) } })));
  const root = parseSvg(routingSvg([{ title: "alice", routing: prompt }, { title: "bob", routing: token, tokens: ["<s>", "Hel", "lo", "!"] }]));
  const panels = elements(root, "g", "panel");
  assert.equal(panels.map((p) => [p.getAttribute("data-tenant"), p.getAttribute("data-kind")]), [["alice", "prompt"], ["bob", "token"]]);
  // Side by side: the second panel starts right of the first.
  const x = (p: (typeof panels)[number]) => Number(/translate\(([\d.]+)/.exec(p.getAttribute("transform")!)![1]);
  assert.ok(x(panels[1]!) > x(panels[0]!) + 7 * 36);
  const bob = elements(panels[1]!, "rect", "cell");
  assert.is(bob.length, 4 * 2 * EXPERT_MODULES.length);
  for (const d of token) {
    for (const m of EXPERT_MODULES) {
      const cell = bob.find((c) => c.getAttribute("data-layer") === String(d.layer) && c.getAttribute("data-position") === String(d.position) && c.getAttribute("data-module") === m)!;
      assert.is(Number(cell.getAttribute("data-gate")), (d.experts as Record<string, number>)[m] ?? 0);
    }
  }
  assert.equal(texts(panels[1]!, "text", "column-label"), ["<s>", "Hel", "lo", "!"]);
  assert.equal(texts(panels[1]!, "text", "row-label"), ["L0", "L1"]);
});

test("token labels show spaces and unprintable characters", () => {
  assert.is(visibleToken(" he\u0001\ufffd"), "␣he\\u0001\\ufffd");
  assert.is(visibleToken("naïve"), "naïve");
});

test("a compiled package's route() result ({ layer, gates }) draws as it is", () => {
  const root = parseSvg(routingSvg([{ title: "bob", routing: [{ layer: 0, gates: { q_proj: 0.7, k_proj: 0 } }] }]));
  const q = elements(root, "rect", "cell").find((c) => c.getAttribute("data-module") === "q_proj")!;
  assert.is(q.getAttribute("data-gate"), "0.7");
});

test("names are escaped; no routing says so", () => {
  const svg = routingSvg([{ title: `<script>"&'`, routing: [] }]);
  assert.not.match(svg, "<script>");
  const root = parseSvg(svg);
  assert.equal(texts(root, "text", "panel-title"), [`<script>"&'`]);
  assert.is(elements(root, "rect", "cell").length, 0);
  assert.match(texts(root, "text", "note")[0]!, "no routing decisions");
});

test("module use: per tenant the share of decisions that switched each module on", () => {
  const root = parseSvg(moduleUseSvg([{ title: "alice", decisions: 4, layers: [0, 1], on: [[4, 0, 2, 0, 0, 0, 1], [0, 0, 0, 0, 0, 3, 0]] }]));
  const cells = elements(root, "rect", "cell");
  assert.is(cells.length, 14);
  const v = cells.find((c) => c.getAttribute("data-layer") === "0" && c.getAttribute("data-module") === "v_proj")!;
  assert.is(v.getAttribute("data-on"), "2");
  assert.is(Number(v.getAttribute("data-share")), 0.5);
  assert.match(elements(root, "g", "legend")[0]!.textContent!, "share on");
});

test.run();
