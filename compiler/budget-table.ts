// The budget of an adapter as an aligned text table, as `milora check` prints it after a clean check.
import pc from "picocolors";
import type { AdapterBudget } from "./budget.ts";
import type { Adapter, RouterConfig } from "./model.ts";

/** 1234567 -> "1,234,567" (rounded to a whole number). */
export function withThousands(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

function byteSize(bytes: number): string {
  return bytes < 2 ** 20 ? `${(bytes / 2 ** 10).toFixed(1)} KiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function routerSummary(router: RouterConfig | undefined): string {
  if (router === undefined) return "plain LoRA (router off): every enabled module, gate 1";
  const s = router.selection;
  const rule = s.rule === "top_k" ? `top_k ${s.k}` : s.rule === "threshold" ? `threshold ${s.threshold}` : "dense";
  const gates = s.rule === "dense" ? "" : s.renormalize ? " renormalize" : "";
  const activation = router.activation === "none" ? "" : `, activation ${router.activation === "rational" ? `rational ${router.rational?.numerator}/${router.rational?.denominator}` : router.activation}`;
  const when = router.when === "prompt" ? "routed once per prompt" : "routed per token";
  return `MiLoRA router per layer: ${rule}${gates}, pooling ${router.pooling}${activation}, ${when}`;
}

/** Rows of cells padded to their column's width: the first column left-aligned, the others right-aligned. */
export function aligned(rows: readonly (readonly string[])[], indent: string): string[] {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  return rows.map(
    (row) =>
      indent +
      row
        .map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!)))
        .join("  ")
        .trimEnd(),
  );
}

export function renderBudgetTable(adapter: Adapter, budget: AdapterBudget, opts: { color: boolean }): string {
  const c = pc.createColors(opts.color);
  const title = `adapter ${c.bold(adapter.name)} on ${adapter.base.name}${adapter.extends ? ` (extends ${adapter.extends})` : ""}`;
  const rows: string[][] = [["module", "layers", "rank", "params", "share"]];
  const share = (n: number) => `${((100 * n) / budget.trainableParams).toFixed(1)}%`;
  for (const m of budget.modules) {
    const rank = m.minRank === m.maxRank ? `${m.minRank}` : `${m.minRank}-${m.maxRank}`;
    rows.push([m.module, `${m.layers}`, rank, withThousands(m.params), share(m.params)]);
  }
  if (adapter.router !== undefined) {
    const routed = budget.layers.filter((l) => l.routerParams > 0).length;
    rows.push(["router", `${routed}`, "", withThousands(budget.routerParams), share(budget.routerParams)]);
  }
  rows.push(["total trainable", "", "", withThousands(budget.trainableParams), "100.0%"]);
  const fact = (label: string, value: string) => `  ${label.padEnd(18)}${value}`;
  const facts = [
    fact(
      "base parameters",
      `${withThousands(budget.baseParams)} (adapter = ${budget.shareOfBasePercent.toFixed(3)}% of base)`,
    ),
    fact("LoRA FLOPs/token", `${withThousands(budget.flopsPerToken.allEnabled)} with all enabled modules`),
    fact("", `${withThousands(budget.flopsPerToken.expected)} expected under routing`),
    fact("adapter memory", `${byteSize(budget.bytes.f32)} f32, ${byteSize(budget.bytes.f16)} f16`),
  ];
  return [title, `  ${c.dim(routerSummary(adapter.router))}`, ...aligned(rows, "  "), ...facts].join("\n");
}
