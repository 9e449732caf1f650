// The routes beside OpenAI's: the adapters the server knows (GET /v1/adapters), vLLM's adapter
// loading routes (POST /v1/load_lora_adapter, /v1/unload_lora_adapter: the same rules as POST and
// DELETE /v1/adapters, off unless the operator turned loading on), vLLM's /tokenize and /detokenize;
// and what every request goes through: CORS (off unless origins are named) and the access log line.
import type { IncomingMessage, ServerResponse } from "node:http";
import { detokenize } from "../../text/detokenizer.ts";
import { sendJson, type RequestLog, type ServedModel } from "./completions.ts";
import { badRequest, contextTooLong, notFound } from "./errors.ts";

/** What the extra routes need of the server. */
export interface ExtraHost {
  readonly model: ServedModel;
  json(req: IncomingMessage): Promise<unknown>;
  addAdapter(res: ServerResponse, body: unknown, status?: number): Promise<void>;
  deleteAdapter(res: ServerResponse, name: string): void;
}

type Route = readonly [method: string, path: RegExp, handler: (req: IncomingMessage, res: ServerResponse, params: readonly string[], log: RequestLog) => Promise<void> | void];

export function extraRoutes(host: () => ExtraHost): Route[] {
  return [
    ["GET", /^\/v1\/adapters$/, (_q, res) => sendJson(res, 200, { object: "list", data: host().model.adapters.list() })],
    [
      "POST",
      /^\/v1\/load_lora_adapter$/,
      async (req, res) => {
        const h = host();
        const { lora_name, lora_path } = fields(await h.json(req), ["lora_name", "lora_path"]);
        await h.addAdapter(res, { name: lora_name, path: lora_path }, 200);
      },
    ],
    [
      "POST",
      /^\/v1\/unload_lora_adapter$/,
      async (req, res) => {
        const h = host();
        const { lora_name } = fields(await h.json(req), ["lora_name"]);
        if (typeof lora_name !== "string" || lora_name === "") throw badRequest("`lora_name` must be an adapter's name", "lora_name");
        h.deleteAdapter(res, lora_name);
      },
    ],
    ["POST", /^\/tokenize$/, async (req, res, _p, log) => tokenize(host(), await host().json(req), res, log)],
    ["POST", /^\/detokenize$/, async (req, res, _p, log) => detokenizeRoute(host(), await host().json(req), res, log)],
  ];
}

function fields(body: unknown, known: readonly string[]): Record<string, unknown> {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw badRequest("the request body must be a JSON object");
  for (const key of Object.keys(body)) if (!known.includes(key)) throw badRequest(`\`${key}\` is not a field of this route (it takes ${known.join(", ")})`, key, "unsupported_field");
  return body as Record<string, unknown>;
}

function checkModel(model: ServedModel, id: unknown, log: RequestLog): void {
  if (id === undefined || id === null) return;
  if (typeof id !== "string" || (id !== model.baseName && !model.adapters.has(id))) throw notFound(`the model \`${String(id)}\` does not exist: GET /v1/models lists them`, "model_not_found", "model");
  log.model = id;
}

/** vLLM's POST /tokenize: {prompt} or {messages} (through the chat template) -> {tokens, count, max_model_len}. */
async function tokenize(host: ExtraHost, body: unknown, res: ServerResponse, log: RequestLog): Promise<void> {
  const { model } = host;
  const b = fields(body, ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"]);
  checkModel(model, b.model, log);
  const tokenizer = model.tokenizer;
  if (!tokenizer) throw badRequest("this model directory has no tokenizer.json: nothing to tokenize with");
  const addSpecial = b.add_special_tokens ?? true;
  if (typeof addSpecial !== "boolean") throw badRequest("`add_special_tokens` must be true or false", "add_special_tokens");
  let text: string;
  let addBos = addSpecial;
  if (b.messages !== undefined) {
    if (b.prompt !== undefined) throw badRequest("give `prompt` or `messages`, not both", "messages");
    if (!Array.isArray(b.messages) || !b.messages.every((m) => typeof m?.role === "string" && typeof m?.content === "string")) {
      throw badRequest("`messages` must be an array of {role, content} with text content", "messages");
    }
    if (!model.chatTemplate) throw badRequest("this model has no chat template", "messages");
    const agp = b.add_generation_prompt ?? true;
    if (typeof agp !== "boolean") throw badRequest("`add_generation_prompt` must be true or false", "add_generation_prompt");
    text = model.chatTemplate.render(b.messages as { role: string; content: string }[], { addGenerationPrompt: agp });
    addBos = false; // the template writes its special tokens itself
  } else {
    if (typeof b.prompt !== "string") throw badRequest("`prompt` must be text", "prompt");
    text = b.prompt;
  }
  const most = model.ctx * tokenizer.maxBytesPerToken;
  if (Buffer.byteLength(text) > most) throw contextTooLong(`the text is ${Buffer.byteLength(text)} bytes, more than ${most} could ever fit in the context of ${model.ctx} tokens`, "prompt");
  const tokens = await tokenizer.encodeAsync(text, { addBos });
  sendJson(res, 200, { count: tokens.length, max_model_len: model.ctx, tokens });
}

/** vLLM's POST /detokenize: {tokens} -> {prompt}. */
function detokenizeRoute(host: ExtraHost, body: unknown, res: ServerResponse, log: RequestLog): void {
  const { model } = host;
  const b = fields(body, ["model", "tokens"]);
  checkModel(model, b.model, log);
  const tokenizer = model.tokenizer;
  if (!tokenizer) throw badRequest("this model directory has no tokenizer.json: nothing to detokenize with");
  const ids = b.tokens;
  if (!Array.isArray(ids) || !ids.every((t) => Number.isInteger(t) && t >= 0 && t < model.vocabSize)) {
    throw badRequest(`\`tokens\` must be an array of token ids (0..${model.vocabSize - 1})`, "tokens");
  }
  sendJson(res, 200, { prompt: detokenize((x) => tokenizer.decode(x), ids as number[]) });
}

/**
 * CORS: with origins configured, a matching request's answer carries Access-Control-Allow-Origin and a
 * preflight (OPTIONS) is answered here (true: nothing more to do). Without, nothing is added and OPTIONS
 * falls through to the router's 405, as before.
 */
export function corsHeaders(req: IncomingMessage, res: ServerResponse, origins: readonly string[] | undefined): boolean {
  if (!origins || origins.length === 0) return false;
  const origin = req.headers.origin;
  if (origin === undefined) return false;
  const any = origins.includes("*");
  if (!any && !origins.includes(origin)) return false;
  res.setHeader("access-control-allow-origin", any ? "*" : origin);
  if (!any) res.setHeader("vary", "Origin");
  if (req.method !== "OPTIONS" || req.headers["access-control-request-method"] === undefined) return false;
  res.writeHead(204, {
    "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
    "access-control-allow-headers": req.headers["access-control-request-headers"] ?? "authorization, content-type",
    "access-control-max-age": "600",
  });
  res.end();
  return true;
}

/** The request's access log record; its line is written when the answer is done (or cut off). */
export function accessLogFor(req: IncomingMessage, res: ServerResponse, options: { readonly accessLog?: (line: string) => void }): RequestLog & { route: string } {
  const log: RequestLog & { route: string } = { route: "?" };
  const write = options.accessLog;
  if (!write) return log;
  const started = performance.now();
  let done = false;
  const finish = () => {
    if (done) return;
    done = true;
    const tokens = log.tokens ? `${log.tokens.prompt}+${log.tokens.completion}` : "-";
    const status = res.writableFinished ? res.statusCode : `${res.headersSent ? res.statusCode : 499}(cut)`;
    write(`${req.method ?? "?"} ${log.route} model=${log.model ?? "-"} status=${status} tokens=${tokens} ms=${(performance.now() - started).toFixed(1)}`);
  };
  res.once("finish", finish);
  res.once("close", finish);
  return log;
}
