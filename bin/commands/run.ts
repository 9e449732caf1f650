// `milora run [SPEC_OR_PACKAGE] --base DIR [--adapter [NAME=]DIR ...] [--merged]`: runs a prompt on a
// base model, alone or once per adapter (tenants batched together), and reports each one's routing and
// the speed. The base comes from the spec or compiled package when one is given (see model-source.ts),
// else from DIR/config.json; a package runs its own plan and kernel files. `--beams N` decodes by beam
// search (runtime/engine/beam-search.ts, Hugging Face's meaning of num_beams, length_penalty, early_stopping and
// num_return_sequences); tokens/s then counts one token of the returned sequence per decode step.
import { detokenize } from "../../runtime/text/detokenizer.ts";
import { SingleBar } from "cli-progress";
import { existsSync, statSync } from "node:fs";
import { basename, resolve } from "node:path";
import { loadAdapter, type LoadedAdapter } from "../../runtime/formats/adapter.ts";
import { acquireDevice, adapterSummary } from "../../runtime/gpu/device.ts";
import { Engine } from "../../runtime/engine/engine.ts";
import { userError } from "../../runtime/errors.ts";
import { checkBeamOptions } from "../../runtime/engine/beam-search.ts";
import type { BeamSearchOptions, GenerateRequest, Generation } from "../../runtime/engine/requests.ts";
import type { LayerRouting } from "../../runtime/engine/routing.ts";
import { SequenceError, checkSampling, type SamplingOptions } from "../../runtime/engine/sequence.ts";
import { Tokenizer } from "../../runtime/text/tokenizer.ts";
import { requireHealthyDevice } from "./self-test.ts";
import { positionLimit } from "../../compiler/rope-scaling.ts";
import { adapterSpecOf, modelSource, planOptions, type ModelSource } from "./model-source.ts";
import { largestStoredRank, weightsFlag } from "../engine-plan.ts";
import { writeRoutingSvg } from "./routing-picture.ts";
import { deviceCalibration } from "../measure/calibration.ts";

export interface RunOptions {
  readonly base: string;
  readonly prompt?: string;
  readonly tokens?: string;
  readonly maxTokens: string;
  readonly temperature?: string;
  readonly topK?: string;
  readonly topP?: string;
  readonly seed?: string;
  readonly json?: boolean;
  readonly logits?: "last" | "all";
  readonly backend?: string;
  /** `[NAME=]DIR`, repeatable. */
  readonly adapter?: readonly string[];
  readonly merged?: boolean;
  /** `--weights f32|f16|q8|q4`: how the linear weights are stored on the device. */
  readonly weights?: string;
  readonly beams?: string;
  readonly lengthPenalty?: string;
  readonly earlyStopping?: string;
  readonly numReturnSequences?: string;
  /** Write the routing of every tenant as an SVG heatmap to this file. */
  readonly routingSvg?: string;
}

// Loads smaller than this finish before a bar would be worth drawing.
const PROGRESS_MIN_BYTES = 50 * 1024 * 1024;

/** Runs the prompt; a user error is thrown as a MiloraError (bin/cli.ts prints it). */
export async function runCommand(spec: string | undefined, opts: RunOptions): Promise<number> {
  const dir = opts.base;
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw userError("usage", `no model directory ${dir}`);
  const maxTokens = integer("--max-tokens", opts.maxTokens);
  const sampling = samplingOptions(opts);
  const beam = beamOptions(opts, sampling);
  if ((opts.prompt === undefined) === (opts.tokens === undefined)) throw userError("usage", "give exactly one of --prompt TEXT and --tokens IDS");

  const weights = weightsFlag(opts.weights);
  const source = modelSource(spec, dir);
  const { base } = source;
  const adapters = tenantNames((opts.adapter ?? []).map((arg) => readAdapter(arg, source)));
  if (opts.merged && adapters.length !== 1) throw userError("usage", "--merged folds exactly one adapter into the base: give one --adapter");
  const tokenizer = await Tokenizer.load(dir);
  let prompt: number[];
  if (opts.prompt !== undefined) {
    if (!tokenizer) throw userError("checkpoint", `${dir} has no tokenizer.json, so --prompt cannot be encoded: give token ids with --tokens`);
    prompt = tokenizer.encode(opts.prompt, { addBos: true });
  } else {
    prompt = tokenIds(opts.tokens!);
  }
  if (prompt.length === 0) throw userError("usage", "the prompt has no tokens");
  const limit = positionLimit(base);
  if (prompt.length > limit) throw userError("capacity", `the prompt has ${prompt.length} tokens, more than the base's ${limit} positions`);

  // The device before the plan: its calibration (milora bench --calibrate) sets the matvec row limit.
  const gpu = await acquireDevice(opts.backend === undefined ? {} : { backend: opts.backend });
  const bar = progressBar(opts.json === true);
  let engine: Engine;
  try {
    const calibration = deviceCalibration(gpu.report);
    engine = await Engine.load({
      base,
      checkpointDir: dir,
      gpu,
      checkDevice: requireHealthyDevice,
      ...planOptions(source, {
        // The cache holds this run and no more: one sequence of prompt + generated tokens per tenant.
        ctx: Math.min(limit, prompt.length + Math.max(1, maxTokens)),
        maxLoraRank: Math.max(1, largestStoredRank(adapters.map((a) => a.spec)) ?? 1),
        tenants: adapters.map((a) => a.spec),
        maxAdapters: adapters.length,
        checkpointDir: dir,
        ...(weights === undefined ? {} : { weights }),
        ...(calibration === undefined ? {} : { calibration }),
      }),
      maxSequences: Math.max(1, adapters.length) * (beam?.beams ?? 1),
      // One step holds every prompt (a longer one would be prefilled in chunks, which is slower).
      maxBatchRows: Math.max(256, prompt.length * Math.max(1, adapters.length)),
      maxAdapters: adapters.length,
      onProgress: bar.update,
    });
  } catch (e) {
    gpu.destroy();
    throw e;
  } finally {
    bar.stop();
  }
  try {
    for (const a of adapters) engine.loadAdapter(a.name, a);
    const request: GenerateRequest = {
      prompt,
      maxTokens,
      sampling,
      ...(opts.logits ? { logits: opts.logits } : {}),
      ...(tokenizer ? { stop: tokenizer.eosIds } : {}),
      ...(beam ? { beam } : {}),
    };
    let results: Generation[];
    if (opts.merged && beam) throw userError("usage", "--merged and --beams do not combine yet: drop one");
    if (opts.merged) results = [await runMerged(engine, adapters[0]!, request)];
    else if (adapters.length === 0) results = [await engine.generate(request)];
    else results = await engine.generateBatch(adapters.map((a) => ({ ...request, adapter: a.name })));
    const device = adapterSummary(engine.device);
    results.forEach((result, i) => {
      const tenant = adapters[i]?.name;
      // The tokenizer library refuses to decode nothing (--max-tokens 0).
      const decode = (tokens: readonly number[]) => tokenizer && detokenize((ids) => tokenizer.decode([...ids]), tokens);
      const text = decode(result.tokens);
      if (opts.json) printJson(result, text, device, prompt, tenant, decode);
      else printText(result, text, device, tenant, decode);
    });
    if (opts.routingSvg !== undefined) {
      const decodeOne = tokenizer && ((t: number) => tokenizer.decode([t]) || `<${t}>`);
      writeRoutingSvg(opts.routingSvg, results.map((result, i) => ({ tenant: adapters[i]?.name, result, ...(adapters[i] ? { spec: adapters[i].spec } : {}) })), prompt, decodeOne);
      process.stderr.write(`milora run: routing heatmap written to ${opts.routingSvg}\n`);
    }
    return 0;
  } finally {
    engine.destroy();
    gpu.destroy();
  }
}

/**
 * Merged mode: the prompt's routing is decided unmerged (the router needs the adapter), then the
 * LoRA is folded into the base weights for that decision and the generation runs the base kernels only.
 */
async function runMerged(engine: Engine, adapter: LoadedAdapter, request: GenerateRequest): Promise<Generation> {
  let routing: readonly LayerRouting[] | undefined;
  if (adapter.spec.router) {
    if (adapter.spec.router.when === "token") throw userError("usage", `adapter ${adapter.name} routes every token, which merged weights cannot express: drop --merged`);
    routing = (await engine.generate({ prompt: request.prompt, maxTokens: 0, adapter: adapter.name })).routing;
  }
  await engine.mergeAdapter(adapter.name, routing);
  const result = await engine.generate(request);
  return routing ? { ...result, routing } : result;
}

/** An --adapter `[NAME=]DIR`: checked against the source's adapter NAME (or its only one), else its own config. */
function readAdapter(arg: string, source: ModelSource): LoadedAdapter & { readonly dir: string } {
  const eq = arg.indexOf("=");
  const named = eq > 0 ? arg.slice(0, eq) : undefined;
  const dir = eq > 0 ? arg.slice(eq + 1) : arg;
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw userError("usage", `no adapter directory ${dir}`);
  const checked = adapterSpecOf(source, named, dir);
  const name = named ?? checked?.name ?? basename(resolve(dir));
  return { ...loadAdapter(dir, { name, base: source.base, ...(checked ? { spec: checked } : {}) }), dir };
}

/** Tenants named by their adapter; two of one spec adapter (e.g. two customers' weights) also by directory. */
function tenantNames(adapters: readonly (LoadedAdapter & { readonly dir: string })[]): LoadedAdapter[] {
  const count = (name: string) => adapters.filter((a) => a.name === name).length;
  const named = adapters.map(({ dir, ...a }) => (count(a.name) === 1 ? a : { ...a, name: `${a.name}:${basename(resolve(dir))}` }));
  const clash = named.find((a, i) => named.findIndex((b) => b.name === a.name) !== i);
  if (clash) throw userError("usage", `two --adapter options name tenant ${clash.name}: give their directories different names`);
  return named;
}

function integer(flag: string, text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw userError("usage", `${flag} must be an integer >= 0, got "${text}"`);
  return n;
}

function samplingOptions(opts: RunOptions): Required<SamplingOptions> {
  const number = (flag: string, text: string | undefined) => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (text.trim() === "" || !Number.isFinite(n)) throw userError("usage", `${flag} must be a number, got "${text}"`);
    return n;
  };
  const values = {
    temperature: number("--temperature", opts.temperature),
    topK: number("--top-k", opts.topK),
    topP: number("--top-p", opts.topP),
    seed: number("--seed", opts.seed),
  };
  try {
    return checkSampling(Object.fromEntries(Object.entries(values).filter(([, v]) => v !== undefined)));
  } catch (e) {
    if (!(e instanceof SequenceError)) throw e;
    throw userError("usage", e.message);
  }
}

/** --beams and its companions; undefined for greedy or sampled decoding (no --beams, or --beams 1 alone). */
function beamOptions(opts: RunOptions, sampling: Required<SamplingOptions>): Required<BeamSearchOptions> | undefined {
  const companions = opts.lengthPenalty !== "1" || opts.earlyStopping !== "false" || opts.numReturnSequences !== "1";
  if (opts.beams === undefined) {
    if (companions) throw userError("usage", "--length-penalty, --early-stopping and --num-return-sequences need --beams N");
    return undefined;
  }
  const beams = integer("--beams", opts.beams);
  if (beams === 1 && !companions) return undefined;
  if (sampling.temperature > 0) throw userError("usage", "--beams is deterministic search: leave --temperature out (beam sampling is not supported)");
  const lengthPenalty = Number(opts.lengthPenalty ?? "1");
  if ((opts.lengthPenalty ?? "1").trim() === "" || !Number.isFinite(lengthPenalty)) throw userError("usage", `--length-penalty must be a number, got "${opts.lengthPenalty}"`);
  const earlyStopping = opts.earlyStopping === "true" ? true : opts.earlyStopping === "never" ? "never" : false;
  try {
    return checkBeamOptions({ beams, lengthPenalty, earlyStopping, numReturnSequences: integer("--num-return-sequences", opts.numReturnSequences ?? "1") });
  } catch (e) {
    if (!(e instanceof SequenceError)) throw e;
    throw userError("usage", e.message.replace(/^beams/, "--beams").replace(/^num_return_sequences/, "--num-return-sequences"));
  }
}

function tokenIds(text: string): number[] {
  return text.split(",").map((part) => {
    const n = Number(part.trim());
    if (part.trim() === "" || !Number.isInteger(n) || n < 0) throw userError("usage", `--tokens must be comma-separated token ids, got "${part}"`);
    return n;
  });
}

/** A load progress bar on a terminal, drawn once the load proves large; inert otherwise. */
function progressBar(quiet: boolean) {
  let bar: SingleBar | undefined;
  return {
    update: (done: number, total: number) => {
      if (quiet || !process.stderr.isTTY || total < PROGRESS_MIN_BYTES) return;
      if (!bar) {
        bar = new SingleBar({ format: "loading weights [{bar}] {percentage}% {value}/{total} MiB", stream: process.stderr, hideCursor: true });
        bar.start(Math.round(total / 2 ** 20), 0);
      }
      bar.update(Math.round(done / 2 ** 20));
    },
    stop: () => bar?.stop(),
  };
}

function rates(r: Generation) {
  const t = r.timings;
  return {
    ...t,
    prefillTokensPerSecond: t.prefillMs > 0 ? (t.prefillTokens / t.prefillMs) * 1000 : 0,
    decodeTokensPerSecond: t.decodeMs > 0 ? (t.decodeTokens / t.decodeMs) * 1000 : 0,
    msPerToken: t.decodeSteps > 0 ? t.decodeMs / t.decodeSteps : 0,
  };
}

type Decode = (tokens: readonly number[]) => string | undefined;

function printJson(r: Generation, text: string | undefined, device: string, prompt: readonly number[], adapter: string | undefined, decode: Decode): void {
  const report = {
    ...(adapter === undefined ? {} : { adapter }),
    promptTokens: prompt,
    tokens: r.tokens,
    ...(text === undefined ? {} : { text }),
    finish: r.finish,
    ...(r.routing ? { routing: r.routing } : {}),
    timings: rates(r),
    ...(r.score === undefined ? {} : { score: r.score }),
    ...(r.beams && r.beams.length > 1
      ? { beams: r.beams.map((b) => ({ tokens: b.tokens, ...(decode(b.tokens) === undefined ? {} : { text: decode(b.tokens) }), score: b.score, finish: b.finish })) }
      : {}),
    device,
    ...(r.logits ? { logits: r.logits.map((row) => Array.from(row)) } : {}),
  };
  process.stdout.write(JSON.stringify(report) + "\n");
}

function printText(r: Generation, text: string | undefined, device: string, adapter: string | undefined, decode: Decode): void {
  const tag = adapter === undefined ? "" : `[${adapter}] `;
  if (r.beams && r.beams.length > 1) {
    // Every returned hypothesis, best first, with its score.
    for (const b of r.beams) process.stdout.write(`${tag}(${b.score.toFixed(4)}) ${decode(b.tokens) ?? b.tokens.join(" ")}\n`);
  } else {
    process.stdout.write(tag + (text ?? r.tokens.join(" ")) + "\n");
  }
  const t = rates(r);
  const lines = [
    ...(r.score === undefined ? [] : [`beam     best score ${r.score.toFixed(4)} (sum of log-probabilities / length ** length penalty)`]),
    ...routingLines(r.routing ?? []),
    `prefill  ${t.prefillTokens} tokens in ${t.prefillMs.toFixed(1)} ms (${t.prefillTokensPerSecond.toFixed(1)} tokens/s)`,
    `decode   ${t.decodeTokens} tokens in ${t.decodeMs.toFixed(1)} ms (${t.decodeTokensPerSecond.toFixed(1)} tokens/s, ${t.msPerToken.toFixed(2)} ms/token)`,
    `device   ${device}`,
  ];
  process.stderr.write(lines.join("\n") + "\n");
}

/** `layer 0  q_proj 0.62  v_proj 0.38` per decision; token routing shows the prompt's last position only. */
function routingLines(routing: readonly LayerRouting[]): string[] {
  const positions = routing.flatMap((d) => (d.position === undefined ? [] : [d.position]));
  const shown = positions.length === 0 ? routing : routing.filter((d) => d.position === Math.max(...positions));
  const title = positions.length === 0 ? "routing (prompt, reused for every token)" : `routing (per token; position ${Math.max(...positions)} shown)`;
  if (shown.length === 0) return [];
  return [
    title,
    ...shown.map((d) => `  layer ${String(d.layer).padEnd(3)} ${Object.entries(d.experts).map(([m, g]) => `${m} ${g.toFixed(2)}`).join("  ")}`),
  ];
}
