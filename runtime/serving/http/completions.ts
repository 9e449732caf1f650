// POST /v1/completions and /v1/chat/completions: a checked request becomes a prompt of token ids and a
// generation on the scheduler, answered as one JSON body or as server-sent events, token by token.
// Every response (and stream chunk) carries a `milora` field with the token ids and the adapter.
import { randomInt, randomUUID } from "node:crypto";
import type { ServerResponse } from "node:http";
import { AdapterReadTimeoutError, type AdapterPool } from "../adapter-pool.ts";
import type { LayerRouting } from "../../engine/routing.ts";
import { DrainingError, QueueFullError, RequestError, type FinishReason, type GenerationResult, type Scheduler } from "../scheduler.ts";
import type { Tokenizer } from "../../text/tokenizer.ts";
import type { ChatTemplate } from "./chat-template.ts";
import { ApiError, badRequest, contextTooLong, notFound } from "./errors.ts";
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
  /**
   * The longest prompt a prompt-routed (MiLoRA) adapter takes: its routers pool over the whole prompt,
   * so the engine prefills it in one step, of at most this many rows (the engine's maxBatchRows).
   */
  readonly maxRoutedPromptTokens?: number;
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
}

export async function handleGeneration(kind: Kind, body: unknown, res: ServerResponse, model: ServedModel): Promise<void> {
  const { params, adapter, adapterKey, prompt, maxTokens } = await prepare(kind, body, model);
  const tokenizer = model.tokenizer;
  const text = new TextStream((ids) => tokenizer?.decode(ids) ?? "", params.stop);
  const id = `${kind === "chat" ? "chatcmpl" : "cmpl"}-${randomUUID()}`;
  const created = Math.floor(Date.now() / 1000);
  const abort = new AbortController();
  res.on("close", () => {
    if (!res.writableFinished) abort.abort();
  });
  let whole = "";
  let onDelta: (delta: string, token: number, routing: readonly LayerRouting[]) => void = (delta) => (whole += delta);
  let result: Promise<GenerationResult>;
  try {
    result = model.scheduler.submit({
      tenant: params.model,
      ...(adapterKey === undefined ? {} : { adapter: adapterKey }),
      prompt,
      maxTokens,
      sampling: { temperature: params.temperature, topP: params.topP, seed: params.seed ?? randomInt(0x100000000) },
      stopTokens: params.ignoreEos ? [] : (tokenizer?.eosIds ?? []),
      onToken: (token, routing) => {
        const step = text.push(token);
        onDelta(step.delta, token, routing);
        return step.stopped ? "stop" : undefined;
      },
      signal: abort.signal,
    });
  } catch (e) {
    throw schedulerError(e);
  }
  const shape = { kind, id, created, model: params.model, adapter };
  if (!params.stream) {
    let done: GenerationResult;
    try {
      done = await result;
    } catch (e) {
      throw generationError(e);
    }
    if (done.finish === "cancelled") return;
    sendJson(res, 200, finalBody(shape, prompt, done, whole + text.flush()));
    return;
  }

  res.writeHead(200, { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", connection: "keep-alive" });
  res.flushHeaders();
  let first = true;
  const send = (data: unknown) => res.write(`data: ${JSON.stringify(data)}\n\n`);
  onDelta = (delta, token, routing) => {
    send(chunk(shape, delta, first, null, [token], routing));
    first = false;
  };
  let done: GenerationResult;
  try {
    done = await result;
  } catch (e) {
    // Headers are gone: the error travels as an event, as OpenAI's streams send theirs.
    send(new ApiError(500, `generation failed: ${(e as Error).message}`, "server_error").body());
    res.end();
    return;
  }
  if (done.finish === "cancelled") return;
  send(chunk(shape, text.flush(), first, finishReason(done.finish), [], []));
  if (params.includeUsage) send({ ...chunkHead(shape), choices: [], usage: usage(prompt, done) });
  res.end("data: [DONE]\n\n");
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
    if (!tokenizer || !model.chatTemplate) throw badRequest("this model has no chat template (tokenizer_config.json's chat_template): use /v1/completions", "messages");
    let rendered: string;
    try {
      rendered = model.chatTemplate.render(params.messages);
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
  const routedLimit = model.maxRoutedPromptTokens;
  if (adapterKey !== undefined && routedLimit !== undefined && prompt.length > routedLimit && model.adapters.routesOnPrompt(adapterKey)) {
    throw badRequest(
      `adapter ${adapter} routes on the whole prompt, which this server prefills in one step of at most ${routedLimit} tokens ` +
        `(the engine's maxBatchRows); the prompt has ${prompt.length}: shorten it`,
      param,
      "prompt_too_long_for_routing",
    );
  }
  return { params, adapter, adapterKey, prompt, maxTokens };
}

/** A generation that failed after it was queued: client-caused failures as 4xx, the rest as they are. */
function generationError(e: unknown): unknown {
  if (e instanceof AdapterReadTimeoutError) return new ApiError(504, e.message, "server_error", "adapter_load_timeout");
  return schedulerError(e);
}

/** The scheduler's refusals as HTTP answers. */
export function schedulerError(e: unknown): unknown {
  if (e instanceof QueueFullError) {
    return new ApiError(429, e.message, "rate_limit_error", "server_overloaded", null, { "retry-after": String(e.retryAfterSeconds) });
  }
  if (e instanceof DrainingError) return new ApiError(503, e.message, "server_error", "shutting_down");
  if (e instanceof RequestError) return badRequest(e.message);
  return e;
}

interface Shape {
  readonly kind: Kind;
  readonly id: string;
  readonly created: number;
  readonly model: string;
  readonly adapter: string | undefined;
}

function chunkHead(s: Shape) {
  return { id: s.id, object: s.kind === "chat" ? "chat.completion.chunk" : "text_completion", created: s.created, model: s.model };
}

function chunk(s: Shape, delta: string, first: boolean, finish: string | null, tokens: readonly number[], routing: readonly LayerRouting[]) {
  const choice =
    s.kind === "chat"
      ? { index: 0, delta: { ...(first ? { role: "assistant" } : {}), content: delta }, logprobs: null, finish_reason: finish }
      : { index: 0, text: delta, logprobs: null, finish_reason: finish };
  return { ...chunkHead(s), choices: [choice], milora: { adapter: s.adapter ?? null, token_ids: tokens, routing } };
}

function finalBody(s: Shape, prompt: readonly number[], done: GenerationResult, text: string) {
  const finish = finishReason(done.finish);
  const choice =
    s.kind === "chat"
      ? { index: 0, message: { role: "assistant", content: text }, logprobs: null, finish_reason: finish }
      : { index: 0, text, logprobs: null, finish_reason: finish };
  return {
    id: s.id,
    object: s.kind === "chat" ? "chat.completion" : "text_completion",
    created: s.created,
    model: s.model,
    choices: [choice],
    usage: usage(prompt, done),
    milora: {
      adapter: s.adapter ?? null,
      prompt_token_ids: prompt,
      token_ids: done.tokens,
      routing: done.routing,
      time_to_first_token_ms: done.timeToFirstTokenMs,
    },
  };
}

function usage(prompt: readonly number[], done: GenerationResult) {
  return { prompt_tokens: prompt.length, completion_tokens: done.tokens.length, total_tokens: prompt.length + done.tokens.length };
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
