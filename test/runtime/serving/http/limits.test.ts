// What the server bounds and refuses before any model work, over a stand-in model (no GPU): the API
// key checked before routing, request targets and percent-escapes that do not parse, JSON nested
// beyond reason, clients that trickle their request, and connections beyond the cap. Each a 4xx with
// OpenAI's error JSON (or a closed socket), never a 500 and never a stack trace in the log.
import { connect, type Socket } from "node:net";
import { test } from "uvu";
import * as assert from "uvu/assert";
import type { ServedModel } from "../../../../runtime/serving/http/completions.ts";
import { completionParams } from "../../../../runtime/serving/http/params.ts";
import { MAX_JSON_DEPTH, MiloraServer, jsonDepthExceeds, type ServerOptions } from "../../../../runtime/serving/http/server.ts";

const KEY = "sk-limits";

/** Enough of a model for routes that never reach the scheduler. */
const model = {
  scheduler: { draining: false, drain: async () => {}, stats: () => ({ slots: 1, running: 0, queued: 0, batchSize: 0, steps: 0, generatedTokens: 0, tokensPerSecond: 0, rejected: 0, tenants: new Map() }) },
  adapters: { names: () => [], has: () => false, keyOf: () => undefined, routesOnPrompt: () => false, stats: () => ({ registered: 0, resident: 0, loads: 0, evictions: 0 }) },
  baseName: "stand-in",
  vocabSize: 100,
  ctx: 16,
} as unknown as ServedModel;

/** Runs `body` against a server with `options`, collecting what it writes to stderr. */
async function withServer(options: Partial<ServerOptions>, body: (server: MiloraServer, log: string[]) => Promise<void>): Promise<void> {
  const log: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array) => (log.push(String(chunk)), true)) as typeof process.stderr.write;
  const server = await MiloraServer.start(model, { port: 0, apiKey: KEY, ...options });
  try {
    await body(server, log);
  } finally {
    server.closeNow();
    process.stderr.write = write;
  }
  assert.equal(log, [], "nothing logged: every refusal was a client's mistake");
}

/** Sends raw bytes and resolves with everything the server answered once it closes the socket (or after `ms`). */
function rawExchange(server: MiloraServer, bytes: string, ms = 3000): Promise<string> {
  const { port } = new URL(server.url);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(port), "127.0.0.1");
    let got = "";
    const timer = setTimeout(() => (socket.destroy(), resolve(got)), ms);
    socket.on("data", (d) => (got += d.toString()));
    socket.on("close", () => (clearTimeout(timer), resolve(got)));
    socket.on("error", reject);
    socket.write(bytes);
  });
}

const status = (answer: string) => Number(/^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1]);

test("an empty API key is refused at start, never taken as no authentication", async () => {
  for (const apiKey of ["", "  "]) {
    let refused: unknown;
    await MiloraServer.start(model, { port: 0, apiKey }).then((s) => s.closeNow(), (e: unknown) => (refused = e));
    assert.instance(refused, RangeError);
    assert.match((refused as Error).message, "the API key is empty");
  }
});

test("the key is checked before routing: without it every route, known or not, is 401; /health stays open", async () => {
  await withServer({}, async (server) => {
    for (const path of ["/v1/models", "/v1/nothing", "/v1/models/x/y", "/admin"]) {
      for (const authorization of [undefined, "Bearer wrong", `Bearer ${KEY}x`, `Bearer ${KEY.slice(1)}`, "Basic x"]) {
        const res = await fetch(`${server.url}${path}`, { headers: authorization === undefined ? {} : { authorization } });
        assert.is(res.status, 401, `${path} with ${authorization}`);
        assert.is(((await res.json()) as { error: { code: string } }).error.code, "invalid_api_key");
      }
    }
    assert.is((await fetch(`${server.url}/health`)).status, 200);
    assert.is((await fetch(`${server.url}/v1/nothing`, { headers: { authorization: `Bearer ${KEY}` } })).status, 404);
  });
});

test("malformed percent-escapes and request targets are 400s", async () => {
  await withServer({}, async (server) => {
    const auth = { authorization: `Bearer ${KEY}` };
    for (const [method, path] of [["GET", "/v1/models/%ZZ"], ["DELETE", "/v1/adapters/%ZZ"], ["GET", "/v1/models/%E2%82"]] as const) {
      const res = await fetch(`${server.url}${path}`, { method, headers: auth });
      assert.is(res.status, 400, `${method} ${path}`);
      assert.is(((await res.json()) as { error: { code: string } }).error.code, "invalid_request_target");
    }
    for (const target of ["http://[::1", "*", "v1/models", "http://[::1]:99999/x"]) {
      const answer = await rawExchange(server, `GET ${target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nConnection: close\r\n\r\n`);
      assert.is(status(answer), 400, `${target}: ${answer.split("\r\n")[0]}`);
    }
  });
});

test("a 200,000-deep nested prompt is a 400 before any recursive walk; the batch form unwraps once only", async () => {
  assert.ok(jsonDepthExceeds("[".repeat(MAX_JSON_DEPTH + 1) + "]".repeat(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH));
  assert.not.ok(jsonDepthExceeds(`{"a": "${"[".repeat(1000)}", "b": [[1]]}`, MAX_JSON_DEPTH), "brackets inside strings do not nest");
  assert.throws(() => completionParams({ model: "m", prompt: [[[1, 2]]] }), (e: Error) => /`prompt` must be text/.test(e.message));
  assert.equal(completionParams({ model: "m", prompt: [[1, 2]] }).prompt, [1, 2]);
  await withServer({ maxBodyBytes: 1024 * 1024 }, async (server) => {
    const deep = 200_000;
    const body = `{"model": "stand-in", "prompt": ${"[".repeat(deep)}1${"]".repeat(deep)}}`;
    const res = await fetch(`${server.url}/v1/completions`, { method: "POST", headers: { authorization: `Bearer ${KEY}`, "content-type": "application/json" }, body });
    assert.is(res.status, 400);
    assert.match(((await res.json()) as { error: { message: string } }).error.message, `deeper than ${MAX_JSON_DEPTH} levels`);
  });
});

test("a client trickling its body is cut off at the request deadline, not held for minutes", async () => {
  await withServer({ headersTimeoutMs: 500, requestTimeoutMs: 1000 }, async (server) => {
    const { port } = new URL(server.url);
    const socket = connect(Number(port), "127.0.0.1");
    await new Promise((r) => socket.once("connect", r));
    const started = Date.now();
    socket.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n`);
    let answer = "";
    socket.on("data", (d) => (answer += d.toString()));
    const trickle = setInterval(() => socket.write(" "), 100);
    await new Promise<void>((resolve) => {
      const giveUp = setTimeout(() => resolve(), 8000);
      socket.once("close", () => (clearTimeout(giveUp), resolve()));
    });
    clearInterval(trickle);
    const held = Date.now() - started;
    assert.ok(socket.destroyed, "the server closed the connection");
    assert.ok(held < 5000, `held for ${held} ms`);
    if (answer !== "") assert.is(status(answer), 408);
    socket.destroy();
    // Headers that never end are cut off too.
    const headersOnly = await rawExchange(server, `GET /health HTTP/1.1\r\nHost: x\r\n`, 6000);
    assert.ok(headersOnly === "" || status(headersOnly) === 408, headersOnly);
  });
});

test("connections beyond the cap are closed as they arrive; the server serves again once they go", async () => {
  await withServer({ maxConnections: 2 }, async (server) => {
    const { port } = new URL(server.url);
    const open = async (): Promise<Socket> => {
      const s = connect(Number(port), "127.0.0.1");
      await new Promise((r) => s.once("connect", r));
      return s;
    };
    const held = [await open(), await open()];
    await new Promise((r) => setTimeout(r, 100));
    const third = await rawExchange(server, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 2000);
    assert.is(third, "", "the connection over the cap got no answer");
    for (const s of held) s.destroy();
    await new Promise((r) => setTimeout(r, 100));
    assert.is(status(await rawExchange(server, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")), 200);
  });
});

test("run-time adapter management is off unless the server is given an adapter root", async () => {
  await withServer({}, async (server) => {
    const auth = { authorization: `Bearer ${KEY}`, "content-type": "application/json" };
    for (const [method, path, body] of [["POST", "/v1/adapters", JSON.stringify({ name: "x", path: "/etc" })], ["DELETE", "/v1/adapters/x", undefined]] as const) {
      const res = await fetch(`${server.url}${path}`, { method, headers: auth, ...(body === undefined ? {} : { body }) });
      assert.is(res.status, 403, `${method} ${path}`);
      const error = ((await res.json()) as { error: { code: string; message: string } }).error;
      assert.is(error.code, "adapter_loading_disabled");
      assert.match(error.message, "--allow-adapter-loading --adapter-root DIR");
    }
  });
});

test.run();
