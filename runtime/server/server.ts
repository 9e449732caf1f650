// The HTTP server: OpenAI's routes over the scheduler, plus health, Prometheus metrics and run-time
// adapter management. Plain node:http; every failure a client can cause is an OpenAI-style error
// JSON, and anything else is a 500 that keeps the server serving.
import { timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { UnknownAdapterError } from "../adapter-pool.ts";
import { AdapterStoreError } from "../adapter-store.ts";
import { EngineError } from "../engine.ts";
import { CheckpointError } from "../safetensors.ts";
import { handleGeneration, sendJson, type ServedModel } from "./completions.ts";
import { ApiError, badRequest, notFound, tooLarge } from "./errors.ts";
import { METRICS_CONTENT_TYPE, renderMetrics } from "./metrics.ts";

export interface ServerOptions {
  /** 127.0.0.1 unless given: serving beyond the machine is a choice. */
  readonly host?: string;
  /** 0 picks a free port. */
  readonly port: number;
  /** When set, every route but /health wants `Authorization: Bearer KEY`. */
  readonly apiKey?: string;
  /** Largest request body (default 1 MiB). */
  readonly maxBodyBytes?: number;
}

type Handler = (req: IncomingMessage, res: ServerResponse, match: RegExpMatchArray) => Promise<void> | void;

export class MiloraServer {
  readonly #http: Server;
  readonly #model: ServedModel;
  readonly #options: ServerOptions;
  readonly #routes: readonly (readonly [method: string, path: RegExp, handler: Handler])[];
  readonly #started = Math.floor(Date.now() / 1000);

  private constructor(model: ServedModel, options: ServerOptions) {
    this.#model = model;
    this.#options = options;
    this.#routes = [
      ["GET", /^\/health$/, (_q, res) => sendJson(res, model.scheduler.draining ? 503 : 200, { status: model.scheduler.draining ? "draining" : "ok" })],
      ["GET", /^\/metrics$/, (_q, res) => this.#metrics(res)],
      ["GET", /^\/v1\/models$/, (_q, res) => sendJson(res, 200, { object: "list", data: this.#modelIds().map((id) => this.#modelCard(id)) })],
      ["GET", /^\/v1\/models\/([^/]+)$/, (_q, res, m) => this.#getModel(res, decodeURIComponent(m[1]!))],
      ["POST", /^\/v1\/completions$/, async (req, res) => handleGeneration("completion", await this.#json(req), res, model)],
      ["POST", /^\/v1\/chat\/completions$/, async (req, res) => handleGeneration("chat", await this.#json(req), res, model)],
      ["POST", /^\/v1\/adapters$/, async (req, res) => this.#addAdapter(res, await this.#json(req))],
      ["DELETE", /^\/v1\/adapters\/([^/]+)$/, (_q, res, m) => this.#deleteAdapter(res, decodeURIComponent(m[1]!))],
    ];
    this.#http = createServer((req, res) => void this.#handle(req, res));
  }

  /** Starts listening; resolves once the port is bound. */
  static async start(model: ServedModel, options: ServerOptions): Promise<MiloraServer> {
    const server = new MiloraServer(model, options);
    await new Promise<void>((resolve, reject) => {
      server.#http.once("error", reject);
      server.#http.listen(options.port, options.host ?? "127.0.0.1", () => resolve());
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

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const path = new URL(req.url ?? "/", "http://localhost").pathname;
      const candidates = this.#routes.map(([method, pattern, handler]) => ({ method, handler, match: path.match(pattern) })).filter((r) => r.match);
      if (candidates.length === 0) throw notFound(`no route ${req.method} ${path}`, "unknown_url");
      const route = candidates.find((r) => r.method === req.method);
      if (!route) throw new ApiError(405, `${path} takes ${candidates.map((r) => r.method).join(", ")}, not ${req.method}`, "invalid_request_error", "method_not_allowed");
      if (path !== "/health") this.#authorize(req);
      await route.handler(req, res, route.match!);
    } catch (e) {
      this.#fail(res, e);
    }
  }

  #fail(res: ServerResponse, e: unknown): void {
    const error = e instanceof ApiError ? e : new ApiError(500, `internal error: ${(e as Error).message}`, "server_error");
    if (!(e instanceof ApiError)) process.stderr.write(`milora serve: ${(e as Error).stack ?? String(e)}\n`);
    if (res.headersSent) {
      res.end();
      return;
    }
    sendJson(res, error.status, error.body(), error.headers);
  }

  #authorize(req: IncomingMessage): void {
    const key = this.#options.apiKey;
    if (key === undefined) return;
    const given = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1] ?? "";
    const a = Buffer.from(given);
    const b = Buffer.from(key);
    if (a.length !== b.length || !timingSafeEqual(a, b)) {
      throw new ApiError(401, "a valid API key is needed: send `Authorization: Bearer KEY`", "invalid_request_error", "invalid_api_key");
    }
  }

  /** The body as JSON: 413 beyond the size bound, 400 when it does not parse. */
  async #json(req: IncomingMessage): Promise<unknown> {
    const limit = this.#options.maxBodyBytes ?? 1024 * 1024;
    if (Number(req.headers["content-length"] ?? 0) > limit) throw tooLarge(`the request body is larger than ${limit} bytes`, "request_too_large");
    const parts: Buffer[] = [];
    let size = 0;
    for await (const part of req) {
      size += (part as Buffer).length;
      if (size > limit) throw tooLarge(`the request body is larger than ${limit} bytes`, "request_too_large");
      parts.push(part as Buffer);
    }
    try {
      return JSON.parse(Buffer.concat(parts).toString("utf8"));
    } catch (e) {
      throw badRequest(`the request body is not JSON: ${(e as Error).message}`);
    }
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

  #metrics(res: ServerResponse): void {
    const text = renderMetrics(this.#model.scheduler.stats(), this.#model.adapters.stats());
    res.writeHead(200, { "content-type": METRICS_CONTENT_TYPE });
    res.end(text);
  }

  async #addAdapter(res: ServerResponse, body: unknown): Promise<void> {
    const { name, path } = (typeof body === "object" && body !== null ? body : {}) as { name?: unknown; path?: unknown };
    if (typeof name !== "string" || name === "") throw badRequest("`name` must be the adapter's model id", "name");
    if (typeof path !== "string" || path === "") throw badRequest("`path` must be an adapter directory on the server", "path");
    if (name === this.#model.baseName) throw badRequest(`\`${name}\` is the base model's id`, "name");
    try {
      await this.#model.adapters.register(name, path);
    } catch (e) {
      if (e instanceof CheckpointError || e instanceof AdapterStoreError || e instanceof EngineError) throw badRequest(e.message, "path");
      throw e;
    }
    sendJson(res, 201, this.#modelCard(name));
  }

  #deleteAdapter(res: ServerResponse, name: string): void {
    try {
      this.#model.adapters.unregister(name);
    } catch (e) {
      if (e instanceof UnknownAdapterError) throw notFound(e.message, "model_not_found");
      throw e;
    }
    sendJson(res, 200, { id: name, object: "model", deleted: true });
  }
}
