// The budget of an adapter as an aligned text table, as `milora check` prints it after a clean check.
import pc from "picocolors";
import type { AdapterBudget, ModuleBudget } from "./budget.ts";
import type { Adapter } from "./model.ts";

/** 1234567 -> "1,234,567" (rounded to a whole number). */
export function withThousands(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

function byteSize(bytes: number): string {
  return bytes < 2 ** 20 ? `${(bytes / 2 ** 10).toFixed(1)} KiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function routerSummary(adapter: Adapter): string {
  const { router, moe } = adapter;
  if (moe !== undefined) {
    const rule = moe.selection.rule === "top_k" ? `top_k ${moe.selection.k}${moe.selection.renormalize ? " renormalize" : ""}` : "dense";
    return moe.placement === "per_module"
      ? `per-token router per module (MoLoRA/MOELoRA): ${moe.experts} experts of rank r/${moe.experts} in each, ${rule}`
      : `per-token router per layer's MLP (MixLoRA): ${moe.experts} experts of rank r in each MLP module, ${rule}; attention modules plain LoRA`;
  }
  if (router === undefined) return "plain LoRA (router off): every enabled module, gate 1";
  const s = router.selection;
  const rule = s.rule === "top_k" ? `top_k ${s.k}` : s.rule === "threshold" ? `threshold ${s.threshold}` : "dense";
  const gates = s.rule === "dense" ? "" : s.renormalize ? " renormalize" : "";
  const activation = router.activation === "none" ? "" : `, activation ${router.activation === "rational" ? `rational ${router.rational?.numerator}/${router.rational?.denominator}` : router.activation}`;
  const when = router.when === "prompt" ? "routed once per prompt" : "routed per token";
  return `MiLoRA router per layer: ${rule}${gates}, pooling ${router.pooling}${activation}, ${when}`;
}

/**
 * A module's rank cell: its rank r (or range), or for a per-token baseline's module E x the rank of one
 * expert: per_module 8x4 for rank 32 split 8 ways, per_ffn 8x16 for 8 experts of rank 16.
 */
function rankCell(m: ModuleBudget, adapter: Adapter): string {
  const range = (lo: number, hi: number) => (lo === hi ? `${lo}` : `${lo}-${hi}`);
  if (m.experts === undefined) return range(m.minRank, m.maxRank);
  const split = adapter.moe?.placement === "per_module" ? m.experts : 1;
  const one = range(m.minRank / split, m.maxRank / split);
  return `${m.experts}x${m.minRank === m.maxRank ? one : `(${one})`}`;
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
  for (const m of budget.modules) rows.push([m.module, `${m.layers}`, rankCell(m, adapter), withThousands(m.params), share(m.params)]);
  if (adapter.router !== undefined || adapter.moe !== undefined) {
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
    fact("LoRA FLOPs/token", `${withThousands(budget.flopsPerToken.allEnabled)} with all enabled modules${adapter.moe ? " and experts" : ""}`),
    fact("", `${withThousands(budget.flopsPerToken.expected)} expected under routing`),
  ];
  const passes = budget.ffnPasses;
  if (passes !== undefined && passes.layers > 0) {
    // MixLoRA's real cost: down_proj's base product once per kept expert (docs/language.md).
    facts.push(
      fact("base FLOPs/token", `+${withThousands(passes.extraBaseFlops.expected)} expected: down_proj's base product runs ${passes.downProjRuns.expected} times per token in ${passes.layers} layers, not once`),
      fact("", `+${withThousands(passes.extraBaseFlops.allEnabled)} with all ${passes.downProjRuns.allEnabled} experts`),
    );
  }
  facts.push(fact("adapter memory", `${byteSize(budget.bytes.f32)} f32, ${byteSize(budget.bytes.f16)} f16`));
  return [title, `  ${c.dim(routerSummary(adapter))}`, ...aligned(rows, "  "), ...facts].join("\n");
}
