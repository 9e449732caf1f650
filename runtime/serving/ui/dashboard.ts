// The page `milora serve` shows at / (off with --no-ui): the base and its adapters, live throughput,
// TTFT and TPOT, KV-slot use, the last requests with their routing heatmaps, and per tenant how often
// each module is switched on. The dashboard watches the scheduler's requests (it wraps submit, nothing
// else changes), keeps a bounded history, and answers the page's routes: the HTML, its script and
// style, uPlot from node_modules (nothing is fetched from elsewhere: the page works offline), the
// state as JSON (/ui/state) and the heatmaps as SVG, rendered by runtime/pictures/heatmap.ts.
import { readFileSync } from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { EXPERT_MODULES, type ExpertModule } from "../../../compiler/model.ts";
import { moduleUseSvg, routingSvg, type ModuleUsePanel } from "../../pictures/heatmap.ts";
import type { LayerRouting } from "../../engine/routing.ts";
import type { ServedModel } from "../http/completions.ts";
import { ApiError } from "../http/errors.ts";
import type { GenerationRequest, GenerationResult, Scheduler } from "../scheduler.ts";

/** Requests kept with their routing for the page. */
export const RECENT_REQUESTS = 20;
/** TTFT/TPOT points kept. */
export const LATENCY_POINTS = 500;
/** Seconds of throughput and slot samples kept (one a second). */
export const SAMPLE_SECONDS = 600;
/** The sampler stops after this long with neither a request nor a look at the page. */
const IDLE_STOP_MS = 60_000;

export interface RequestRecord {
  readonly id: number;
  readonly tenant: string;
  readonly adapter: string | null;
  /** Milliseconds since the epoch when it finished. */
  readonly finishedAt: number;
  readonly promptTokens: number;
  readonly completionTokens: number;
  readonly finish: string;
  readonly ttftMs: number | null;
  /** Mean milliseconds per output token after the first. */
  readonly tpotMs: number | null;
  readonly routingKind: "prompt" | "token" | "none";
  readonly routing: readonly LayerRouting[];
  /** The token at each position (prompt, then output), for a token strip's labels. */
  readonly tokenIds: readonly number[];
}

interface TenantUse {
  decisions: number;
  readonly on: Map<number, number[]>;
}

type Route = readonly [method: string, path: RegExp, handler: (req: IncomingMessage, res: ServerResponse, params: readonly string[]) => void];

const here = dirname(new URL(import.meta.url).pathname);
const uplotDir = dirname(createRequire(import.meta.url).resolve("uplot"));

/** Static files of the page: name -> [path, content type]. */
const FILES: Readonly<Record<string, readonly [string, string]>> = {
  "page.js": [join(here, "page.js"), "text/javascript; charset=utf-8"],
  "page.css": [join(here, "page.css"), "text/css; charset=utf-8"],
  "uPlot.iife.min.js": [join(uplotDir, "uPlot.iife.min.js"), "text/javascript; charset=utf-8"],
  "uPlot.min.css": [join(uplotDir, "uPlot.min.css"), "text/css; charset=utf-8"],
};

/** The page's paths: those the browser may authenticate with HTTP Basic (the API key as password). */
export function isPagePath(path: string): boolean {
  return path === "/" || path.startsWith("/ui/");
}

/**
 * For the page's paths when the server has an API key: the key the browser sent with HTTP Basic (any
 * user name, the key as password), or undefined. Browsers keep Basic credentials for the page's own
 * requests, so the page needs no script to send them.
 */
export function pageKey(req: IncomingMessage): string | undefined {
  if (!isPagePath(pathOf(req))) return undefined;
  const basic = /^Basic ([A-Za-z0-9+/=]+)$/.exec(req.headers.authorization ?? "")?.[1];
  if (basic === undefined) return undefined;
  const decoded = Buffer.from(basic, "base64").toString("utf8");
  const colon = decoded.indexOf(":");
  return colon < 0 ? undefined : decoded.slice(colon + 1);
}

/** The 401 for the page's paths: it asks the browser for the key (as a Basic password); undefined for API paths. */
export function pageUnauthorized(req: IncomingMessage): ApiError | undefined {
  if (!isPagePath(pathOf(req))) return undefined;
  return new ApiError(401, "this page needs the server's API key: give it as the password (any user name)", "invalid_request_error", "invalid_api_key", null, {
    "www-authenticate": 'Basic realm="milora", charset="UTF-8"',
  });
}

function pathOf(req: IncomingMessage): string {
  try {
    return new URL(req.url ?? "/", "http://localhost").pathname;
  } catch {
    return "";
  }
}

export class Dashboard {
  /** The served model with its scheduler watched: what the server's routes should use. */
  readonly model: ServedModel;
  readonly #inner: ServedModel;
  readonly #started = Date.now();
  readonly #recent: RequestRecord[] = [];
  readonly #latency: { t: number; ttft: number | null; tpot: number | null; tenant: string }[] = [];
  readonly #samples: { t: number; tokensPerSecond: number; running: number; queued: number }[] = [];
  readonly #use = new Map<string, TenantUse>();
  #nextId = 1;
  #timer: NodeJS.Timeout | undefined;
  #lastActivity = 0;
  #files = new Map<string, Buffer>();

  constructor(model: ServedModel) {
    this.#inner = model;
    this.model = { ...model, scheduler: this.#watch(model.scheduler) };
  }

  /** The server's routes for the page. */
  routes(): readonly Route[] {
    return [
      ["GET", /^\/$/, (_q, res) => this.#file(res, join(here, "page.html"), "text/html; charset=utf-8")],
      ["GET", /^\/ui\/state$/, (_q, res) => this.#json(res, this.state())],
      ["GET", /^\/ui\/routing\/(\d+)\.svg$/, (_q, res, [id]) => this.#routingSvg(res, Number(id))],
      ["GET", /^\/ui\/use\.svg$/, (_q, res) => this.#svg(res, this.moduleUseSvg())],
      ["GET", /^\/ui\/(page\.js|page\.css|uPlot\.iife\.min\.js|uPlot\.min\.css)$/, (_q, res, [name]) => this.#file(res, ...FILES[name!]!)],
    ];
  }

  /** Stops the sampler (the server is closing). */
  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** What the page draws. */
  state() {
    this.#active();
    const { scheduler, adapters } = this.#inner;
    const stats = scheduler.stats();
    const resident = new Set(adapters.residentNames());
    return {
      now: Date.now(),
      startedAt: this.#started,
      base: { name: this.#inner.baseName, ctx: this.#inner.ctx, vocabSize: this.#inner.vocabSize, tokenizer: this.#inner.tokenizer !== undefined },
      adapters: adapters.names().map((name) => {
        const key = adapters.keyOf(name);
        const seen = this.#recent.findLast((r) => r.tenant === name)?.routingKind;
        const routing = key !== undefined && adapters.routesOnPrompt(key) ? "prompt" : seen === "token" ? "token" : seen === "none" ? "none" : "token or none";
        return { name, resident: key !== undefined && resident.has(key), routing };
      }),
      slots: { total: stats.slots, running: stats.running, queued: stats.queued, batchSize: stats.batchSize },
      totals: { generatedTokens: stats.generatedTokens, steps: stats.steps, rejected: stats.rejected, tokensPerSecond: stats.tokensPerSecond },
      tenants: [...stats.tenants].map(([name, t]) => ({ name, tokens: t.tokens, finished: t.finished })),
      samples: {
        t: this.#samples.map((s) => s.t / 1000),
        tokensPerSecond: this.#samples.map((s) => s.tokensPerSecond),
        running: this.#samples.map((s) => s.running),
        queued: this.#samples.map((s) => s.queued),
      },
      latency: {
        t: this.#latency.map((l) => l.t / 1000),
        ttftMs: this.#latency.map((l) => l.ttft),
        tpotMs: this.#latency.map((l) => l.tpot),
        tenant: this.#latency.map((l) => l.tenant),
      },
      // Newest first; the routing itself is drawn by /ui/routing/ID.svg (a token-routed one is large).
      requests: [...this.#recent].reverse().map(({ routing, tokenIds: _ids, ...r }) => ({ ...r, routingDecisions: routing.length, layers: [...new Set(routing.map((d) => d.layer))].length })),
      use: [...this.#use].map(([tenant, u]) => ({ tenant, decisions: u.decisions })),
    };
  }

  /** Per tenant, the share of routing decisions that switched each (layer, module) on. */
  moduleUsePanels(): ModuleUsePanel[] {
    return [...this.#use].map(([title, u]) => {
      const layers = [...u.on.keys()].sort((a, b) => a - b);
      return { title, decisions: u.decisions, layers, on: layers.map((l) => u.on.get(l)!) };
    });
  }

  moduleUseSvg(): string {
    return moduleUseSvg(this.moduleUsePanels(), { title: "How often each module is switched on, per tenant" });
  }

  #watch(scheduler: Scheduler): Scheduler {
    const submit = (request: GenerationRequest): Promise<GenerationResult> => {
      const result = scheduler.submit(request);
      this.#active();
      result.then(
        (r) => this.#record(request, r),
        () => undefined,
      );
      return result;
    };
    // Everything else goes to the scheduler itself (its private state needs it as `this`).
    return new Proxy(scheduler, {
      get(target, prop) {
        if (prop === "submit") return submit;
        const value = Reflect.get(target, prop, target) as unknown;
        return typeof value === "function" ? (value as (...a: unknown[]) => unknown).bind(target) : value;
      },
    });
  }

  #record(request: GenerationRequest, r: GenerationResult): void {
    if (r.finish === "cancelled" && r.tokens.length === 0) return;
    const kind = r.routing.length === 0 ? "none" : r.routing.some((d) => d.position !== undefined) ? "token" : "prompt";
    const ttft = Number.isFinite(r.timeToFirstTokenMs) ? r.timeToFirstTokenMs : null;
    const tpot = r.tokens.length > 1 ? r.decodeMs / (r.tokens.length - 1) : null;
    const record: RequestRecord = {
      id: this.#nextId++,
      tenant: request.tenant,
      adapter: request.adapter === undefined ? null : request.tenant,
      finishedAt: Date.now(),
      promptTokens: request.prompt.length,
      completionTokens: r.tokens.length,
      finish: r.finish,
      ttftMs: ttft,
      tpotMs: tpot,
      routingKind: kind,
      routing: r.routing,
      tokenIds: [...request.prompt, ...r.tokens],
    };
    this.#recent.push(record);
    if (this.#recent.length > RECENT_REQUESTS) this.#recent.shift();
    this.#latency.push({ t: record.finishedAt, ttft, tpot, tenant: request.tenant });
    if (this.#latency.length > LATENCY_POINTS) this.#latency.shift();
    if (r.routing.length > 0) this.#count(request.tenant, r.routing);
    this.#active();
  }

  /** Each position's decisions are one decision set (a prompt-routed request has one). */
  #count(tenant: string, routing: readonly LayerRouting[]): void {
    let use = this.#use.get(tenant);
    if (!use) this.#use.set(tenant, (use = { decisions: 0, on: new Map() }));
    use.decisions += new Set(routing.map((d) => d.position ?? -1)).size;
    for (const d of routing) {
      let row = use.on.get(d.layer);
      if (!row) use.on.set(d.layer, (row = EXPERT_MODULES.map(() => 0)));
      for (const [m, g] of Object.entries(d.experts)) if (g !== undefined && g !== 0) row[EXPERT_MODULES.indexOf(m as ExpertModule)]!++;
    }
  }

  /** Starts the one-a-second sampler when it is idle; it stops itself when nobody looks or asks. */
  #active(): void {
    this.#lastActivity = Date.now();
    if (this.#timer) return;
    this.#sample();
    this.#timer = setInterval(() => {
      if (Date.now() - this.#lastActivity > IDLE_STOP_MS) return this.stop();
      this.#sample();
    }, 1000);
    this.#timer.unref();
  }

  #sample(): void {
    const s = this.#inner.scheduler.stats();
    this.#samples.push({ t: Date.now(), tokensPerSecond: s.tokensPerSecond, running: s.running, queued: s.queued });
    if (this.#samples.length > SAMPLE_SECONDS) this.#samples.shift();
  }

  #routingSvg(res: ServerResponse, id: number): void {
    const r = this.#recent.find((x) => x.id === id);
    if (!r) throw new ApiError(404, `request ${id} is not among the last ${RECENT_REQUESTS}`, "invalid_request_error", "not_found");
    const tokenizer = this.#inner.tokenizer;
    const tokens = r.routingKind === "token" && tokenizer ? r.tokenIds.map((t) => tokenizer.decode([t])) : undefined;
    this.#svg(res, routingSvg([{ title: r.tenant, routing: r.routing, ...(tokens ? { tokens } : {}) }], { title: `Routing of request ${id} (${r.tenant})` }));
  }

  #json(res: ServerResponse, body: unknown): void {
    res.writeHead(200, { "content-type": "application/json; charset=utf-8", "cache-control": "no-store" });
    res.end(JSON.stringify(body));
  }

  #svg(res: ServerResponse, svg: string): void {
    res.writeHead(200, { "content-type": "image/svg+xml; charset=utf-8", "cache-control": "no-store", "x-content-type-options": "nosniff" });
    res.end(svg);
  }

  #file(res: ServerResponse, path: string, type: string): void {
    let body = this.#files.get(path);
    if (!body) this.#files.set(path, (body = readFileSync(path)));
    res.writeHead(200, {
      "content-type": type,
      "cache-control": "no-cache",
      "x-content-type-options": "nosniff",
      // Only the server's own files: no inline script, nothing from elsewhere. uPlot sets inline styles.
      "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
    });
    res.end(body);
  }
}
