// `milora compile SPEC --out DIR`: checks the spec, then writes a runnable npm package for one of its
// adapters (manifest, kernels, typed API, README) into DIR, atomically.
import { existsSync } from "node:fs";
import { renderDiagnostic } from "../../grammar/code-frame.ts";
import { compilePackage } from "../../compiler/emit/compile-package.ts";
import { writePackage } from "../../compiler/emit/write-package.ts";
import { userError } from "../../runtime/errors.ts";
import { withSignalsDeferred } from "../signals.ts";
import { weightsFlag } from "../engine-plan.ts";
import { readCalibration } from "../measure/calibration.ts";

export interface CompileCommandOptions {
  readonly out: string;
  readonly adapter?: string;
  readonly name?: string;
  readonly pkgVersion?: string;
  readonly ctx?: string;
  /** `--weights f32|f16|q8|q4` (default: the spec's `weights`, else f32). */
  readonly weights?: string;
  /** A calibration file (`milora bench --calibrate` on the device the package is for): its matvec row limits. */
  readonly calibration?: string;
  readonly force?: boolean;
  readonly forceAny?: boolean;
  readonly color?: boolean;
}

/** Compiles; a user error is thrown as a MiloraError (bin/cli.ts prints it). */
export async function compileCommand(spec: string, opts: CompileCommandOptions): Promise<number> {
  if (!existsSync(spec)) throw userError("usage", `cannot read ${spec}: no such file`);
  const ctx = opts.ctx === undefined ? undefined : Number(opts.ctx);
  if (ctx !== undefined && (!Number.isInteger(ctx) || ctx < 1)) throw userError("usage", `--ctx must be a positive integer, got "${opts.ctx}"`);
  const weights = weightsFlag(opts.weights);
  const calibration = opts.calibration === undefined ? undefined : readCalibration(opts.calibration);
  const result = compilePackage({
    spec,
    ...(opts.adapter === undefined ? {} : { adapter: opts.adapter }),
    ...(opts.name === undefined ? {} : { name: opts.name }),
    ...(opts.pkgVersion === undefined ? {} : { version: opts.pkgVersion }),
    ...(ctx === undefined ? {} : { ctx }),
    ...(weights === undefined ? {} : { weights }),
    ...(calibration === undefined ? {} : { matvecMaxRows: Object.fromEntries(calibration.formats.map((f) => [f.weights, f.matvecMaxRows])) }),
  });
  for (const d of result.diagnostics) {
    process.stderr.write(renderDiagnostic(d, result.sources.get(d.span.file), { color: opts.color !== false && process.stderr.isTTY === true }) + "\n");
  }
  if (result.package === undefined) {
    const errors = result.diagnostics.filter((d) => d.severity === "error").length;
    throw userError("spec", `${spec} has ${errors} error${errors === 1 ? "" : "s"}; nothing written`);
  }
  // the spec, its imports and its config must survive: --out may never be a directory holding one
  const base = result.package.adapter.base;
  const keep = [...result.sources.keys(), ...(base.configPath === undefined ? [] : [base.configPath])];
  const files = result.package.files;
  await withSignalsDeferred(() => writePackage(opts.out, files, { force: opts.force === true, forceAny: opts.forceAny === true, keep }));
  const kernels = result.package.files.filter((f) => f.path.startsWith("kernels/")).length;
  process.stdout.write(`wrote ${opts.out}: adapter ${result.package.adapter.name}, ${kernels} kernels, ${result.package.files.length} files\n`);
  return 0;
}
