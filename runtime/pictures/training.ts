// Training curves from `milora train`'s OUT/metrics.jsonl (one line per optimizer step, eval_loss at
// the steps that evaluate): the loss (with its language-model and balance parts when a router adds
// one) and the eval loss against the step, then the learning rate and the gradient norm, stacked in
// one SVG.
import { lineChartSvg, type LineSeries } from "./charts.ts";
import { FONT, el, text } from "./svg.ts";
import { userError } from "../errors.ts";

/** The fields of a metrics.jsonl line that the report reads. */
export interface MetricsLine {
  readonly step: number;
  readonly epoch?: number;
  readonly loss?: number;
  readonly lm_loss?: number;
  readonly balance_loss?: number;
  readonly lr?: number;
  readonly grad_norm?: number;
  readonly tokens_per_s?: number;
  readonly eval_loss?: number;
}

/** Parses metrics.jsonl; a line that is not a JSON object with a numeric step throws, naming the line. */
export function parseMetrics(jsonl: string, file = "metrics.jsonl"): MetricsLine[] {
  return jsonl
    .split("\n")
    .map((line, i) => [line.trim(), i + 1] as const)
    .filter(([line]) => line !== "")
    .map(([line, n]) => {
      let m: unknown;
      try {
        m = JSON.parse(line);
      } catch (e) {
        throw userError("data", `${file}:${n}: not JSON: ${(e as Error).message}`);
      }
      if (typeof m !== "object" || m === null || typeof (m as MetricsLine).step !== "number") throw userError("data", `${file}:${n}: a metrics line needs a numeric "step"`);
      return m as MetricsLine;
    });
}

export interface TrainingSummary {
  readonly steps: number;
  readonly lastLoss: number | undefined;
  readonly bestEval: { readonly step: number; readonly loss: number } | undefined;
  readonly evals: number;
}

export function summarize(lines: readonly MetricsLine[]): TrainingSummary {
  const evals = lines.filter((l) => typeof l.eval_loss === "number");
  const best = evals.reduce<MetricsLine | undefined>((b, l) => (b === undefined || l.eval_loss! < b.eval_loss! ? l : b), undefined);
  return {
    steps: lines.length,
    lastLoss: lines.findLast((l) => typeof l.loss === "number")?.loss,
    bestEval: best && { step: best.step, loss: best.eval_loss! },
    evals: evals.length,
  };
}

function series(name: string, lines: readonly MetricsLine[], key: keyof MetricsLine): LineSeries | undefined {
  const points = lines.filter((l) => typeof l[key] === "number" && Number.isFinite(l[key])).map((l) => [l.step, l[key] as number] as [number, number]);
  return points.length === 0 ? undefined : { name, points };
}

/** The report: losses against the step, then the learning rate, then the gradient norm. */
export function trainingReportSvg(lines: readonly MetricsLine[], title = "Training"): string {
  const width = 720;
  const height = 300;
  const hasBalance = lines.some((l) => (l.balance_loss ?? 0) !== 0);
  const losses = [
    series("train loss", lines, "loss"),
    ...(hasBalance ? [series("language-model loss", lines, "lm_loss"), series("balance loss", lines, "balance_loss")] : []),
    series("eval loss", lines, "eval_loss"),
  ].filter((s): s is LineSeries => s !== undefined);
  const s = summarize(lines);
  const charts = [
    lineChartSvg({
      title: `${title}: loss`,
      subtitle: `${s.steps} steps${s.bestEval ? `; best eval loss ${s.bestEval.loss.toFixed(4)} at step ${s.bestEval.step}` : ""}`,
      xLabel: "step",
      yLabel: "loss",
      series: losses,
      zeroY: false,
      width,
      height,
    }),
    lineChartSvg({ title: "Learning rate", xLabel: "step", yLabel: "lr", series: [series("lr", lines, "lr")].filter((x): x is LineSeries => x !== undefined), width, height: 220 }),
    lineChartSvg({ title: "Gradient norm (before clipping)", xLabel: "step", yLabel: "global norm", series: [series("grad norm", lines, "grad_norm")].filter((x): x is LineSeries => x !== undefined), width, height: 220 }),
  ];
  // Nested <svg> documents, one below the other.
  let y = 0;
  const nested = charts.map((svg) => {
    const h = Number(/height="(\d+)"/.exec(svg)![1]);
    const placed = svg.trimEnd().replace(/^<svg /, `<svg x="0" y="${y}" `);
    y += h;
    return placed;
  });
  return (
    el(
      "svg",
      { xmlns: "http://www.w3.org/2000/svg", width, height: y, viewBox: `0 0 ${width} ${y}`, role: "img", "aria-label": `${title}: training curves`, "font-family": FONT, class: "milora-training-report" },
      el("title", {}, text(`${title}: training curves`)),
      ...nested,
    ) + "\n"
  );
}
