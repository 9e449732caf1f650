// `milora compile SPEC --out DIR`: checks the spec, then writes a runnable npm package for one of its
// adapters (manifest, kernels, typed API, README) into DIR, atomically.
import { existsSync } from "node:fs";
import { renderDiagnostic } from "../../grammar/code-frame.ts";
import { compilePackage, CompileError } from "../../compiler/emit/compile-package.ts";
import { OutputError, writePackage } from "../../compiler/emit/write-package.ts";
import { withSignalsDeferred } from "../signals.ts";

export interface CompileCommandOptions {
  readonly out: string;
  readonly adapter?: string;
  readonly name?: string;
  readonly pkgVersion?: string;
  readonly ctx?: string;
  readonly force?: boolean;
  readonly forceAny?: boolean;
  readonly color?: boolean;
}

export async function compileCommand(spec: string, opts: CompileCommandOptions): Promise<number> {
  if (!existsSync(spec)) {
    process.stderr.write(`milora compile: cannot read ${spec}: no such file\n`);
    return 2;
  }
  const ctx = opts.ctx === undefined ? undefined : Number(opts.ctx);
  if (ctx !== undefined && (!Number.isInteger(ctx) || ctx < 1)) {
    process.stderr.write(`milora compile: --ctx must be a positive integer, got "${opts.ctx}"\n`);
    return 2;
  }
  try {
    const result = compilePackage({
      spec,
      ...(opts.adapter === undefined ? {} : { adapter: opts.adapter }),
      ...(opts.name === undefined ? {} : { name: opts.name }),
      ...(opts.pkgVersion === undefined ? {} : { version: opts.pkgVersion }),
      ...(ctx === undefined ? {} : { ctx }),
    });
    for (const d of result.diagnostics) {
      process.stderr.write(renderDiagnostic(d, result.sources.get(d.span.file), { color: opts.color !== false && process.stderr.isTTY === true }) + "\n");
    }
    if (result.package === undefined) {
      const errors = result.diagnostics.filter((d) => d.severity === "error").length;
      process.stderr.write(`milora compile: ${spec} has ${errors} error${errors === 1 ? "" : "s"}; nothing written\n`);
      return 1;
    }
    // the spec, its imports and its config must survive: --out may never be a directory holding one
    const base = result.package.adapter.base;
    const keep = [...result.sources.keys(), ...(base.configPath === undefined ? [] : [base.configPath])];
    const files = result.package.files;
    await withSignalsDeferred(() => writePackage(opts.out, files, { force: opts.force === true, forceAny: opts.forceAny === true, keep }));
    const kernels = result.package.files.filter((f) => f.path.startsWith("kernels/")).length;
    process.stdout.write(`wrote ${opts.out}: adapter ${result.package.adapter.name}, ${kernels} kernels, ${result.package.files.length} files\n`);
    return 0;
  } catch (e) {
    if (!(e instanceof CompileError || e instanceof OutputError)) throw e;
    process.stderr.write(`milora compile: ${e.message}\n`);
    return 1;
  }
}
