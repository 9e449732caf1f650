// Every way a client can go wrong, each answered with OpenAI's error JSON and its status, with the
// server serving normally after each; plus disconnects, overload (429) and adapter management.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { copyFileSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { APIError } from "openai";
import { workerReader, type AdapterReader } from "../../../../runtime/serving/adapter-pool.ts";
import { CTX, MODEL, eventually, miloraField, startFixture, type Fixture } from "./fixture.ts";

const KEY = "sk-test-key";
let f: Fixture;

test.before(async () => {
  // One slot and a queue of one make overload easy to reach; a small body bound makes 413 cheap.
  // Adapters named spin-* are read by a worker that never answers, under a bound of 300 ms.
  const normal = workerReader({ timeoutMs: 60_000 });
  const spinning = workerReader({ timeoutMs: 300, module: new URL("./spin-worker.ts", import.meta.url) });
  const readAdapter: AdapterReader = (dir, name, ...rest) => (name.startsWith("spin") ? spinning : normal)(dir, name, ...rest);
  f = await startFixture({ apiKey: KEY, slots: 1, maxQueue: 1, maxBodyBytes: 16 * 1024, adapterLoading: true, readAdapter });
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

test("400 context_length_exceeded when prompt and max_tokens overflow the context, naming both; 413 for an oversized body", async () => {
  // As OpenAI and vLLM answer: a 400 with code context_length_exceeded, not a 413.
  const long = await apiError(() => f.client.completions.create({ model: MODEL, prompt: Array.from({ length: CTX }, () => 5) }));
  assert.is(long.status, 400);
  assert.is(long.code, "context_length_exceeded");
  assert.match(long.message, `maximum context length is ${CTX} tokens`);
  const overflow = await apiError(() => f.client.completions.create({ model: MODEL, prompt: Array.from({ length: 100 }, () => 5), max_tokens: 40 }));
  assert.is(overflow.status, 400);
  assert.is(overflow.code, "context_length_exceeded");
  assert.match(overflow.message, `needs 140 (100 in the prompt + max_tokens 40`);
  const fits = await f.client.completions.create({ model: MODEL, prompt: Array.from({ length: 100 }, () => 5), max_tokens: 28, temperature: 0 });
  assert.is(fits.usage!.prompt_tokens + 28, CTX);
  const huge = await raw("POST", "/v1/completions", JSON.stringify({ model: MODEL, prompt: "x".repeat(20_000) }));
  assert.is(huge.status, 413);
  assert.is(huge.json.error?.code, "request_too_large");
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

test("adapters added and removed at run time, from inside the adapter root only", async () => {
  const dir = f.adapterDir("fresh", 7);
  // Missing, outside the root, or escaping it: one answer, which tells nothing about what exists.
  const refusals = await Promise.all(
    [`${dir}-missing`, "/etc", "/nonexistent-dir", "../../..", "fresh/../../tiny"].map((path) => raw("POST", "/v1/adapters", JSON.stringify({ name: "broken", path }))),
  );
  for (const r of refusals) {
    assert.is(r.status, 403);
    assert.is(r.json.error?.code, "adapter_path_forbidden");
    assert.is(r.json.error?.message, refusals[0]!.json.error?.message);
  }
  // Relative to the root, or absolute inside it.
  assert.is((await raw("POST", "/v1/adapters", JSON.stringify({ name: "fresh", path: "fresh" }))).status, 201);
  assert.is((await raw("POST", "/v1/adapters", JSON.stringify({ name: "fresh2", path: dir }))).status, 201);
  assert.is((await raw("DELETE", "/v1/adapters/fresh2")).status, 200);
  assert.ok((await f.client.models.list()).data.some((m) => m.id === "fresh"));
  const r = await f.client.completions.create({ model: "fresh", prompt: "hello", max_tokens: 3, temperature: 0 });
  assert.is(miloraField(r).adapter, "fresh");
  assert.is((await raw("DELETE", "/v1/adapters/fresh")).status, 200);
  assert.is((await raw("DELETE", "/v1/adapters/fresh")).status, 404);
  assert.is((await apiError(() => f.client.completions.create({ model: "fresh", prompt: "hi" }))).status, 404);
  await stillServes();
});

test("adapter errors never quote file contents: a non-JSON config, weights symlinked out of the root, a bogus header", async () => {
  const SECRET = "SECRET-0123456789";
  const good = f.adapterDir("template", 5);
  const adapters = join(f.root, "adapters");
  const make = (name: string, config: string | null, weights: (path: string) => void) => {
    const dir = join(adapters, name);
    mkdirSync(dir);
    if (config === null) copyFileSync(join(good, "adapter_config.json"), join(dir, "adapter_config.json"));
    else writeFileSync(join(dir, "adapter_config.json"), config);
    weights(join(dir, "adapter_model.safetensors"));
  };
  const outside = join(f.root, "secret.txt"); // beside the adapter root, not in it
  writeFileSync(outside, `${SECRET} ${"x".repeat(100)}`);
  make("notjson", `${SECRET} this is not JSON`, (p) => copyFileSync(join(good, "adapter_model.safetensors"), p));
  make("linked", null, (p) => symlinkSync(outside, p));
  make("bogus", null, (p) => writeFileSync(p, `${SECRET}${"y".repeat(100)}`));
  make("badheader", null, (p) => {
    const header = Buffer.from(`{"t": {"dtype": "${SECRET}", "shape": [1], "data_offsets": [0, 4]}}`);
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(header.length));
    writeFileSync(p, Buffer.concat([length, header, Buffer.alloc(4)]));
  });
  const firstBytes = String(Buffer.from(SECRET).readBigUInt64LE(0)); // what a header length error used to print
  for (const name of ["notjson", "linked", "bogus", "badheader"]) {
    const r = await raw("POST", "/v1/adapters", JSON.stringify({ name, path: name }));
    assert.is(r.status, 400, `${name}: ${JSON.stringify(r.json)}`);
    const message = r.json.error!.message;
    assert.not.match(message, "SECRET", `${name}: ${message}`);
    assert.not.match(message, firstBytes, `${name}: ${message}`);
    assert.not.match(message, f.root, `${name}: the server's own paths stay out of it`);
  }
  // A directory symlink inside the root that leads out of it is refused like any path outside.
  symlinkSync(join(f.root, MODEL), join(adapters, "escape"));
  const escape = await raw("POST", "/v1/adapters", JSON.stringify({ name: "escape", path: "escape" }));
  assert.is(escape.status, 403);
  assert.is(escape.json.error?.code, "adapter_path_forbidden");
  await stillServes();
});

test("an adapter read that runs away is stopped at its bound: 504 naming the adapter, and the server serves on", async () => {
  f.adapterDir("spin-a", 3);
  const started = Date.now();
  const r = await raw("POST", "/v1/adapters", JSON.stringify({ name: "spin-a", path: "spin-a" }));
  assert.is(r.status, 504);
  assert.is(r.json.error?.code, "adapter_load_timeout");
  assert.match(r.json.error!.message, "adapter spin-a");
  assert.ok(Date.now() - started < 5000);
  assert.not.ok((await f.client.models.list()).data.some((m) => m.id === "spin-a"));
  await stillServes();
});

test("an adapter deleted while a request uses it: the name is free at once, the old one finishes its request", async () => {
  const dir = f.adapterDir("swap", 9);
  assert.is((await raw("POST", "/v1/adapters", JSON.stringify({ name: "swap", path: "swap" }))).status, 201);
  const alone = await f.client.completions.create({ model: "swap", prompt: "hello", max_tokens: 12, temperature: 0, ignore_eos: true } as never);
  const stream = (await f.client.completions.create({ model: "swap", prompt: "hello", max_tokens: 12, temperature: 0, stream: true, ignore_eos: true } as never)) as unknown as AsyncIterable<unknown>;
  const iterator = stream[Symbol.asyncIterator]();
  const tokens: number[] = [...miloraField((await iterator.next()).value).token_ids];
  assert.is((await raw("DELETE", "/v1/adapters/swap")).status, 200);
  assert.not.ok((await f.client.models.list()).data.some((m) => m.id === "swap"));
  // Registered again while the old instance still serves the stream above, as vLLM users expect.
  const again = await raw("POST", "/v1/adapters", JSON.stringify({ name: "swap", path: dir }));
  assert.is(again.status, 201, JSON.stringify(again.json));
  assert.ok((await f.client.models.list()).data.some((m) => m.id === "swap"));
  for (let r = await iterator.next(); !r.done; r = await iterator.next()) tokens.push(...miloraField(r.value).token_ids);
  assert.equal(tokens, miloraField(alone).token_ids);
  const fresh = await f.client.completions.create({ model: "swap", prompt: "hello", max_tokens: 12, temperature: 0, ignore_eos: true } as never);
  assert.equal(miloraField(fresh).token_ids, miloraField(alone).token_ids);
  assert.is((await raw("DELETE", "/v1/adapters/swap")).status, 200);
  await stillServes();
});

test.run();
