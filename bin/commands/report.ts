// `milora report OUT [--out FILE]`: the curves of a `milora train` run (OUT/metrics.jsonl) as an SVG,
// OUT/report.svg unless --out says otherwise, and a one-line summary.
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { userError } from "../../runtime/errors.ts";
import { parseMetrics, summarize, trainingReportSvg } from "../../runtime/pictures/training.ts";

export interface ReportOptions {
  readonly out?: string;
}

/** Draws the report; a user error is thrown as a MiloraError (bin/cli.ts prints it). */
export function reportCommand(dir: string, opts: ReportOptions): number {
  const file = existsSync(dir) && statSync(dir).isFile() ? dir : join(dir, "metrics.jsonl");
  if (!existsSync(file)) throw userError("usage", `no ${file}: give the --out directory of a milora train run (or its metrics.jsonl)`);
  const lines = parseMetrics(readFileSync(file, "utf8"), file);
  if (lines.length === 0) throw userError("data", `${file} has no steps yet`);
  const runDir = file === dir ? resolve(dir, "..") : dir;
  const out = opts.out ?? join(runDir, "report.svg");
  writeFileSync(out, trainingReportSvg(lines, basename(resolve(runDir))));
  const s = summarize(lines);
  process.stdout.write(
    `${s.steps} steps, last loss ${s.lastLoss?.toFixed(4) ?? "-"}` +
      (s.bestEval ? `, best eval loss ${s.bestEval.loss.toFixed(4)} at step ${s.bestEval.step} (${s.evals} evaluations)` : ", no evaluation") +
      `\nwrote ${out}\n`,
  );
  return 0;
}
