// The fields of /v1/completions and /v1/chat/completions bodies, checked one by one: every bad field
// is a 400 naming it (OpenAI's `param`), never an exception from deep inside.
import { badRequest } from "./errors.ts";
import type { ChatMessage } from "./chat-template.ts";

/** What both endpoints share once checked. */
export interface GenerationParams {
  readonly model: string;
  /** Absent: as many as the context holds. */
  readonly maxTokens?: number;
  readonly temperature: number;
  readonly topP: number;
  /** Absent: a fresh one per request. */
  readonly seed?: number;
  readonly stop: readonly string[];
  readonly stream: boolean;
  readonly includeUsage: boolean;
  /** vLLM's extension: keep going past end-of-sequence tokens (benchmarks use it for fixed lengths). */
  readonly ignoreEos: boolean;
}

export interface CompletionParams extends GenerationParams {
  readonly prompt: string | readonly number[];
}

export interface ChatParams extends GenerationParams {
  readonly messages: readonly ChatMessage[];
}

type Body = Record<string, unknown>;

export function completionParams(body: unknown): CompletionParams {
  const b = object(body);
  return { ...common(b, "max_tokens", 16), prompt: prompt(b.prompt) };
}

export function chatParams(body: unknown): ChatParams {
  const b = object(body);
  // The newer name wins, as in OpenAI's API.
  const field = b.max_completion_tokens !== undefined ? "max_completion_tokens" : "max_tokens";
  return { ...common(b, field, undefined), messages: messages(b.messages) };
}

function object(body: unknown): Body {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw badRequest("the request body must be a JSON object");
  return body as Body;
}

function common(b: Body, maxTokensField: string, defaultMaxTokens: number | undefined): GenerationParams {
  if (typeof b.model !== "string" || b.model === "") throw badRequest("`model` must be a model id from GET /v1/models", "model");
  const n = optionalNumber(b, "n");
  if (n !== undefined && n !== 1) throw badRequest("only n = 1 is supported", "n");
  const bestOf = optionalNumber(b, "best_of");
  if (bestOf !== undefined && bestOf !== 1) throw badRequest("only best_of = 1 is supported", "best_of");
  if (b.echo === true) throw badRequest("echo is not supported", "echo");
  if (b.logprobs !== undefined && b.logprobs !== null && b.logprobs !== false) throw badRequest("logprobs are not supported", "logprobs");

  const maxTokens = optionalNumber(b, maxTokensField) ?? defaultMaxTokens;
  if (maxTokens !== undefined && (!Number.isInteger(maxTokens) || maxTokens < 1)) throw badRequest(`\`${maxTokensField}\` must be an integer >= 1`, maxTokensField);
  const temperature = optionalNumber(b, "temperature") ?? 1;
  if (temperature < 0 || temperature > 2) throw badRequest("`temperature` must be between 0 and 2", "temperature");
  const topP = optionalNumber(b, "top_p") ?? 1;
  if (!(topP > 0 && topP <= 1)) throw badRequest("`top_p` must be in (0, 1]", "top_p");
  const seed = optionalNumber(b, "seed");
  if (seed !== undefined && (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff)) throw badRequest("`seed` must be an integer from 0 to 2^32-1", "seed");

  const streamOptions = b.stream_options;
  if (streamOptions !== undefined && streamOptions !== null && (typeof streamOptions !== "object" || Array.isArray(streamOptions))) {
    throw badRequest("`stream_options` must be an object", "stream_options");
  }
  return {
    model: b.model,
    ...(maxTokens === undefined ? {} : { maxTokens }),
    temperature,
    topP,
    ...(seed === undefined ? {} : { seed }),
    stop: stop(b.stop),
    stream: boolean(b, "stream"),
    includeUsage: (streamOptions as { include_usage?: unknown } | null | undefined)?.include_usage === true,
    ignoreEos: boolean(b, "ignore_eos"),
  };
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
