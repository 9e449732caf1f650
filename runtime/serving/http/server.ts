// The HTTP server: OpenAI's routes over the scheduler, plus health, Prometheus metrics and run-time
// adapter management. Plain node:http; every failure a client can cause is a 4xx with an OpenAI-style
// error JSON (never a 500, never a stack trace in the log), and anything else is a 500 that keeps the
// server serving. Slow clients are bounded: headers and the whole request body each have a deadline,
// and the server holds a bounded number of connections.
import { createHash, timingSafeEqual } from "node:crypto";
import { realpathSync, statSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { confinedAdapterDir } from "../../formats/adapter-guard.ts";
import { userError } from "../../errors.ts";
import { handleGeneration, sendJson, type RequestLog, type ServedModel } from "./completions.ts";
import { accessLogFor, corsHeaders, extraRoutes, type ExtraHost } from "./routes.ts";
import { ApiError, apiErrorOf, badRequest, notFound, tooLarge } from "./errors.ts";
import { METRICS_CONTENT_TYPE, ServerMetrics } from "./metrics.ts";
import { Dashboard, pageKey, pageUnauthorized } from "../ui/dashboard.ts";

export interface ServerOptions {
  /** 127.0.0.1 unless given: serving beyond the machine is a choice. */
  readonly host?: string;
  /** 0 picks a free port. */
  readonly port: number;
  /** When set (never empty), every route but /health wants `Authorization: Bearer KEY`. */
  readonly apiKey?: string;
  /** Largest request body (default 1 MiB). */
  readonly maxBodyBytes?: number;
  /**
   * Run-time adapter management (POST /v1/adapters, DELETE /v1/adapters/NAME) is off unless this is
   * set: a directory, and every adapter loaded through the API must lie inside it, symlinks resolved.
   */
  readonly adapterRoot?: string;
  /** Milliseconds a client has to send the request's headers (default DEFAULT_HEADERS_TIMEOUT_MS). */
  readonly headersTimeoutMs?: number;
  /** Milliseconds a client has to send the whole request, body included (default DEFAULT_REQUEST_TIMEOUT_MS). Streaming the answer is not bounded by it. */
  readonly requestTimeoutMs?: number;
  /** Connections held at once; more are closed as they arrive (default DEFAULT_MAX_CONNECTIONS). */
  readonly maxConnections?: number;
  /**
   * Origins whose browser pages may call the API (CORS): exact origins such as https://app.example, or
   * "*" for any. Off (no CORS headers, preflights refused) unless given.
   */
  readonly corsOrigins?: readonly string[];
  /** Receives one access log line per request (method, route, model, status, tokens, milliseconds); none by default. */
  readonly accessLog?: (line: string) => void;
  /** The page at / (runtime/serving/ui/): on unless false. Behind the API key too (HTTP Basic, the key as password). */
  readonly ui?: boolean;
}

/** Headers come in one packet from any real client; 10 s is generous. */
export const DEFAULT_HEADERS_TIMEOUT_MS = 10_000;
/** A 1 MiB body in 30 s needs 35 KB/s; a client trickling bytes to hold a connection is cut off. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
/** Well above slots + queue of a usual setup (every stream holds one connection), far below the fd limit. */
export const DEFAULT_MAX_CONNECTIONS = 512;
const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;
/** JSON nesting deeper than this is refused before parsing: no request of these routes nests beyond 5. */
export const MAX_JSON_DEPTH = 64;

type Handler = (req: IncomingMessage, res: ServerResponse, params: readonly string[], log: RequestLog) => Promise<void> | void;

export class MiloraServer {
  readonly #http: Server;
  readonly #model: ServedModel;
  readonly #options: ServerOptions;
  /** The adapter root's real path; undefined while run-time adapter management is off. */
  readonly #adapterRoot: string | undefined;
  /** sha256 of the API key: compared to the given key's hash, so the comparison says nothing of its length. */
  readonly #keyHash: Buffer | undefined;
  readonly #routes: readonly (readonly [method: string, path: RegExp, handler: Handler])[];
  readonly #started = Math.floor(Date.now() / 1000);
  readonly #recorder: ServerMetrics;

  private constructor(model: ServedModel, options: ServerOptions) {
    if (options.apiKey !== undefined && options.apiKey.trim() === "") throw new RangeError("the API key is empty: give a key, or none to serve without one");
    const ui = options.ui === false ? undefined : new Dashboard(model);
    if (ui) model = ui.model; // the page watches the scheduler's requests
    this.#model = model;
    this.#options = options;
    const served = model;
    this.#recorder = new ServerMetrics({ model: model.baseName, scheduler: () => served.scheduler.stats(), adapters: () => served.adapters.stats() });
    this.#keyHash = options.apiKey === undefined ? undefined : sha256(options.apiKey);
    this.#adapterRoot = options.adapterRoot === undefined ? undefined : realDirectory(options.adapterRoot);
    this.#routes = [
      ["GET", /^\/health$/, (_q, res) => sendJson(res, model.scheduler.draining ? 503 : 200, { status: model.scheduler.draining ? "draining" : "ok" })],
      ["GET", /^\/metrics$/, (_q, res) => this.#metrics(res)],
      ["GET", /^\/v1\/models$/, (_q, res) => sendJson(res, 200, { object: "list", data: this.#modelIds().map((id) => this.#modelCard(id)) })],
      ["GET", /^\/v1\/models\/([^/]+)$/, (_q, res, [id]) => this.#getModel(res, id!)],
      ["POST", /^\/v1\/completions$/, async (req, res, _p, log) => handleGeneration("completion", await this.#json(req), res, model, log)],
      ["POST", /^\/v1\/chat\/completions$/, async (req, res, _p, log) => handleGeneration("chat", await this.#json(req), res, model, log)],
      ["POST", /^\/v1\/adapters$/, async (req, res) => this.#addAdapter(res, await this.#json(req))],
      ["DELETE", /^\/v1\/adapters\/([^/]+)$/, (_q, res, [name]) => this.#deleteAdapter(res, name!)],
      ...extraRoutes(() => this.extraHost),
      ...(ui?.routes() ?? []),
    ];
    const requestTimeout = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    const headersTimeout = Math.min(options.headersTimeoutMs ?? DEFAULT_HEADERS_TIMEOUT_MS, requestTimeout);
    this.#http = createServer(
      // Node checks the deadlines every connectionsCheckingInterval (30 s by default): often enough that they hold to a second.
      { headersTimeout, requestTimeout, connectionsCheckingInterval: Math.min(1000, Math.max(10, Math.floor(headersTimeout / 4))) },
      (req, res) => void this.#handle(req, res),
    );
    this.#http.maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
  }

  /**
   * Starts listening; resolves once the port is bound. Throws RangeError for an empty API key or a bad adapter root,
   * a usage MiloraError for a port in use.
   */
  static async start(model: ServedModel, options: ServerOptions): Promise<MiloraServer> {
    const server = new MiloraServer(model, options);
    const host = options.host ?? "127.0.0.1";
    await new Promise<void>((resolve, reject) => {
      server.#http.once("error", (e: NodeJS.ErrnoException) => {
        // A port taken or not ours to bind is the one who chose it to change.
        if (e.code === "EADDRINUSE" || e.code === "EACCES") reject(userError("usage", `cannot listen on ${host}:${options.port} (${e.code}): choose another port or host`));
        else reject(e);
      });
      server.#http.listen(options.port, host, () => resolve());
    });
    return server;
  }

  /** The base URL clients use, e.g. http://127.0.0.1:8080. */
  get url(): string {
    const { address, port } = this.#http.address() as AddressInfo;
    return `http://${address.includes(":") ? `[${address}]` : address}:${port}`;
  }

  /** Refuses new requests (503), lets every queued and running one finish, then closes. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#http.close(() => resolve()));
    await this.#model.scheduler.drain();
    this.#http.closeIdleConnections();
    await closed;
  }

  /** Stops at once: every connection closed, requests in flight cut off. */
  closeNow(): void {
    this.#http.close();
    this.#http.closeAllConnections();
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const log = accessLogFor(req, res, this.#options);
    log.onResult = (promptTokens, done) => this.#recorder.observe(promptTokens, done);
    try {
      const path = requestPath(req.url ?? "");
      log.route = path;
      // CORS comes before authorisation: a browser's preflight carries no credentials.
      if (corsHeaders(req, res, this.#options.corsOrigins)) return;
      // Authorisation comes before routing, so that without the key no route (nor whether a route
      // exists) can be learnt: everything but /health answers 401. /health stays open because load
      // balancers and orchestrators probe it without credentials, and it says only "ok" or "draining".
      if (path !== "/health") this.#authorize(req);
      const candidates = this.#routes.map(([method, pattern, handler]) => ({ method, handler, match: path.match(pattern) })).filter((r) => r.match);
      if (candidates.length === 0) throw notFound(`no route ${req.method} ${path}`, "unknown_url");
      const route = candidates.find((r) => r.method === req.method);
      if (!route) throw new ApiError(405, `${path} takes ${candidates.map((r) => r.method).join(", ")}, not ${req.method}`, "invalid_request_error", "method_not_allowed");
      await route.handler(req, res, route.match!.slice(1).map(decodeSegment), log);
    } catch (e) {
      this.#fail(req, res, e);
    }
  }

  #fail(req: IncomingMessage, res: ServerResponse, e: unknown): void {
    // The client went away (or was cut off by a deadline) before its request was read: nobody to answer.
    if (res.destroyed || (req.destroyed && !req.complete)) return;
    const answer = apiErrorOf(e);
    // Only a bug is a 500, logged with its stack; a user error is the client's answer.
    const error = answer ?? new ApiError(500, `internal error: ${(e as Error).message}`, "server_error");
    if (answer === undefined) process.stderr.write(`milora serve: ${(e as Error).stack ?? String(e)}\n`);
    if (res.headersSent) {
      res.end();
      return;
    }
    sendJson(res, error.status, error.body(), error.headers);
  }

  #authorize(req: IncomingMessage): void {
    if (this.#keyHash === undefined) return;
    const given = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1] ?? pageKey(req) ?? "";
    // Equal-length digests: the time taken depends on neither key's length nor where they differ.
    if (!timingSafeEqual(sha256(given), this.#keyHash)) {
      throw pageUnauthorized(req) ?? new ApiError(401, "a valid API key is needed: send `Authorization: Bearer KEY`", "invalid_request_error", "invalid_api_key");
    }
  }

  /** The body as JSON: 413 beyond the size bound, 400 when it does not parse or nests too deep. */
  async #json(req: IncomingMessage): Promise<unknown> {
    const limit = this.#options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
    if (Number(req.headers["content-length"] ?? 0) > limit) throw tooLarge(`the request body is larger than ${limit} bytes`, "request_too_large");
    const parts: Buffer[] = [];
    let size = 0;
    for await (const part of req) {
      size += (part as Buffer).length;
      if (size > limit) throw tooLarge(`the request body is larger than ${limit} bytes`, "request_too_large");
      parts.push(part as Buffer);
    }
    const text = Buffer.concat(parts).toString("utf8");
    if (jsonDepthExceeds(text, MAX_JSON_DEPTH)) throw badRequest(`the request body nests arrays and objects deeper than ${MAX_JSON_DEPTH} levels`);
    try {
      return JSON.parse(text);
    } catch (e) {
      // The message quotes the client's own body, nothing of the server's.
      throw badRequest(`the request body is not JSON: ${(e as Error).message}`);
    }
  }

  /** For routes.ts: what the extra routes need of the server. */
  get extraHost(): ExtraHost {
    return {
      model: this.#model,
      json: (req) => this.#json(req),
      addAdapter: (res, body, status) => this.#addAdapter(res, body, status),
      deleteAdapter: (res, name) => this.#deleteAdapter(res, name),
    };
  }

  #modelIds(): string[] {
    return [this.#model.baseName, ...this.#model.adapters.names()];
  }

  #modelCard(id: string) {
    const isBase = id === this.#model.baseName;
    return { id, object: "model", created: this.#started, owned_by: "milora", root: id, parent: isBase ? null : this.#model.baseName };
  }

  #getModel(res: ServerResponse, id: string): void {
    if (!this.#modelIds().includes(id)) throw notFound(`the model \`${id}\` does not exist`, "model_not_found", "model");
    sendJson(res, 200, this.#modelCard(id));
  }

  async #metrics(res: ServerResponse): Promise<void> {
    const text = await this.#recorder.text();
    res.writeHead(200, { "content-type": METRICS_CONTENT_TYPE });
    res.end(text);
  }

  /** The adapter root, or 403 while run-time adapter management is off. */
  #managementRoot(): string {
    if (this.#adapterRoot === undefined) {
      throw new ApiError(
        403,
        "run-time adapter loading is off on this server: start it with --allow-adapter-loading --adapter-root DIR",
        "invalid_request_error",
        "adapter_loading_disabled",
      );
    }
    return this.#adapterRoot;
  }

  async #addAdapter(res: ServerResponse, body: unknown, status = 201): Promise<void> {
    const root = this.#managementRoot();
    const { name, path } = (typeof body === "object" && body !== null ? body : {}) as { name?: unknown; path?: unknown };
    if (typeof name !== "string" || name === "") throw badRequest("`name` must be the adapter's model id", "name");
    if (typeof path !== "string" || path === "") throw badRequest("`path` must be an adapter directory inside the server's adapter root", "path");
    if (name === this.#model.baseName) throw badRequest(`\`${name}\` is the base model's id`, "name");
    if (this.#model.adapters.has(name)) throw badRequest(`an adapter named ${name} is already registered`, "name", "adapter_exists");
    const dir = confinedAdapterDir(root, path);
    // One answer for outside the root, missing, not a directory and a symlink leading out, so that it
    // tells nothing about the filesystem beyond the root.
    if (dir === undefined) throw new ApiError(403, "`path` must name an adapter directory inside the server's adapter root (symlinks resolved)", "invalid_request_error", "adapter_path_forbidden", "path");
    try {
      await this.#model.adapters.register(name, dir, { root });
    } catch (e) {
      // Messages name the directory as the client did, not by the server's real path.
      throw apiErrorOf(e, { param: "path", message: (e as Error).message.replaceAll(dir, path).replaceAll(root, "<adapter root>") }) ?? e;
    }
    sendJson(res, status, this.#modelCard(name));
  }

  #deleteAdapter(res: ServerResponse, name: string): void {
    this.#managementRoot();
    // The name is free at once (a new adapter may be registered under it); requests still running on
    // the old one finish with it, and it leaves memory after the last. An unknown name is a 404.
    this.#model.adapters.unregister(name);
    sendJson(res, 200, { id: name, object: "model", deleted: true });
  }
}

function sha256(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}

function realDirectory(dir: string): string {
  let real: string;
  try {
    real = realpathSync(dir);
  } catch {
    throw new RangeError(`the adapter root ${dir} does not exist`);
  }
  if (!statSync(real).isDirectory()) throw new RangeError(`the adapter root ${dir} is not a directory`);
  return real;
}

/** The path of a request target: origin form (/v1/models?x) or absolute form (http://host/v1/models); 400 for anything else. */
function requestPath(target: string): string {
  let url: URL | undefined;
  try {
    url = target.startsWith("/") ? new URL(target, "http://localhost") : /^https?:\/\//i.test(target) ? new URL(target) : undefined;
  } catch {
    url = undefined;
  }
  if (!url) throw badRequest("the request target is not a valid path", null, "invalid_request_target");
  return url.pathname;
}

/** A route's path segment, percent-decoded; 400 for malformed escapes (%ZZ, a lone %E2). */
function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw badRequest("the path has a malformed percent-encoding", null, "invalid_request_target");
  }
}

/** Whether `text` nests [ and { deeper than `max` (brackets inside strings do not count): linear, no recursion. */
export function jsonDepthExceeds(text: string, max: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) {
      if (++depth > max) return true;
    } else if (c === 0x5d || c === 0x7d) depth--;
  }
  return false;
}
