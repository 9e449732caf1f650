// Every way a client can go wrong, each answered with OpenAI's error JSON and its status, with the
// server serving normally after each; plus disconnects, overload (429) and adapter management.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { APIError } from "openai";
import { CTX, MODEL, eventually, miloraField, startFixture, type Fixture } from "./fixture.ts";

const KEY = "sk-test-key";
let f: Fixture;

test.before(async () => {
  // One slot and a queue of one make overload easy to reach; a small body bound makes 413 cheap.
  f = await startFixture({ apiKey: KEY, slots: 1, maxQueue: 1, maxBodyBytes: 16 * 1024 });
});
test.after(async () => {
  await f.close();
});

/** The status and error body of a raw request. */
async function raw(method: string, path: string, body?: string, key: string | null = KEY) {
  const res = await fetch(`${f.serving.server.url}${path}`, {
    method,
    headers: { "content-type": "application/json", ...(key === null ? {} : { authorization: `Bearer ${key}` }) },
    ...(body === undefined ? {} : { body }),
  });
  return { status: res.status, headers: res.headers, json: (await res.json()) as { error?: { message: string; type: string; param: string | null; code: string | null } } };
}

async function stillServes(): Promise<void> {
  const r = await f.client.completions.create({ model: MODEL, prompt: "hello", max_tokens: 2, temperature: 0 });
  assert.is(miloraField(r).token_ids.length, 2);
}

async function apiError(call: () => Promise<unknown>): Promise<APIError> {
  try {
    await call();
  } catch (e) {
    assert.instance(e, APIError);
    return e as APIError;
  }
  throw new Error("the call succeeded but an error was expected");
}

test("400: a body that is not JSON, and fields with bad values, named by `param`", async () => {
  const notJson = await raw("POST", "/v1/completions", "{not json");
  assert.is(notJson.status, 400);
  assert.is(notJson.json.error?.type, "invalid_request_error");
  const cases: [Record<string, unknown>, string][] = [
    [{ model: MODEL, prompt: "hi", temperature: 5 }, "temperature"],
    [{ model: MODEL, prompt: "hi", n: 2 }, "n"],
    [{ model: MODEL, prompt: "hi", max_tokens: 0 }, "max_tokens"],
    [{ model: MODEL, prompt: [1, 99999] }, "prompt"],
    [{ model: MODEL, prompt: ["a", "b"] }, "prompt"],
    [{ model: MODEL }, "prompt"],
    [{ prompt: "hi" }, "model"],
    [{ model: MODEL, prompt: "hi", stop: [1] }, "stop"],
  ];
  for (const [body, param] of cases) {
    const r = await raw("POST", "/v1/completions", JSON.stringify(body));
    assert.is(r.status, 400, JSON.stringify(body));
    assert.is(r.json.error?.param, param, JSON.stringify(body));
  }
  const chat = await apiError(() => f.client.chat.completions.create({ model: MODEL, messages: [] }));
  assert.is(chat.status, 400);
  await stillServes();
});

test("401 without the API key on every route but /health", async () => {
  for (const [method, path] of [["GET", "/v1/models"], ["GET", "/metrics"], ["POST", "/v1/completions"]] as const) {
    const r = await raw(method, path, method === "POST" ? "{}" : undefined, null);
    assert.is(r.status, 401, path);
    assert.is(r.json.error?.code, "invalid_api_key");
  }
  assert.is((await raw("GET", "/v1/models", undefined, "wrong")).status, 401);
  assert.is((await raw("GET", "/health", undefined, null)).status, 200);
});

test("404 for an unknown model and an unknown route", async () => {
  const e = await apiError(() => f.client.completions.create({ model: "nobody", prompt: "hi" }));
  assert.is(e.status, 404);
  assert.is(e.code, "model_not_found");
  assert.is((await raw("GET", "/v1/nothing")).status, 404);
  await stillServes();
});

test("413 for a prompt longer than the context and for an oversized body", async () => {
  const long = await apiError(() => f.client.completions.create({ model: MODEL, prompt: Array.from({ length: CTX }, () => 5) }));
  assert.is(long.status, 413);
  assert.is(long.code, "context_length_exceeded");
  const huge = await raw("POST", "/v1/completions", JSON.stringify({ model: MODEL, prompt: "x".repeat(20_000) }));
  assert.is(huge.status, 413);
  await stillServes();
});

test("a client that disconnects mid-stream frees its slot; the next request runs", async () => {
  const before = (await f.metric(`milora_requests_total{adapter="${MODEL}",finish="cancelled"}`)) ?? 0;
  const stream = await f.client.completions.create({ model: MODEL, prompt: "hello", max_tokens: 100, temperature: 0, stream: true, ignore_eos: true } as never);
  let chunks = 0;
  for await (const _ of stream as unknown as AsyncIterable<unknown>) if (++chunks === 2) break; // leaving the loop aborts the request
  await eventually(async () => (await f.metric("milora_running_sequences")) === 0);
  assert.is(await f.metric(`milora_requests_total{adapter="${MODEL}",finish="cancelled"}`), before + 1);
  assert.is(f.serving.engine.freeSlots, 1);
  await stillServes();
});

test("429 with Retry-After when the slot and the queue are taken", async () => {
  const long = { model: MODEL, prompt: "hello", max_tokens: CTX - 8, temperature: 0, stream: true, ignore_eos: true } as never;
  const running = (await f.client.completions.create(long)) as unknown as AsyncIterable<unknown> & { controller: AbortController };
  const iterator = running[Symbol.asyncIterator]();
  await iterator.next(); // it holds the only slot now
  const queued = (await f.client.completions.create(long)) as unknown as { controller: AbortController };
  const refused = await apiError(() => f.client.completions.create({ model: MODEL, prompt: "hi", max_tokens: 2 }));
  assert.is(refused.status, 429);
  assert.ok(Number(refused.headers?.get("retry-after")) >= 1);
  running.controller.abort();
  queued.controller.abort();
  await eventually(async () => (await f.metric("milora_running_sequences")) === 0 && (await f.metric("milora_queue_depth")) === 0);
  await stillServes();
});

test("adapters added and removed at run time", async () => {
  const dir = f.adapterDir("fresh", 7);
  const bad = await raw("POST", "/v1/adapters", JSON.stringify({ name: "broken", path: `${dir}-missing` }));
  assert.is(bad.status, 400);
  assert.is(bad.json.error?.param, "path");
  assert.is((await raw("POST", "/v1/adapters", JSON.stringify({ name: "fresh", path: dir }))).status, 201);
  assert.ok((await f.client.models.list()).data.some((m) => m.id === "fresh"));
  const r = await f.client.completions.create({ model: "fresh", prompt: "hello", max_tokens: 3, temperature: 0 });
  assert.is(miloraField(r).adapter, "fresh");
  assert.is((await raw("DELETE", "/v1/adapters/fresh")).status, 200);
  assert.is((await raw("DELETE", "/v1/adapters/fresh")).status, 404);
  assert.is((await apiError(() => f.client.completions.create({ model: "fresh", prompt: "hi" }))).status, 404);
  await stillServes();
});

test.run();
