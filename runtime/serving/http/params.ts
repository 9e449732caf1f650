// The fields of /v1/completions and /v1/chat/completions bodies, checked one by one: every bad field
// is a 400 naming it (OpenAI's `param`), never an exception from deep inside.
import { badRequest } from "./errors.ts";
import type { ChatMessage } from "./chat-template.ts";

/** The sampling procedure's fields (the engine's SamplingOptions, less the seed, which is per choice). */
export interface SamplingParams {
  readonly temperature: number;
  readonly topP: number;
  /** 0: no limit (vLLM's -1 and 0 both mean that). */
  readonly topK: number;
  /** 0: off. Tokens whose probability is below minP times the most likely token's are dropped. */
  readonly minP: number;
  readonly presencePenalty: number;
  readonly frequencyPenalty: number;
  /** 1: off. vLLM's (and Hugging Face's) multiplicative penalty on tokens of the prompt and the output. */
  readonly repetitionPenalty: number;
  /** Token id -> value added to its logit (-100..100). */
  readonly logitBias: ReadonlyMap<number, number>;
}

/** What both endpoints share once checked. */
export interface GenerationParams extends SamplingParams {
  readonly model: string;
  /** Absent: as many as the context holds. */
  readonly maxTokens?: number;
  /** Absent: a fresh one per request. Choice i samples with seed + i. */
  readonly seed?: number;
  /** Parallel choices sharing the prompt's prefill, KV cache and routing decision. */
  readonly n: number;
  readonly stop: readonly string[];
  /** vLLM's extension: token ids that end a choice (kept in its token ids, not in its text). */
  readonly stopTokenIds: readonly number[];
  /** vLLM's extension: the stop string that ended a choice stays in its text. */
  readonly includeStopStrInOutput: boolean;
  readonly stream: boolean;
  readonly includeUsage: boolean;
  /** vLLM's extension: keep going past end-of-sequence tokens (benchmarks use it for fixed lengths). */
  readonly ignoreEos: boolean;
  /** Per token: undefined for no logprobs, else how many of the most likely tokens come with the sampled one's. */
  readonly logprobs?: number;
  /** vLLM's use_beam_search: the n best of `beams` hypotheses. */
  readonly beam?: BeamParams;
}

export interface BeamParams {
  readonly beams: number;
  readonly lengthPenalty: number;
  readonly earlyStopping: boolean | "never";
}

export interface CompletionParams extends GenerationParams {
  readonly prompt: string | readonly number[];
  /** The prompt's text comes back before the completion. */
  readonly echo: boolean;
}

export interface ChatParams extends GenerationParams {
  readonly messages: readonly ChatMessage[];
}

/** Most top logprobs per token (vLLM's default --max-logprobs is 20, OpenAI's chat API's limit too). */
export const MAX_LOGPROBS = 20;

type Body = Record<string, unknown>;

/** Fields both endpoints take (honoured, each; docs/serving.md says how). */
const COMMON_FIELDS = [
  "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
  "logit_bias", "seed", "n", "stop", "stop_token_ids", "include_stop_str_in_output", "stream", "stream_options", "ignore_eos", "user",
  "logprobs", "best_of", "use_beam_search", "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
  "min_tokens", "skip_special_tokens", "length_penalty", "early_stopping", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
];
const COMPLETION_FIELDS = new Set([...COMMON_FIELDS, "prompt", "echo", "suffix"]);
const CHAT_FIELDS = new Set([...COMMON_FIELDS, "messages", "max_completion_tokens", "top_logprobs"]);

export function completionParams(body: unknown): CompletionParams {
  const b = object(body, COMPLETION_FIELDS);
  if (b.suffix !== undefined && b.suffix !== null && b.suffix !== "") throw badRequest("`suffix` (insertion) is not supported", "suffix");
  const common = commonParams(b, "max_tokens", 16);
  const echo = boolean(b, "echo");
  // OpenAI's completions API: logprobs is the number of top tokens (0 for only the sampled one's).
  const lp = optionalNumber(b, "logprobs");
  if (lp !== undefined && (!Number.isInteger(lp) || lp < 0 || lp > MAX_LOGPROBS)) throw badRequest(`\`logprobs\` must be an integer from 0 to ${MAX_LOGPROBS}`, "logprobs");
  if (echo && lp !== undefined) throw badRequest("`echo` with `logprobs` would need the prompt's logprobs, which this server does not compute", "echo");
  return { ...common, ...(lp === undefined ? {} : { logprobs: lp }), prompt: prompt(b.prompt), echo };
}

export function chatParams(body: unknown): ChatParams {
  const b = object(body, CHAT_FIELDS);
  // The newer name wins, as in OpenAI's API.
  const field = b.max_completion_tokens !== undefined && b.max_completion_tokens !== null ? "max_completion_tokens" : "max_tokens";
  const common = commonParams(b, field, undefined);
  // The chat API: logprobs true/false, and top_logprobs (0..20) of the most likely tokens with them.
  const on = boolean(b, "logprobs");
  const top = optionalNumber(b, "top_logprobs");
  if (top !== undefined && (!Number.isInteger(top) || top < 0 || top > MAX_LOGPROBS)) throw badRequest(`\`top_logprobs\` must be an integer from 0 to ${MAX_LOGPROBS}`, "top_logprobs");
  if (top !== undefined && top > 0 && !on) throw badRequest("`top_logprobs` needs `logprobs: true`", "top_logprobs");
  return { ...common, ...(on ? { logprobs: top ?? 0 } : {}), messages: messages(b.messages) };
}

function object(body: unknown, known: ReadonlySet<string>): Body {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw badRequest("the request body must be a JSON object");
  // No field is silently ignored: one this server does not know is a 400 naming it.
  for (const key of Object.keys(body)) {
    if (!known.has(key)) throw badRequest(`\`${key}\` is not a field this server supports (docs/serving.md lists every field)`, key, "unsupported_field");
  }
  return body as Body;
}

function unsupported(field: string, why: string): never {
  throw badRequest(`\`${field}\` is not supported: ${why}`, field, "unsupported_field");
}

function commonParams(b: Body, maxTokensField: string, defaultMaxTokens: number | undefined): GenerationParams {
  if (typeof b.model !== "string" || b.model === "") throw badRequest("`model` must be a model id from GET /v1/models", "model");
  // Constrained decoding does not exist yet: structured output and tool calls are refused, never faked.
  const rf = b.response_format as { type?: unknown } | null | undefined;
  if (rf !== undefined && rf !== null && !(typeof rf === "object" && rf.type === "text")) {
    unsupported("response_format", "structured output needs constrained decoding, which this server does not have yet (only {\"type\": \"text\"})");
  }
  for (const f of ["guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"]) {
    if (b[f] !== undefined && b[f] !== null) unsupported(f, "guided decoding needs constrained decoding, which this server does not have yet");
  }
  if (Array.isArray(b.tools) ? b.tools.length > 0 : b.tools !== undefined && b.tools !== null) unsupported("tools", "tool calls need constrained decoding, which this server does not have yet");
  if (b.tool_choice !== undefined && b.tool_choice !== null && b.tool_choice !== "none") unsupported("tool_choice", "no tools can be called (only \"none\")");
  if (b.parallel_tool_calls !== undefined && b.parallel_tool_calls !== null) unsupported("parallel_tool_calls", "no tools can be called");
  if (b.functions !== undefined && b.functions !== null) unsupported("functions", "no functions can be called");
  if (b.function_call !== undefined && b.function_call !== null && b.function_call !== "none") unsupported("function_call", "no functions can be called");
  if (b.skip_special_tokens === false) unsupported("skip_special_tokens", "special tokens are always left out of the text (they are in `milora.token_ids`)");
  if (b.user !== undefined && b.user !== null && typeof b.user !== "string") throw badRequest("`user` must be a string", "user");

  const n = optionalNumber(b, "n") ?? 1;
  if (!Number.isInteger(n) || n < 1 || n > 128) throw badRequest("`n` must be an integer from 1 to 128", "n");
  const bestOf = optionalNumber(b, "best_of");
  const beam = beamParams(b, n, bestOf);
  if (!beam && bestOf !== undefined && bestOf !== n) unsupported("best_of", "choosing the best of more samples than are returned needs `use_beam_search: true` (beam width best_of); otherwise leave it out or equal to `n`");
  const minTokens = optionalNumber(b, "min_tokens");
  if (minTokens !== undefined && minTokens !== 0) unsupported("min_tokens", "only 0");

  const maxTokens = optionalNumber(b, maxTokensField) ?? defaultMaxTokens;
  if (maxTokens !== undefined && (!Number.isInteger(maxTokens) || maxTokens < 1)) throw badRequest(`\`${maxTokensField}\` must be an integer >= 1`, maxTokensField);
  const temperature = optionalNumber(b, "temperature") ?? 1;
  if (temperature < 0 || temperature > 2) throw badRequest("`temperature` must be between 0 and 2", "temperature");
  const topP = optionalNumber(b, "top_p") ?? 1;
  if (!(topP > 0 && topP <= 1)) throw badRequest("`top_p` must be in (0, 1]", "top_p");
  const topK = optionalNumber(b, "top_k") ?? 0;
  if (!Number.isInteger(topK) || topK < -1) throw badRequest("`top_k` must be an integer >= 1, or 0 or -1 for no limit", "top_k");
  const minP = optionalNumber(b, "min_p") ?? 0;
  if (!(minP >= 0 && minP <= 1)) throw badRequest("`min_p` must be in [0, 1]", "min_p");
  const penalty = (field: string) => {
    const v = optionalNumber(b, field) ?? 0;
    if (v < -2 || v > 2) throw badRequest(`\`${field}\` must be between -2 and 2`, field);
    return v;
  };
  const presencePenalty = penalty("presence_penalty");
  const frequencyPenalty = penalty("frequency_penalty");
  const repetitionPenalty = optionalNumber(b, "repetition_penalty") ?? 1;
  if (!(repetitionPenalty > 0 && repetitionPenalty <= 2)) throw badRequest("`repetition_penalty` must be in (0, 2]", "repetition_penalty");
  const seed = optionalNumber(b, "seed");
  if (seed !== undefined && (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff)) throw badRequest("`seed` must be an integer from 0 to 2^32-1", "seed");

  const streamOptions = b.stream_options;
  if (streamOptions !== undefined && streamOptions !== null) {
    if (typeof streamOptions !== "object" || Array.isArray(streamOptions)) throw badRequest("`stream_options` must be an object", "stream_options");
    for (const [key, value] of Object.entries(streamOptions)) {
      if (key === "include_usage") {
        if (typeof value !== "boolean") throw badRequest("`stream_options.include_usage` must be true or false", "stream_options.include_usage");
      } else if (!(key === "continuous_usage_stats" && value === false)) {
        throw badRequest(`\`stream_options.${key}\` is not supported (only include_usage)`, `stream_options.${key}`, "unsupported_field");
      }
    }
  }
  const stream = boolean(b, "stream");
  if (streamOptions !== undefined && streamOptions !== null && !stream) throw badRequest("`stream_options` is only for `stream: true`", "stream_options");
  return {
    model: b.model,
    ...(maxTokens === undefined ? {} : { maxTokens }),
    temperature,
    topP,
    topK: Math.max(0, topK),
    minP,
    presencePenalty,
    frequencyPenalty,
    repetitionPenalty,
    logitBias: logitBias(b.logit_bias),
    ...(seed === undefined ? {} : { seed }),
    n,
    stop: stop(b.stop),
    stopTokenIds: tokenIds(b.stop_token_ids, "stop_token_ids"),
    includeStopStrInOutput: boolean(b, "include_stop_str_in_output"),
    stream,
    includeUsage: (streamOptions as { include_usage?: unknown } | null | undefined)?.include_usage === true,
    ignoreEos: boolean(b, "ignore_eos"),
    ...(beam ? { beam } : {}),
  };
}

/**
 * vLLM's `use_beam_search: true`: beam search of width `best_of` (default `n`) returning the `n` best
 * hypotheses, with Hugging Face's `length_penalty` (default 1) and `early_stopping` (false, true or
 * "never"). Deterministic: sampling fields, penalties, logprobs and streaming are refused with it.
 */
function beamParams(b: Body, n: number, bestOf: number | undefined): BeamParams | undefined {
  if (b.use_beam_search !== undefined && b.use_beam_search !== null && typeof b.use_beam_search !== "boolean") throw badRequest("`use_beam_search` must be true or false", "use_beam_search");
  if (b.use_beam_search !== true) {
    for (const f of ["length_penalty", "early_stopping"]) if (b[f] !== undefined && b[f] !== null) unsupported(f, "it is a beam search setting: add `use_beam_search: true`");
    return undefined;
  }
  const beams = bestOf ?? n;
  if (!Number.isInteger(beams) || beams < n || beams > 64) throw badRequest("`best_of` (the beam width) must be an integer from `n` to 64", "best_of");
  const lengthPenalty = optionalNumber(b, "length_penalty") ?? 1;
  const es = b.early_stopping ?? false;
  if (es !== true && es !== false && es !== "never") throw badRequest('`early_stopping` must be true, false or "never"', "early_stopping");
  const deterministic: [string, (v: unknown) => boolean][] = [
    ["temperature", (v) => v === 0],
    ["top_p", (v) => v === 1],
    ["top_k", (v) => v === 0 || v === -1],
    ["min_p", (v) => v === 0],
    ["presence_penalty", (v) => v === 0],
    ["frequency_penalty", (v) => v === 0],
    ["repetition_penalty", (v) => v === 1],
    ["seed", () => false],
    ["logit_bias", (v) => typeof v === "object" && v !== null && Object.keys(v).length === 0],
    ["logprobs", (v) => v === false],
    ["top_logprobs", (v) => v === 0],
    ["stream", (v) => v === false],
  ];
  for (const [f, neutral] of deterministic) {
    if (b[f] !== undefined && b[f] !== null && !neutral(b[f])) unsupported(f, "beam search is deterministic and returns its hypotheses at the end: leave it out with `use_beam_search`");
  }
  return { beams, lengthPenalty, earlyStopping: es };
}

/** OpenAI's logit_bias: {"token id": bias}, bias in [-100, 100]; the ids are checked against the vocabulary later. */
function logitBias(v: unknown): Map<number, number> {
  const out = new Map<number, number>();
  if (v === undefined || v === null) return out;
  if (typeof v !== "object" || Array.isArray(v)) throw badRequest("`logit_bias` must be an object of token id -> bias", "logit_bias");
  for (const [key, bias] of Object.entries(v)) {
    const id = Number(key);
    if (!/^\d+$/.test(key) || !Number.isSafeInteger(id)) throw badRequest(`\`logit_bias\` key \`${key}\` is not a token id`, "logit_bias");
    if (typeof bias !== "number" || !(bias >= -100 && bias <= 100)) throw badRequest(`\`logit_bias\` for token ${key} must be a number from -100 to 100`, "logit_bias");
    out.set(id, bias);
  }
  return out;
}

function tokenIds(v: unknown, field: string): number[] {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v) || !v.every((t) => Number.isInteger(t) && t >= 0)) throw badRequest(`\`${field}\` must be an array of token ids`, field);
  return v as number[];
}

function optionalNumber(b: Body, field: string): number | undefined {
  const v = b[field];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v)) throw badRequest(`\`${field}\` must be a number`, field);
  return v;
}

function boolean(b: Body, field: string): boolean {
  const v = b[field];
  if (v === undefined || v === null) return false;
  if (typeof v !== "boolean") throw badRequest(`\`${field}\` must be true or false`, field);
  return v;
}

function stop(v: unknown): string[] {
  if (v === undefined || v === null) return [];
  const list = typeof v === "string" ? [v] : v;
  if (!Array.isArray(list) || list.length > 4 || !list.every((s) => typeof s === "string" && s !== "")) {
    throw badRequest("`stop` must be a non-empty string or an array of up to 4 of them", "stop");
  }
  return list;
}

/**
 * Text, or token ids; OpenAI's one-element batch forms (["text"], [[1, 2]]) are accepted, larger
 * batches are not. The batch form is unwrapped once, never recursively: [[[1]]] is a 400, not a walk.
 */
function prompt(v: unknown): string | number[] {
  if (Array.isArray(v) && v.length === 1 && (typeof v[0] === "string" || Array.isArray(v[0]))) v = v[0];
  if (typeof v === "string") {
    if (v === "") throw badRequest("`prompt` is empty", "prompt");
    return v;
  }
  if (Array.isArray(v) && v.length > 0 && v.every((t) => Number.isInteger(t) && (t as number) >= 0)) return v as number[];
  if (Array.isArray(v) && v.length > 1 && v.every((p) => typeof p === "string" || Array.isArray(p))) {
    throw badRequest("one prompt per request: send several requests to run prompts side by side", "prompt");
  }
  throw badRequest("`prompt` must be text or a non-empty array of token ids", "prompt");
}

function messages(v: unknown): ChatMessage[] {
  if (!Array.isArray(v) || v.length === 0) throw badRequest("`messages` must be a non-empty array", "messages");
  return v.map((m, i) => {
    const param = `messages[${i}]`;
    if (typeof m !== "object" || m === null) throw badRequest(`${param} must be an object`, param);
    const { role, content } = m as { role?: unknown; content?: unknown };
    if (typeof role !== "string" || role === "") throw badRequest(`${param}.role must be a string`, `${param}.role`);
    return { role, content: messageText(content, `${param}.content`) };
  });
}

/** A message's content: a string, or parts of which only text is supported. */
function messageText(content: unknown, param: string): string {
  if (typeof content === "string") return content;
  if (content === null || content === undefined) return "";
  if (Array.isArray(content)) {
    return content
      .map((part: unknown, i) => {
        const p = part as { type?: unknown; text?: unknown } | null;
        if (p?.type !== "text" || typeof p.text !== "string") throw badRequest(`${param}[${i}]: only text parts are supported`, `${param}[${i}]`);
        return p.text;
      })
      .join("");
  }
  throw badRequest(`${param} must be a string or an array of text parts`, param);
}
