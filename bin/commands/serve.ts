// `milora serve [SPEC_OR_PACKAGE] --base DIR [--adapter NAME=DIR]...`: an OpenAI-compatible server
// over a base model and its adapters, until SIGTERM or SIGINT, which drain the requests in flight. The
// base comes from the spec or package when one is given (see model-source.ts), and every adapter, at
// start or added later, is checked against the spec's adapter NAME (or its only one); without one,
// from DIR/config.json, with plain PEFT adapters.
import { existsSync, statSync } from "node:fs";
import { PlanError } from "../../compiler/plan.ts";
import { NoAdapterError, adapterSummary } from "../../runtime/device.ts";
import { EngineError } from "../../runtime/engine.ts";
import { CheckpointError } from "../../runtime/safetensors.ts";
import { startServing, type ServingSetup } from "../../runtime/server/start.ts";
import { SourceError, modelSource, servingOptions, type ModelSource } from "./model-source.ts";
import { DeviceSelfTestError, requireHealthyDevice } from "./self-test.ts";

export interface ServeOptions {
  readonly base: string;
  readonly adapter: readonly string[];
  readonly host: string;
  readonly port: string;
  readonly apiKey?: string;
  readonly maxSequences: string;
  readonly maxQueue: string;
  readonly maxAdapters: string;
  readonly ctx?: string;
  readonly backend?: string;
}

class UsageError extends Error {}

export async function serveCommand(source: string | undefined, opts: ServeOptions): Promise<number> {
  let setup;
  try {
    setup = settings(source, opts);
  } catch (e) {
    if (!(e instanceof UsageError || e instanceof SourceError)) throw e;
    process.stderr.write(`milora serve: ${e.message}\n`);
    return e instanceof SourceError ? e.code : 2;
  }
  let serving;
  try {
    serving = await startServing({ ...setup, checkDevice: requireHealthyDevice });
  } catch (e) {
    const userError = [CheckpointError, PlanError, EngineError, NoAdapterError, DeviceSelfTestError].some((c) => e instanceof c) || (e as NodeJS.ErrnoException).code === "EADDRINUSE";
    if (!userError) throw e;
    process.stderr.write(`milora serve: ${(e as Error).message}\n`);
    return 1;
  }
  const { server, engine } = serving;
  process.stderr.write(
    `milora serve: ${server.url}/v1 (model ${setup.base.name}${setup.adapters.length > 0 ? `, adapters ${setup.adapters.map(([n]) => n).join(", ")}` : ""})\n` +
      `  device ${adapterSummary(engine.device)}; ${setup.slots} slots of ${engine.plan.dims.ctx} positions\n` +
      (setup.apiKey === undefined ? "" : "  API key required on every route but /health\n"),
  );
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      process.stderr.write(`milora serve: ${signal}, finishing the requests in flight\n`);
      resolve();
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
  await serving.close();
  return 0;
}

function settings(sourcePath: string | undefined, opts: ServeOptions) {
  const dir = opts.base;
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new UsageError(`no model directory ${dir}`);
  const source = modelSource(sourcePath, dir);
  const adapters = opts.adapter.map((a) => {
    const at = a.indexOf("=");
    if (at < 1 || at === a.length - 1) throw new UsageError(`--adapter wants NAME=DIR, got "${a}"`);
    return [a.slice(0, at), a.slice(at + 1)] as const;
  });
  const apiKey = opts.apiKey ?? process.env.MILORA_API_KEY;
  return {
    base: source.base,
    checkpointDir: dir,
    adapters,
    host: opts.host,
    port: count("--port", opts.port, 0),
    slots: count("--max-sequences", opts.maxSequences, 1),
    maxQueue: count("--max-queue", opts.maxQueue, 0),
    maxResidentAdapters: count("--max-adapters", opts.maxAdapters, 1),
    ...sourceSettings(source, opts.ctx === undefined ? undefined : count("--ctx", opts.ctx, 2)),
    ...(apiKey ? { apiKey } : {}),
    ...(opts.backend === undefined ? {} : { backend: opts.backend }),
  };
}

/** The spec's or package's settings, and the context: a package's is fixed when it was compiled. */
function sourceSettings(source: ModelSource, ctx: number | undefined): Partial<ServingSetup> {
  const compiledCtx = source.package?.manifest.plan.dims.ctx;
  if (compiledCtx !== undefined && ctx !== undefined && ctx !== compiledCtx) {
    throw new UsageError(`${source.path} was compiled for ${compiledCtx} positions: leave out --ctx, or recompile it with --ctx ${ctx}`);
  }
  return { ...servingOptions(source), ...(ctx === undefined || compiledCtx !== undefined ? {} : { ctx }) };
}

function count(flag: string, text: string, min: number): number {
  const n = Number(text);
  if (text.trim() === "" || !Number.isInteger(n) || n < min) throw new UsageError(`${flag} must be an integer >= ${min}, got "${text}"`);
  return n;
}
