// POST /v1/completions and /v1/chat/completions: a checked request becomes a prompt of token ids and a
// generation on the scheduler, answered as one JSON body or as server-sent events, token by token.
// Every response (and stream chunk) carries a `milora` field with the token ids and the adapter.
import { randomInt, randomUUID } from "node:crypto";
import type { ServerResponse } from "node:http";
import type { AdapterPool } from "../adapter-pool.ts";
import type { LayerRouting } from "../../engine/routing.ts";
import type { FinishReason, GenerationResult, Scheduler, TokenInfo } from "../scheduler.ts";
import type { Tokenizer } from "../../text/tokenizer.ts";
import type { ChatTemplate } from "./chat-template.ts";
import { ApiError, apiErrorOf, badRequest, contextTooLong, notFound } from "./errors.ts";
import { chatParams, completionParams, type ChatParams, type CompletionParams } from "./params.ts";
import { TextStream } from "./text-stream.ts";

/** What the endpoints serve: the scheduler over one base model and its adapters. */
export interface ServedModel {
  readonly scheduler: Scheduler;
  readonly adapters: AdapterPool;
  /** The model id of the base itself (requests for it run without an adapter). */
  readonly baseName: string;
  readonly vocabSize: number;
  /** Positions per sequence, prompt and output together. */
  readonly ctx: number;
  /** Absent when the directory has no tokenizer.json: prompts must then be token ids. */
  readonly tokenizer?: Tokenizer;
  readonly chatTemplate?: ChatTemplate;
  /** An adapter's own chat template (its directory has one), used for requests naming it instead of the base's. */
  readonly adapterChatTemplate?: (adapter: string) => ChatTemplate | undefined;
  /** False when the engine's plan has no logit processing kernels (a package compiled before them): penalties, logit_bias, min_p and logprobs are refused. */
  readonly logitProcessing?: boolean;
}

type Kind = "completion" | "chat";

interface Prepared {
  readonly params: ChatParams | CompletionParams;
  /** The adapter's name, as the client gave it. */
  readonly adapter: string | undefined;
  /** The instance of it the request runs on (AdapterPool.keyOf). */
  readonly adapterKey: string | undefined;
  readonly prompt: readonly number[];
  readonly maxTokens: number;
  /** The prompt's text when the completion echoes it, else "". */
  readonly echo: string;
}

export async function handleGeneration(kind: Kind, body: unknown, res: ServerResponse, model: ServedModel, log?: RequestLog): Promise<void> {
  const { params, adapter, adapterKey, prompt, maxTokens, echo } = await prepare(kind, body, model);
  if (log) log.model = params.model;
  const tokenizer = model.tokenizer;
  const decode = (ids: readonly number[]) => tokenizer?.decode(ids) ?? "";
  const id = `${kind === "chat" ? "chatcmpl" : "cmpl"}-${randomUUID()}`;
  const created = Math.floor(Date.now() / 1000);
  const abort = new AbortController();
  res.on("close", () => {
    if (!res.writableFinished) abort.abort();
  });
  const stopIds = new Set(params.stopTokenIds);
  const eos = params.ignoreEos ? [] : (tokenizer?.eosIds ?? []);
  const choices: Choice[] = Array.from({ length: params.n }, (_, index) => ({
    index,
    text: new TextStream(decode, params.stop, { includeStop: params.includeStopStrInOutput }),
    whole: echo,
    offset: echo.length,
    logprobs: [],
    stopToken: undefined,
  }));
  // The stream's writer once headers are out; before that, pieces gather in each choice.
  let onPiece: ((c: Choice, delta: string, token: number, routing: readonly LayerRouting[], lp: LogprobEntry | undefined) => void) | undefined;
  let result: Promise<GenerationResult>;
  const seed = params.seed ?? randomInt(0x100000000);
  try {
    result = model.scheduler.submit({
      tenant: params.model,
      ...(adapterKey === undefined ? {} : { adapter: adapterKey }),
      prompt,
      maxTokens,
      n: params.n,
      ...(params.beam ? { beam: params.beam } : {}),
      sampling: { temperature: params.temperature, topP: params.topP, topK: params.topK, minP: params.minP, seed },
      penalties: { presence: params.presencePenalty, frequency: params.frequencyPenalty, repetition: params.repetitionPenalty, bias: params.logitBias },
      ...(params.logprobs === undefined ? {} : { logprobs: params.logprobs }),
      stopTokens: [...eos, ...stopIds],
      onToken: (token, routing, info) => {
        const c = choices[info.choice]!;
        // A stop token id ends the choice; its text stays out unless include_stop_str_in_output.
        const isStopId = stopIds.has(token) && !eos.includes(token);
        if (isStopId) c.stopToken = token;
        const step = isStopId && !params.includeStopStrInOutput ? { delta: "", stopped: false } : c.text.push(token);
        const lp = info.logprob === undefined ? undefined : logprobEntry(decode, token, info.logprob, info.top);
        if (lp) c.logprobs.push({ ...lp, offset: c.offset });
        c.offset += step.delta.length;
        if (onPiece) onPiece(c, step.delta, token, routing, lp);
        else c.whole += step.delta;
        return step.stopped ? "stop" : undefined;
      },
      signal: abort.signal,
    });
  } catch (e) {
    throw apiErrorOf(e) ?? e;
  }
  const shape = { kind, id, created, model: params.model, adapter, includeUsage: params.includeUsage };
  if (!params.stream) {
    let done: GenerationResult;
    try {
      done = await result;
    } catch (e) {
      // Failed after it was queued: a user error as 4xx (or its own status), a bug as it is.
      throw apiErrorOf(e) ?? e;
    }
    log?.onResult?.(prompt.length, done);
    if (done.finish === "cancelled") return;
    // Beam search's hypotheses come whole at the end: their text goes through the same stream (stop strings).
    if (params.beam) for (const c of choices) c.whole = echo + beamText(c, done.choices[c.index]!.tokens, decode, params.stop);
    else for (const c of choices) c.whole += c.text.flush();
    if (log) log.tokens = { prompt: prompt.length, completion: completionTokens(done) };
    sendJson(res, 200, finalBody(shape, prompt, done, choices, params.logprobs));
    return;
  }

  res.writeHead(200, { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", connection: "keep-alive" });
  res.flushHeaders();
  const send = (data: unknown) => res.write(`data: ${JSON.stringify(data)}\n\n`);
  const started = new Set<number>();
  onPiece = (c, delta, token, routing, lp) => {
    const first = !started.has(c.index);
    started.add(c.index);
    send(chunk(shape, c.index, (first ? echo : "") + delta, first, null, null, [token], routing, lp ? logprobsOf(kind, [{ ...lp, offset: c.offset - delta.length }]) : null));
  };
  // Choices that generated before the headers went out (none: the scheduler runs after this tick).
  let done: GenerationResult;
  try {
    done = await result;
  } catch (e) {
    // Headers are gone: the error travels as an event, as OpenAI's streams send theirs.
    send((apiErrorOf(e) ?? new ApiError(500, `generation failed: ${(e as Error).message}`, "server_error")).body());
    res.end();
    return;
  }
  log?.onResult?.(prompt.length, done);
  if (done.finish === "cancelled") return;
  for (const c of choices) {
    const r = done.choices[c.index]!;
    const first = !started.has(c.index);
    send(chunk(shape, c.index, (first ? echo : "") + c.text.flush(), first, finishReason(r.finish), stopReason(c), [], [], null));
  }
  if (params.includeUsage) send({ ...chunkHead(shape), choices: [], usage: usage(prompt, done) });
  if (log) log.tokens = { prompt: prompt.length, completion: completionTokens(done) };
  res.end("data: [DONE]\n\n");
}

/** What the access log line of a request says (the server fills in the rest). */
export interface RequestLog {
  model?: string;
  tokens?: { readonly prompt: number; readonly completion: number };
  /** Told of every generation that ran (metrics). */
  onResult?: (promptTokens: number, done: GenerationResult) => void;
}

interface LogprobEntry {
  readonly token: number;
  readonly text: string;
  readonly logprob: number;
  readonly top: readonly { readonly token: number; readonly text: string; readonly logprob: number }[] | undefined;
  /** Characters of the choice's text before this token's. */
  readonly offset: number;
}

interface Choice {
  readonly index: number;
  readonly text: TextStream;
  whole: string;
  offset: number;
  readonly logprobs: LogprobEntry[];
  stopToken: number | undefined;
}

function logprobEntry(decode: (ids: readonly number[]) => string, token: number, logprob: number, top: TokenInfo["top"]): LogprobEntry {
  return {
    token,
    text: decode([token]),
    logprob,
    top: top?.map((t) => ({ token: t.token, text: decode([t.token]), logprob: t.logprob })),
    offset: 0,
  };
}

/** OpenAI's logprobs objects: the completions API's parallel arrays, or the chat API's content list. */
function logprobsOf(kind: Kind, entries: readonly LogprobEntry[]) {
  if (kind === "chat") {
    const bytes = (t: string) => [...Buffer.from(t, "utf8")];
    return {
      content: entries.map((e) => ({
        token: e.text,
        logprob: e.logprob,
        bytes: bytes(e.text),
        top_logprobs: (e.top ?? []).map((t) => ({ token: t.text, logprob: t.logprob, bytes: bytes(t.text) })),
      })),
      refusal: null,
    };
  }
  return {
    tokens: entries.map((e) => e.text),
    token_logprobs: entries.map((e) => e.logprob),
    // Two tokens may decode to the same text: the more likely one's value is kept, as a map must.
    top_logprobs: entries.map((e) => (e.top ? Object.fromEntries([...e.top].reverse().map((t) => [t.text, t.logprob])) : null)),
    text_offset: entries.map((e) => e.offset),
  };
}

/** A hypothesis' text, cut at the first stop string (which then names the stop_reason). */
function beamText(c: Choice, tokens: readonly number[], decode: (ids: readonly number[]) => string, stops: readonly string[]): string {
  const text = new TextStream(decode, stops);
  let out = "";
  for (const t of tokens) {
    const step = text.push(t);
    out += step.delta;
    if (step.stopped) {
      c.text.stopString = text.stopString;
      return out;
    }
  }
  return out + text.flush();
}

function completionTokens(done: GenerationResult): number {
  return done.choices.reduce((n, c) => n + c.tokens.length, 0);
}

async function prepare(kind: Kind, body: unknown, model: ServedModel): Promise<Prepared> {
  const params = kind === "chat" ? chatParams(body) : completionParams(body);
  const adapter = params.model === model.baseName ? undefined : params.model;
  const adapterKey = adapter === undefined ? undefined : model.adapters.keyOf(adapter);
  if (adapter !== undefined && adapterKey === undefined) {
    throw notFound(`the model \`${params.model}\` does not exist: GET /v1/models lists the base and its adapters`, "model_not_found", "model");
  }
  const param = kind === "chat" ? "messages" : "prompt";
  const { tokenizer } = model;
  if (params.stop.length > 0 && !tokenizer) throw badRequest("`stop` strings need a tokenizer, and this model directory has no tokenizer.json", "stop");
  // Text is measured before it is tokenized: one token covers at most maxBytesPerToken bytes, so more
  // than ctx x that many bytes cannot fit, and is refused without the work of tokenizing it.
  const encode = async (text: string, addBos: boolean): Promise<number[]> => {
    const bytes = Buffer.byteLength(text);
    const most = model.ctx * tokenizer!.maxBytesPerToken;
    if (bytes > most) {
      throw contextTooLong(
        `the prompt is ${bytes} bytes of text, more than the ${most} bytes that could fit in this model's maximum context length of ${model.ctx} tokens ` +
          `(at most ${tokenizer!.maxBytesPerToken} bytes make one token)`,
        param,
      );
    }
    return tokenizer!.encodeAsync(text, { addBos });
  };
  let prompt: readonly number[];
  if ("messages" in params) {
    const template = (adapter === undefined ? undefined : model.adapterChatTemplate?.(adapter)) ?? model.chatTemplate;
    if (!tokenizer || !template) {
      throw badRequest(
        "this model has no chat template (none of chat_template.jinja, chat_template.json or tokenizer_config.json's chat_template; the server takes --chat-template FILE): use /v1/completions",
        "messages",
      );
    }
    let rendered: string;
    try {
      rendered = template.render(params.messages);
    } catch (e) {
      throw badRequest(`the chat template cannot render these messages: ${(e as Error).message}`, "messages");
    }
    // The template writes the special tokens (BOS among them) itself.
    prompt = await encode(rendered, false);
  } else {
    const text = params.prompt;
    if (typeof text === "string") {
      if (!tokenizer) throw badRequest("this model directory has no tokenizer.json: send the prompt as an array of token ids", "prompt");
      prompt = await encode(text, true);
    } else {
      const bad = text.find((t) => t >= model.vocabSize);
      if (bad !== undefined) throw badRequest(`token id ${bad} is outside the vocabulary (0..${model.vocabSize - 1})`, "prompt");
      prompt = text;
    }
  }
  // As OpenAI and vLLM answer: 400 context_length_exceeded when prompt and max_tokens do not fit.
  const maxTokens = params.maxTokens ?? model.ctx - prompt.length;
  if (prompt.length + Math.max(1, maxTokens) > model.ctx) {
    throw contextTooLong(
      `this model's maximum context length is ${model.ctx} tokens, but the request needs ${prompt.length + Math.max(1, maxTokens)} ` +
        `(${prompt.length} in the prompt + ${params.maxTokens === undefined ? "at least 1" : `max_tokens ${params.maxTokens}`} for the completion): shorten the prompt or lower max_tokens`,
      param,
    );
  }
  for (const [field, ids] of [["logit_bias", [...params.logitBias.keys()]], ["stop_token_ids", params.stopTokenIds]] as const) {
    const bad = ids.find((t) => t >= model.vocabSize);
    if (bad !== undefined) throw badRequest(`\`${field}\`: token id ${bad} is outside the vocabulary (0..${model.vocabSize - 1})`, field);
  }
  if (params.n > 1 && params.n > model.scheduler.stats().slots) {
    throw badRequest(`\`n\` = ${params.n} choices run side by side, one sequence slot each; this server has ${model.scheduler.stats().slots} (--slots)`, "n");
  }
  if (model.logitProcessing === false) {
    const used: [string, boolean][] = [
      ["logprobs", params.logprobs !== undefined],
      ["min_p", params.minP > 0],
      ["presence_penalty", params.presencePenalty !== 0],
      ["frequency_penalty", params.frequencyPenalty !== 0],
      ["repetition_penalty", params.repetitionPenalty !== 1],
      ["logit_bias", params.logitBias.size > 0],
    ];
    const field = used.find(([, on]) => on)?.[0];
    if (field) throw badRequest(`\`${field}\` needs the logit processing kernels, which this package was compiled without: recompile it with this milora`, field, "unsupported_field");
  }
  const echo = "echo" in params && params.echo ? (typeof params.prompt === "string" ? params.prompt : (tokenizer?.decode(prompt) ?? "")) : "";
  return { params, adapter, adapterKey, prompt, maxTokens, echo };
}

interface Shape {
  readonly kind: Kind;
  readonly id: string;
  readonly created: number;
  readonly model: string;
  readonly adapter: string | undefined;
  readonly includeUsage: boolean;
}

function chunkHead(s: Shape) {
  return { id: s.id, object: s.kind === "chat" ? "chat.completion.chunk" : "text_completion", created: s.created, model: s.model };
}

function chunk(
  s: Shape,
  index: number,
  delta: string,
  first: boolean,
  finish: string | null,
  stop: string | number | null,
  tokens: readonly number[],
  routing: readonly LayerRouting[],
  logprobs: unknown,
) {
  const choice =
    s.kind === "chat"
      ? { index, delta: { ...(first ? { role: "assistant" } : {}), content: delta }, logprobs, finish_reason: finish, ...(finish ? { stop_reason: stop } : {}) }
      : { index, text: delta, logprobs, finish_reason: finish, ...(finish ? { stop_reason: stop } : {}) };
  // With include_usage, every chunk before the last carries usage: null (OpenAI's stream format).
  return { ...chunkHead(s), choices: [choice], ...(s.includeUsage ? { usage: null } : {}), milora: { adapter: s.adapter ?? null, token_ids: tokens, routing } };
}

function finalBody(s: Shape, prompt: readonly number[], done: GenerationResult, choices: readonly Choice[], logprobs: number | undefined) {
  const body = choices.map((c) => {
    const r = done.choices[c.index]!;
    const finish = c.text.stopString !== undefined ? "stop" : finishReason(r.finish);
    const lp = logprobs === undefined ? null : logprobsOf(s.kind, c.logprobs);
    return s.kind === "chat"
      ? { index: c.index, message: { role: "assistant", content: c.whole, refusal: null, tool_calls: [] }, logprobs: lp, finish_reason: finish, stop_reason: stopReason(c) }
      : { index: c.index, text: c.whole, logprobs: lp, finish_reason: finish, stop_reason: stopReason(c) };
  });
  return {
    id: s.id,
    object: s.kind === "chat" ? "chat.completion" : "text_completion",
    created: s.created,
    model: s.model,
    choices: body,
    usage: usage(prompt, done),
    milora: {
      adapter: s.adapter ?? null,
      prompt_token_ids: prompt,
      token_ids: done.tokens,
      ...(done.choices.length > 1 ? { choices: done.choices.map((c, index) => ({ index, token_ids: c.tokens, ...(c.score === undefined ? {} : { score: c.score }) })) } : {}),
      ...(done.choices[0]?.score === undefined ? {} : { score: done.choices[0].score }),
      routing: done.routing,
      time_to_first_token_ms: done.timeToFirstTokenMs,
    },
  };
}

/** vLLM's stop_reason: the stop string or stop token id that ended a choice, else null. */
function stopReason(c: Choice): string | number | null {
  return c.text.stopString ?? c.stopToken ?? null;
}

function usage(prompt: readonly number[], done: GenerationResult) {
  const completion = completionTokens(done);
  return { prompt_tokens: prompt.length, completion_tokens: completion, total_tokens: prompt.length + completion };
}

/** OpenAI's finish reasons: a full context is a length limit too. */
function finishReason(f: FinishReason): "stop" | "length" {
  return f === "stop" ? "stop" : "length";
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Readonly<Record<string, string>> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text), ...headers });
  res.end(text);
}
