// `milora run [SPEC] --base DIR`: runs a prompt on a base model and reports the speed. The base comes
// from the spec when one is given (and must agree with the checkpoint), else from DIR/config.json.
import { SingleBar } from "cli-progress";
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { renderDiagnostic } from "../../grammar/code-frame.ts";
import { BASE_KEYS, BASE_KEY_NAMES } from "../../compiler/base-keys.ts";
import { checkFiles } from "../../compiler/check.ts";
import { readHfConfig } from "../../compiler/hf-config.ts";
import type { BaseModel } from "../../compiler/model.ts";
import { PlanError } from "../../compiler/plan.ts";
import { CONFIG_FILE } from "../../runtime/checkpoint.ts";
import { NoAdapterError, adapterSummary } from "../../runtime/device.ts";
import { Engine, EngineError } from "../../runtime/engine.ts";
import type { Generation } from "../../runtime/generate.ts";
import { CheckpointError } from "../../runtime/safetensors.ts";
import { SequenceError, checkSampling, type SamplingOptions } from "../../runtime/sequence.ts";
import { Tokenizer } from "../../runtime/tokenizer.ts";

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
}

/** A problem with what the user asked for; `code` is the exit status (1 bad input, 2 bad usage). */
class RunError extends Error {
  constructor(
    message: string,
    readonly code: 1 | 2,
  ) {
    super(message);
  }
}

// Loads smaller than this finish before a bar would be worth drawing.
const PROGRESS_MIN_BYTES = 50 * 1024 * 1024;

export async function runCommand(spec: string | undefined, opts: RunOptions): Promise<number> {
  try {
    return await run(spec, opts);
  } catch (e) {
    if (e instanceof RunError) {
      process.stderr.write(`milora run: ${e.message}\n`);
      return e.code;
    }
    const userError = [CheckpointError, PlanError, EngineError, SequenceError, NoAdapterError].some((c) => e instanceof c);
    if (!userError) throw e;
    process.stderr.write(`milora run: ${(e as Error).message}\n`);
    return 1;
  }
}

async function run(spec: string | undefined, opts: RunOptions): Promise<number> {
  const dir = opts.base;
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new RunError(`no model directory ${dir}`, 1);
  const maxTokens = integer("--max-tokens", opts.maxTokens);
  const sampling = samplingOptions(opts);
  if ((opts.prompt === undefined) === (opts.tokens === undefined)) throw new RunError("give exactly one of --prompt TEXT and --tokens IDS", 2);

  const base = spec === undefined ? baseOfDirectory(dir) : baseOfSpec(spec, dir);
  const tokenizer = await Tokenizer.load(dir);
  let prompt: number[];
  if (opts.prompt !== undefined) {
    if (!tokenizer) throw new RunError(`${dir} has no tokenizer.json, so --prompt cannot be encoded: give token ids with --tokens`, 1);
    prompt = tokenizer.encode(opts.prompt, { addBos: true });
  } else {
    prompt = tokenIds(opts.tokens!);
  }
  if (prompt.length === 0) throw new RunError("the prompt has no tokens", 2);
  if (prompt.length > base.maxPositions) throw new RunError(`the prompt has ${prompt.length} tokens, more than max_positions ${base.maxPositions}`, 1);

  const bar = progressBar(opts.json === true);
  let engine: Engine;
  try {
    engine = await Engine.load({
      base,
      checkpointDir: dir,
      // The cache holds this run and no more: one sequence of prompt + generated tokens.
      ctx: Math.min(base.maxPositions, prompt.length + Math.max(1, maxTokens)),
      maxSequences: 1,
      onProgress: bar.update,
      ...(opts.backend === undefined ? {} : { backend: opts.backend }),
    });
  } finally {
    bar.stop();
  }
  try {
    const result = await engine.generate({
      prompt,
      maxTokens,
      sampling,
      ...(opts.logits ? { logits: opts.logits } : {}),
      ...(tokenizer ? { stop: tokenizer.eosIds } : {}),
    });
    const text = tokenizer?.decode(result.tokens);
    if (opts.json) printJson(result, text, adapterSummary(engine.device), prompt);
    else printText(result, text, adapterSummary(engine.device));
    return 0;
  } finally {
    engine.destroy();
  }
}

function baseOfDirectory(dir: string): BaseModel {
  try {
    return readHfConfig(dir);
  } catch (e) {
    throw new RunError((e as Error).message, 1);
  }
}

/** The spec's single base, refused when DIR/config.json disagrees with it on any hyper-parameter. */
function baseOfSpec(spec: string, dir: string): BaseModel {
  if (!existsSync(spec)) throw new RunError(`cannot read ${spec}: no such file`, 2);
  const { program, diagnostics, sources } = checkFiles([spec]);
  const errors = diagnostics.filter((d) => d.severity === "error");
  if (errors.length > 0) {
    for (const d of errors) process.stderr.write(renderDiagnostic(d, sources.get(d.span.file) ?? "") + "\n");
    throw new RunError(`${spec} has ${errors.length} error${errors.length === 1 ? "" : "s"}`, 1);
  }
  const [base, ...more] = program.bases;
  if (!base || more.length > 0) throw new RunError(`${spec} defines ${program.bases.length} bases; milora run needs exactly one`, 1);
  if (existsSync(join(dir, CONFIG_FILE))) {
    const config = baseOfDirectory(dir);
    const differences = BASE_KEY_NAMES.filter((k) => base[BASE_KEYS[k].field] !== config[BASE_KEYS[k].field]).map(
      (k) => `${k} ${String(base[BASE_KEYS[k].field])} in the spec, ${String(config[BASE_KEYS[k].field])} in ${join(dir, CONFIG_FILE)}`,
    );
    if (differences.length > 0) throw new RunError(`base ${base.name} of ${spec} does not match ${dir}: ${differences.join("; ")}`, 1);
  }
  return base;
}

function integer(flag: string, text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw new RunError(`${flag} must be an integer >= 0, got "${text}"`, 2);
  return n;
}

function samplingOptions(opts: RunOptions): Required<SamplingOptions> {
  const number = (flag: string, text: string | undefined) => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (text.trim() === "" || !Number.isFinite(n)) throw new RunError(`${flag} must be a number, got "${text}"`, 2);
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
    throw new RunError((e as Error).message, 2);
  }
}

function tokenIds(text: string): number[] {
  return text.split(",").map((part) => {
    const n = Number(part.trim());
    if (part.trim() === "" || !Number.isInteger(n) || n < 0) throw new RunError(`--tokens must be comma-separated token ids, got "${part}"`, 2);
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

function printJson(r: Generation, text: string | undefined, device: string, prompt: readonly number[]): void {
  const report = {
    promptTokens: prompt,
    tokens: r.tokens,
    ...(text === undefined ? {} : { text }),
    finish: r.finish,
    timings: rates(r),
    device,
    ...(r.logits ? { logits: r.logits.map((row) => Array.from(row)) } : {}),
  };
  process.stdout.write(JSON.stringify(report) + "\n");
}

function printText(r: Generation, text: string | undefined, device: string): void {
  process.stdout.write((text ?? r.tokens.join(" ")) + "\n");
  const t = rates(r);
  const lines = [
    `prefill  ${t.prefillTokens} tokens in ${t.prefillMs.toFixed(1)} ms (${t.prefillTokensPerSecond.toFixed(1)} tokens/s)`,
    `decode   ${t.decodeTokens} tokens in ${t.decodeMs.toFixed(1)} ms (${t.decodeTokensPerSecond.toFixed(1)} tokens/s, ${t.msPerToken.toFixed(2)} ms/token)`,
    `device   ${device}`,
  ];
  process.stderr.write(lines.join("\n") + "\n");
}
