// `milora serve [SPEC_OR_PACKAGE] --base DIR [--adapter NAME=DIR]...`: an OpenAI-compatible server
// over a base model and its adapters, until SIGTERM or SIGINT: the first stops adapter reads and drains
// the requests in flight (for SHUTDOWN_GRACE_MS at most), then exits; a second exits at once. The
// base comes from the spec or package when one is given (see model-source.ts), and every adapter, at
// start or added later, is checked against the spec's adapter NAME (or its only one); without one,
// from DIR/config.json, with plain PEFT adapters.
import { existsSync, statSync } from "node:fs";
import { userError } from "../../runtime/errors.ts";
import { acquireDevice, adapterSummary } from "../../runtime/gpu/device.ts";
import { startServing, type ServingSetup } from "../../runtime/serving/http/start.ts";
import { servingPlan, weightsFlag, type EnginePlan } from "../engine-plan.ts";
import type { Adapter } from "../../compiler/model.ts";
import { checkPackageWeights, modelSource, servingOptions, type ModelSource } from "./model-source.ts";
import type { WeightFormat } from "../../runtime/package/format.ts";
import { requireHealthyDevice } from "./self-test.ts";
import { deviceCalibration } from "../measure/calibration.ts";

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
  readonly allowAdapterLoading?: boolean;
  readonly adapterRoot?: string;
  readonly adapterLoadTimeout?: string;
  readonly headersTimeout?: string;
  readonly requestTimeout?: string;
  readonly maxConnections?: string;
  /** False with --no-ui: no page at /. */
  readonly ui?: boolean;
  readonly servedModelName?: string;
  readonly chatTemplate?: string;
  readonly corsOrigin?: readonly string[];
  /** False with --no-access-log. */
  readonly accessLog?: boolean;
  readonly maxBatchRows?: string;
  /** `--weights f32|f16|q8|q4`: how the linear weights are stored on the device. */
  readonly weights?: string;
}

/** How long the first signal waits for requests in flight before exiting anyway. */
const SHUTDOWN_GRACE_MS = 30_000;

/** Serves until a signal; a user error is thrown as a MiloraError (bin/cli.ts prints it). */
export async function serveCommand(source: string | undefined, opts: ServeOptions): Promise<number> {
  const setup = settings(source, opts);
  const { compiled, ...rest } = setup;
  // Planning happens here, in the CLI: a package's plan and kernel files, else a plan for the spec's sizes
  // and the device's calibration (milora bench --calibrate). The device lives as long as the process.
  const gpu = await acquireDevice(setup.backend === undefined ? {} : { backend: setup.backend });
  const calibration = compiled ? undefined : deviceCalibration(gpu.report);
  const planned = compiled ?? servingPlan({ ...setup, ...(calibration === undefined ? {} : { calibration }) });
  const serving = await startServing({ ...rest, gpu, engine: planned, checkDevice: requireHealthyDevice });
  const { server, engine } = serving;
  process.stderr.write(
    `milora serve: ${server.url}/v1 (model ${setup.servedModelName ?? setup.base.name}${setup.adapters.length > 0 ? `, adapters ${setup.adapters.map(([n]) => n).join(", ")}` : ""})\n` +
      `  device ${adapterSummary(engine.device)}; ${setup.slots} slots of ${engine.plan.dims.ctx} positions\n` +
      (setup.apiKey === undefined ? "" : "  API key required on every route but /health\n") +
      (setup.ui === false ? "" : `  page ${server.url}/${setup.apiKey === undefined ? "" : " (the API key as password)"}\n`) +
      (setup.adapterRoot === undefined ? "" : `  run-time adapter loading on, from ${setup.adapterRoot}\n`),
  );
  let stopping = false;
  await new Promise<void>((resolve) => {
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) {
        process.stderr.write(`milora serve: ${signal} again, exiting now\n`);
        process.exit(signal === "SIGINT" ? 130 : 143);
      }
      stopping = true;
      process.stderr.write(`milora serve: ${signal}, finishing the requests in flight (${signal} again exits at once)\n`);
      resolve();
    };
    process.on("SIGTERM", onSignal);
    process.on("SIGINT", onSignal);
  });
  const graceOver = new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), SHUTDOWN_GRACE_MS).unref());
  if ((await Promise.race([serving.close(), graceOver])) === "timeout") {
    process.stderr.write(`milora serve: requests still running after ${SHUTDOWN_GRACE_MS / 1000} s, exiting anyway\n`);
    process.exit(1);
  }
  // Everything is closed; should anything still hold the event loop (a device callback), exit regardless.
  setTimeout(() => process.exit(0), 2000).unref();
  return 0;
}

function settings(sourcePath: string | undefined, opts: ServeOptions) {
  const dir = opts.base;
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw userError("usage", `no model directory ${dir}`);
  const source = modelSource(sourcePath, dir);
  const adapters = opts.adapter.map((a) => {
    const at = a.indexOf("=");
    if (at < 1 || at === a.length - 1) throw userError("usage", `--adapter wants NAME=DIR, got "${a}"`);
    return [a.slice(0, at), a.slice(at + 1)] as const;
  });
  const apiKey = opts.apiKey ?? process.env.MILORA_API_KEY;
  // An empty key would mean no authentication at all, which nobody asking for a key wants.
  if (apiKey !== undefined && apiKey.trim() === "") {
    throw userError("usage", `${opts.apiKey === undefined ? "MILORA_API_KEY" : "--api-key"} is empty: give a non-empty key, or leave it out to serve without authentication`);
  }
  if (opts.allowAdapterLoading && opts.adapterRoot === undefined) {
    throw userError("usage", "--allow-adapter-loading needs --adapter-root DIR: the directory run-time adapters must lie in");
  }
  if (!opts.allowAdapterLoading && opts.adapterRoot !== undefined) throw userError("usage", "--adapter-root is used only with --allow-adapter-loading");
  if (opts.adapterRoot !== undefined && (!existsSync(opts.adapterRoot) || !statSync(opts.adapterRoot).isDirectory())) {
    throw userError("usage", `--adapter-root ${opts.adapterRoot} is not a directory`);
  }
  const seconds = (flag: string, text: string | undefined, fallback: number) => 1000 * (text === undefined ? fallback : count(flag, text, 1));
  return {
    base: source.base,
    checkpointDir: dir,
    adapters,
    host: opts.host,
    port: count("--port", opts.port, 0),
    slots: count("--max-sequences", opts.maxSequences, 1),
    maxQueue: count("--max-queue", opts.maxQueue, 0),
    maxResidentAdapters: count("--max-adapters", opts.maxAdapters, 1),
    ...sourceSettings(source, opts.ctx === undefined ? undefined : count("--ctx", opts.ctx, 2), weightsFlag(opts.weights)),
    ...(apiKey === undefined ? {} : { apiKey }),
    ...(opts.adapterRoot === undefined ? {} : { adapterRoot: opts.adapterRoot }),
    adapterReadTimeoutMs: seconds("--adapter-load-timeout", opts.adapterLoadTimeout, 60),
    headersTimeoutMs: seconds("--headers-timeout", opts.headersTimeout, 10),
    requestTimeoutMs: seconds("--request-timeout", opts.requestTimeout, 30),
    maxConnections: opts.maxConnections === undefined ? 512 : count("--max-connections", opts.maxConnections, 1),
    ...(opts.ui === false ? { ui: false } : {}),
    ...(opts.servedModelName === undefined ? {} : { servedModelName: opts.servedModelName }),
    ...(opts.chatTemplate === undefined ? {} : { chatTemplateFile: opts.chatTemplate }),
    ...(opts.corsOrigin && opts.corsOrigin.length > 0 ? { corsOrigins: opts.corsOrigin } : {}),
    ...(opts.accessLog === false ? {} : { accessLog: (line: string) => process.stderr.write(`milora serve: ${line}\n`) }),
    ...(opts.maxBatchRows === undefined ? {} : { maxBatchRows: count("--max-batch-rows", opts.maxBatchRows, 1) }),
    ...(opts.backend === undefined ? {} : { backend: opts.backend }),
  };
}

/** Serving settings before planning: what the plan is sized by, or a package's plan. */
type PlannedSetup = Omit<ServingSetup, "engine"> & {
  readonly ctx?: number;
  readonly maxLoraRank?: number;
  readonly weights?: WeightFormat;
  readonly compiled?: EnginePlan;
  /** The spec's per-token baseline, whose MoE kernels the plan must hold. */
  readonly moeSpec?: Adapter;
};

/** The spec's or package's settings, and the context: a package's is fixed when it was compiled. */
function sourceSettings(source: ModelSource, ctx: number | undefined, weights: WeightFormat | undefined): Partial<PlannedSetup> {
  checkPackageWeights(source, weights);
  const compiledCtx = source.package?.manifest.plan.dims.ctx;
  if (compiledCtx !== undefined && ctx !== undefined && ctx !== compiledCtx) {
    throw userError("usage", `${source.path} was compiled for ${compiledCtx} positions: leave out --ctx, or recompile it with --ctx ${ctx}`);
  }
  return { ...servingOptions(source), ...(ctx === undefined || compiledCtx !== undefined ? {} : { ctx }), ...(weights === undefined ? {} : { weights }) };
}

function count(flag: string, text: string, min: number): number {
  const n = Number(text);
  if (text.trim() === "" || !Number.isInteger(n) || n < min) throw userError("usage", `${flag} must be an integer >= ${min}, got "${text}"`);
  return n;
}
