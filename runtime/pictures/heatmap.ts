// Routing heatmaps as plain SVG. A prompt-routed (MiLoRA) decision is one gate per (layer, module): a
// grid of layers x modules, one panel per tenant side by side. A token-routed decision changes at every
// position: a strip of tokens x layers, each layer a band of its seven modules. The colour scale is
// viridis (perceptually uniform, readable with every common colour-vision deficiency and in greyscale)
// over gates 0..1; a module switched off (gate 0) is a pale grey cell, apart from the scale. Every cell
// carries its exact value in data attributes (data-layer, data-module, data-position, data-gate) and a
// tooltip, so that tools and tests read the picture's numbers without measuring pixels.
import { interpolateViridis } from "d3-scale-chromatic";
import { EXPERT_MODULES, type ExpertModule } from "../../compiler/model.ts";
import { document, el, label, text, textWidth, type Attributes } from "./svg.ts";

/** One routing decision as the engine (`experts`) or a compiled package's route() (`gates`) reports it. */
export interface RoutingDecision {
  readonly layer: number;
  readonly position?: number;
  readonly experts?: Readonly<Partial<Record<ExpertModule, number>>>;
  readonly gates?: Readonly<Partial<Record<ExpertModule, number>>>;
}

export interface RoutingPanel {
  /** The tenant (adapter) name: the panel's title. */
  readonly title: string;
  readonly subtitle?: string;
  readonly routing: readonly RoutingDecision[];
  /** Layers to show (default: those the routing names). */
  readonly layers?: readonly number[];
  /** Labels of token positions for a token-routed strip (index = position); default the position. */
  readonly tokens?: readonly string[];
}

/** Short column labels: q k v o gate up down. */
export const MODULE_LABELS: Readonly<Record<ExpertModule, string>> = {
  q_proj: "q",
  k_proj: "k",
  v_proj: "v",
  o_proj: "o",
  gate_proj: "gate",
  up_proj: "up",
  down_proj: "down",
};

export const OFF_FILL = "#ececec";
const OFF_STROKE = "#cfcfcf";

/** The fill for a value in 0..1 (0 is "off", apart from the scale). */
export function cellFill(v: number): string {
  return v === 0 ? OFF_FILL : interpolateViridis(Math.min(1, Math.max(0, v)));
}

/** Text colour readable on cellFill(v): light on viridis' dark half. */
function inkOn(v: number): string {
  return v > 0 && v < 0.62 ? "#ffffff" : "#1a1a1a";
}

/** The gates of one decision, 0 where a module is not selected. */
export function gatesOf(d: RoutingDecision): Record<ExpertModule, number> {
  const g = d.experts ?? d.gates ?? {};
  return Object.fromEntries(EXPERT_MODULES.map((m) => [m, g[m] ?? 0])) as Record<ExpertModule, number>;
}

interface Cell {
  readonly value: number;
  readonly attributes: Attributes;
  readonly tooltip: string;
}

interface Grid {
  readonly title: string;
  readonly subtitle?: string;
  readonly attributes: Attributes;
  readonly columns: readonly string[];
  /** Row labels; undefined leaves the row unlabelled (a module row inside a layer band). */
  readonly rows: readonly (string | undefined)[];
  /** Extra space before row i. */
  readonly gapBefore?: (row: number) => number;
  readonly cells: readonly (readonly Cell[])[];
  readonly cellWidth: number;
  readonly cellHeight: number;
  readonly showValues: boolean;
  readonly rotateColumns: boolean;
  /** Labels written on the right of some rows (the module key of a token strip). */
  readonly rightLabels?: readonly (string | undefined)[];
  readonly note?: string;
}

interface Placed {
  readonly svg: string;
  readonly width: number;
  readonly height: number;
}

const TITLE_SIZE = 14;
const LABEL_SIZE = 11;

function drawGrid(g: Grid, x0: number, y0: number): Placed {
  const rowLabelWidth = Math.max(24, ...g.rows.map((r) => (r === undefined ? 0 : textWidth(r, LABEL_SIZE)))) + 8;
  const longestColumn = Math.max(0, ...g.columns.map((c) => textWidth(c, LABEL_SIZE)));
  const columnLabelHeight = g.rotateColumns ? longestColumn * 0.75 + 14 : LABEL_SIZE + 8;
  const titleHeight = g.subtitle === undefined ? 24 : 40;
  const gridTop = titleHeight + columnLabelHeight;
  const rowY: number[] = [];
  let y = gridTop;
  for (let r = 0; r < g.rows.length; r++) {
    y += g.gapBefore?.(r) ?? 0;
    rowY.push(y);
    y += g.cellHeight;
  }
  const gridWidth = g.columns.length * g.cellWidth;
  const rightWidth = Math.max(0, ...(g.rightLabels ?? []).map((r) => (r === undefined ? 0 : textWidth(r, 7) + 6)));
  const titleWidth = Math.max(textWidth(g.title, TITLE_SIZE), g.subtitle === undefined ? 0 : textWidth(g.subtitle, LABEL_SIZE));
  const width = Math.max(rowLabelWidth + gridWidth + rightWidth, titleWidth) + 8;
  const parts: string[] = [
    el("text", { x: 0, y: 16, "font-size": TITLE_SIZE, "font-weight": 600, fill: "#1a1a1a", class: "panel-title" }, text(g.title)),
  ];
  if (g.subtitle !== undefined) parts.push(el("text", { x: 0, y: 32, "font-size": LABEL_SIZE, fill: "#555555" }, text(g.subtitle)));
  g.columns.forEach((c, i) => {
    const cx = rowLabelWidth + (i + 0.5) * g.cellWidth;
    const cy = gridTop - 6;
    parts.push(
      g.rotateColumns
        ? el("text", { x: cx, y: cy, "font-size": LABEL_SIZE, fill: "#333333", transform: `rotate(-50 ${cx} ${cy})`, class: "column-label" }, text(c))
        : el("text", { x: cx, y: cy, "font-size": LABEL_SIZE, fill: "#333333", "text-anchor": "middle", class: "column-label" }, text(c)),
    );
  });
  g.rows.forEach((r, i) => {
    if (r === undefined) return;
    parts.push(
      el("text", { x: rowLabelWidth - 6, y: rowY[i]! + g.cellHeight / 2 + 4, "font-size": LABEL_SIZE, fill: "#333333", "text-anchor": "end", class: "row-label" }, text(r)),
    );
  });
  (g.rightLabels ?? []).forEach((r, i) => {
    if (r === undefined) return;
    parts.push(el("text", { x: rowLabelWidth + gridWidth + 4, y: rowY[i]! + g.cellHeight / 2 + 2.5, "font-size": 7, fill: "#555555" }, text(r)));
  });
  g.cells.forEach((row, ri) =>
    row.forEach((cell, ci) => {
      const x = rowLabelWidth + ci * g.cellWidth;
      const yy = rowY[ri]!;
      const rect = el(
        "rect",
        {
          x: x + 0.5,
          y: yy + 0.5,
          width: g.cellWidth - 1,
          height: g.cellHeight - 1,
          fill: cellFill(cell.value),
          ...(cell.value === 0 ? { stroke: OFF_STROKE, "stroke-width": 0.5 } : {}),
          class: "cell",
          ...cell.attributes,
        },
        el("title", {}, text(cell.tooltip)),
      );
      parts.push(rect);
      if (g.showValues && cell.value !== 0) {
        parts.push(
          el(
            "text",
            { x: x + g.cellWidth / 2, y: yy + g.cellHeight / 2 + 3.5, "font-size": 10, fill: inkOn(cell.value), "text-anchor": "middle", "pointer-events": "none", class: "cell-value" },
            text(label(cell.value)),
          ),
        );
      }
    }),
  );
  if (g.note !== undefined) parts.push(el("text", { x: 0, y: gridTop + 14, "font-size": LABEL_SIZE, fill: "#555555", class: "note" }, text(g.note)));
  const height = (rowY.length > 0 ? rowY.at(-1)! + g.cellHeight : gridTop + 24) + 4;
  return { svg: el("g", { transform: `translate(${x0} ${y0})`, class: "panel", ...g.attributes }, ...parts), width, height };
}

/** A vertical colour bar over 0..1 with ticks, and the swatch for "off". */
function drawLegend(title: string, offLabel: string, x0: number, y0: number): Placed {
  const barHeight = 140;
  const stops = Array.from({ length: 11 }, (_, i) => el("stop", { offset: `${i * 10}%`, "stop-color": interpolateViridis(1 - i / 10) }));
  const parts = [
    el("defs", {}, el("linearGradient", { id: "milora-viridis", x1: 0, y1: 0, x2: 0, y2: 1 }, ...stops)),
    el("text", { x: 0, y: 12, "font-size": LABEL_SIZE, "font-weight": 600, fill: "#1a1a1a" }, text(title)),
    el("rect", { x: 0, y: 20, width: 14, height: barHeight, fill: "url(#milora-viridis)", stroke: "#999999", "stroke-width": 0.5, class: "legend-bar" }),
  ];
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    const y = 20 + (1 - t) * barHeight;
    parts.push(el("line", { x1: 14, x2: 18, y1: y, y2: y, stroke: "#666666" }));
    parts.push(el("text", { x: 21, y: y + 4, "font-size": 10, fill: "#333333", class: "legend-tick" }, text(String(t))));
  }
  const sy = 20 + barHeight + 14;
  parts.push(el("rect", { x: 0, y: sy, width: 14, height: 12, fill: OFF_FILL, stroke: OFF_STROKE }));
  parts.push(el("text", { x: 20, y: sy + 10, "font-size": 10, fill: "#333333" }, text(offLabel)));
  const width = Math.max(textWidth(title, LABEL_SIZE), 20 + textWidth(offLabel, 10)) + 8;
  return { svg: el("g", { transform: `translate(${x0} ${y0})`, class: "legend" }, ...parts), width, height: sy + 16 };
}

/** Side-by-side panels and a legend in one picture. */
function compose(title: string, grids: readonly Grid[], legend: { readonly title: string; readonly off: string }, attributes: Attributes): string {
  const margin = 12;
  const gap = 28;
  const placed: Placed[] = [];
  let x = margin;
  for (const g of grids) {
    const p = drawGrid(g, x, margin);
    placed.push(p);
    x += p.width + gap;
  }
  const l = drawLegend(legend.title, legend.off, x, margin + 30);
  const width = x + l.width + margin;
  const height = Math.max(l.height + 30, ...placed.map((p) => p.height)) + 2 * margin;
  return document(width, height, title, [...placed.map((p) => p.svg), l.svg], attributes);
}

function decisionLayers(panel: RoutingPanel): number[] {
  return panel.layers ? [...panel.layers] : [...new Set(panel.routing.map((d) => d.layer))].sort((a, b) => a - b);
}

function fmtGate(v: number): string {
  return v === 0 ? "off" : `gate ${v.toFixed(4)}`;
}

/** A prompt-routed panel: layers x modules. */
function promptGrid(panel: RoutingPanel): Grid {
  const layers = decisionLayers(panel);
  const byLayer = new Map(panel.routing.map((d) => [d.layer, gatesOf(d)]));
  return {
    title: panel.title,
    subtitle: panel.subtitle ?? "routed once per prompt",
    attributes: { "data-tenant": panel.title, "data-kind": "prompt" },
    columns: EXPERT_MODULES.map((m) => MODULE_LABELS[m]),
    rows: layers.map((l) => `L${l}`),
    cells: layers.map((layer) =>
      EXPERT_MODULES.map((m) => {
        const v = byLayer.get(layer)?.[m] ?? 0;
        return {
          value: v,
          attributes: { "data-tenant": panel.title, "data-layer": layer, "data-module": m, "data-gate": String(v) },
          tooltip: `${panel.title} · layer ${layer} · ${m}: ${fmtGate(v)}`,
        };
      }),
    ),
    cellWidth: 36,
    cellHeight: 18,
    showValues: true,
    rotateColumns: false,
    ...(layers.length === 0 ? { note: "no routing decisions (base model, or no routers)" } : {}),
  };
}

/** A token-routed panel: positions across, each layer a band of its seven module rows. */
function tokenGrid(panel: RoutingPanel): Grid {
  const layers = decisionLayers(panel);
  const positions = [...new Set(panel.routing.map((d) => d.position ?? 0))].sort((a, b) => a - b);
  const at = new Map(panel.routing.map((d) => [`${d.layer}:${d.position ?? 0}`, gatesOf(d)]));
  const rows: (string | undefined)[] = [];
  const right: (string | undefined)[] = [];
  const cells: Cell[][] = [];
  layers.forEach((layer, li) => {
    EXPERT_MODULES.forEach((m, mi) => {
      rows.push(mi === 3 ? `L${layer}` : undefined);
      right.push(li === 0 ? MODULE_LABELS[m] : undefined);
      cells.push(
        positions.map((p) => {
          const v = at.get(`${layer}:${p}`)?.[m] ?? 0;
          const token = panel.tokens?.[p];
          return {
            value: v,
            attributes: { "data-tenant": panel.title, "data-layer": layer, "data-module": m, "data-position": p, "data-gate": String(v) },
            tooltip: `${panel.title} · position ${p}${token === undefined ? "" : ` (${JSON.stringify(token)})`} · layer ${layer} · ${m}: ${fmtGate(v)}`,
          };
        }),
      );
    });
  });
  const tokenLabel = (p: number) => {
    const t = panel.tokens?.[p];
    if (t === undefined) return String(p);
    const shown = visibleToken(t);
    return shown.length > 10 ? `${shown.slice(0, 9)}…` : shown;
  };
  const every = Math.max(1, Math.ceil(positions.length / 48));
  return {
    title: panel.title,
    subtitle: panel.subtitle ?? "routed at every token: tokens x layers",
    attributes: { "data-tenant": panel.title, "data-kind": "token" },
    columns: positions.map((p, i) => (i % every === 0 ? tokenLabel(p) : "")),
    rows,
    rightLabels: right,
    gapBefore: (r) => (r > 0 && r % EXPERT_MODULES.length === 0 ? 4 : 0),
    cells,
    cellWidth: 14,
    cellHeight: 7,
    showValues: false,
    rotateColumns: true,
    ...(layers.length === 0 ? { note: "no routing decisions" } : {}),
  };
}

/** A token as a label: spaces as ␣, control and unprintable characters as \uXXXX escapes. */
export function visibleToken(t: string): string {
  return [...t]
    .map((c) => {
      const code = c.codePointAt(0)!;
      if (c === " ") return "␣";
      if (code < 0x20 || (code >= 0x7f && code <= 0x9f) || code === 0xad || code === 0x2028 || code === 0x2029 || code === 0xfffd) return `\\u${code.toString(16).padStart(4, "0")}`;
      return c;
    })
    .join("");
}

/** Whether a routing is per token (its decisions name positions). */
export function isTokenRouting(routing: readonly RoutingDecision[]): boolean {
  return routing.some((d) => d.position !== undefined);
}

/**
 * The routing of one or more tenants as one SVG: a layers x modules heatmap per prompt-routed tenant,
 * a tokens x layers strip per token-routed one, side by side, with a legend.
 */
export function routingSvg(panels: readonly RoutingPanel[], options: { readonly title?: string } = {}): string {
  const grids = panels.map((p) => (isTokenRouting(p.routing) ? tokenGrid(p) : promptGrid(p)));
  return compose(options.title ?? `MiLoRA routing: ${panels.map((p) => p.title).join(", ")}`, grids, { title: "gate", off: "off (0)" }, { class: "milora-routing" });
}

/** How often each module was switched on: per layer and module, the share of decisions with a gate above 0. */
export interface ModuleUsePanel {
  readonly title: string;
  /** Decisions counted (prompts, or prompt positions for token routing). */
  readonly decisions: number;
  readonly layers: readonly number[];
  /** on[layer index][module index]: decisions that switched the module on. */
  readonly on: readonly (readonly number[])[];
}

export function moduleUseSvg(panels: readonly ModuleUsePanel[], options: { readonly title?: string } = {}): string {
  const grids: Grid[] = panels.map((p) => ({
    title: p.title,
    subtitle: `${p.decisions} routing decision${p.decisions === 1 ? "" : "s"}`,
    attributes: { "data-tenant": p.title, "data-kind": "use", "data-decisions": p.decisions },
    columns: EXPERT_MODULES.map((m) => MODULE_LABELS[m]),
    rows: p.layers.map((l) => `L${l}`),
    cells: p.layers.map((layer, li) =>
      EXPERT_MODULES.map((m, mi) => {
        const on = p.on[li]?.[mi] ?? 0;
        const share = p.decisions === 0 ? 0 : on / p.decisions;
        return {
          value: share,
          attributes: { "data-tenant": p.title, "data-layer": layer, "data-module": m, "data-on": on, "data-share": String(share) },
          tooltip: `${p.title} · layer ${layer} · ${m}: on in ${on} of ${p.decisions}`,
        };
      }),
    ),
    cellWidth: 36,
    cellHeight: 18,
    showValues: true,
    rotateColumns: false,
    ...(p.layers.length === 0 ? { note: "no routing decisions yet" } : {}),
  }));
  return compose(options.title ?? "How often each module is switched on", grids, { title: "share on", off: "never" }, { class: "milora-module-use" });
}
