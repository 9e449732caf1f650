// The routes beside OpenAI's, driven with plain fetch as curl would: GET /v1/adapters, vLLM's
// load/unload routes, /tokenize and /detokenize, CORS, the access log, --served-model-name, chat
// templates from an adapter directory and from --chat-template, and the metrics under vLLM's names.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { miloraField, startFixture, type Fixture } from "./fixture.ts";

const SERVED = "my-model";
let f: Fixture;
const log: string[] = [];

test.before(async () => {
  f = await startFixture({ adapterNames: ["alpha", "beta"], adapterLoading: true, servedModelName: SERVED, corsOrigins: ["https://app.example"], accessLog: (line) => log.push(line) });
});
test.after(async () => {
  await f.close();
});

const url = (path: string) => `${f.serving.server.url}${path}`;
async function post(path: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(url(path), { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });
  return { status: res.status, headers: res.headers, json: (await res.json()) as Record<string, unknown> };
}

test("--served-model-name: the base is listed and served under that id", async () => {
  const models = await f.client.models.list();
  assert.equal(models.data.map((m) => m.id), [SERVED, "alpha", "beta"]);
  const r = await f.client.completions.create({ model: SERVED, prompt: [1, 2, 3], max_tokens: 2, temperature: 0 });
  assert.is(r.model, SERVED);
});

test("GET /v1/adapters: every adapter, resident or not, with its slot and last use", async () => {
  await f.client.completions.create({ model: "alpha", prompt: [1, 2, 3], max_tokens: 1 });
  const list = (await (await fetch(url("/v1/adapters"))).json()) as { data: { id: string; resident: boolean; slot: number | null; last_used: number | null; running: number }[] };
  assert.equal(list.data.map((a) => a.id), ["alpha", "beta"]);
  const alpha = list.data[0]!;
  assert.ok(alpha.resident);
  assert.ok(Number.isInteger(alpha.slot));
  assert.ok(alpha.last_used! >= Math.floor(Date.now() / 1000) - 60);
  assert.is(alpha.running, 0);
});

test("vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, confined to the adapter root", async () => {
  const dir = f.adapterDir("gamma", 7);
  const loaded = await post("/v1/load_lora_adapter", { lora_name: "gamma", lora_path: dir });
  assert.is(loaded.status, 200);
  assert.ok((await f.client.models.list()).data.some((m) => m.id === "gamma"));
  const outside = await post("/v1/load_lora_adapter", { lora_name: "delta", lora_path: "/etc" });
  assert.is(outside.status, 403);
  assert.is((await post("/v1/unload_lora_adapter", { lora_name: "gamma" })).status, 200);
  assert.is((await post("/v1/unload_lora_adapter", { lora_name: "gamma" })).status, 404);
  assert.is((await post("/v1/load_lora_adapter", { lora_name: "x", lora_path: dir, extra: 1 })).status, 400);
});

test("/tokenize and /detokenize round-trip text, multi-byte included; a chat's tokens are the chat request's prompt", async () => {
  const text = "cafe ☕ and more";
  const tok = await post("/tokenize", { model: SERVED, prompt: text, add_special_tokens: false });
  assert.is(tok.status, 200);
  const tokens = tok.json.tokens as number[];
  assert.is(tok.json.count, tokens.length);
  assert.is(tok.json.max_model_len, 128);
  assert.is((await post("/detokenize", { tokens })).json.prompt, text);
  const messages = [{ role: "user", content: "hello" }];
  const chatTokens = (await post("/tokenize", { messages })).json.tokens as number[];
  const r = await f.client.chat.completions.create({ model: SERVED, messages: messages as never, max_tokens: 1 });
  assert.equal(miloraField(r).prompt_token_ids, chatTokens);
  assert.is((await post("/detokenize", { tokens: [1e9] })).status, 400);
});

test("CORS: a listed origin gets the header and its preflight; another origin gets neither", async () => {
  const pre = await fetch(url("/v1/completions"), { method: "OPTIONS", headers: { origin: "https://app.example", "access-control-request-method": "POST", "access-control-request-headers": "content-type, authorization" } });
  assert.is(pre.status, 204);
  assert.is(pre.headers.get("access-control-allow-origin"), "https://app.example");
  assert.match(pre.headers.get("access-control-allow-methods")!, "POST");
  const ok = await fetch(url("/v1/models"), { headers: { origin: "https://app.example" } });
  assert.is(ok.headers.get("access-control-allow-origin"), "https://app.example");
  const other = await fetch(url("/v1/models"), { headers: { origin: "https://evil.example" } });
  assert.is(other.headers.get("access-control-allow-origin"), null);
  const otherPre = await fetch(url("/v1/completions"), { method: "OPTIONS", headers: { origin: "https://evil.example", "access-control-request-method": "POST" } });
  assert.is(otherPre.status, 405);
});

test("an access log line per request: method, route, model, status, tokens, time", async () => {
  log.length = 0;
  await f.client.completions.create({ model: "beta", prompt: [5, 6, 7], max_tokens: 3, temperature: 0 });
  await fetch(url("/nowhere"));
  await new Promise((r) => setTimeout(r, 50));
  assert.match(log[0]!, /^POST \/v1\/completions model=beta status=200 tokens=3\+3 ms=\d+\.\d$/);
  assert.match(log[1]!, /^GET \/nowhere model=- status=404 tokens=- ms=/);
});

test("metrics under vLLM's names: TTFT, TPOT, end-to-end and queue histograms, token counters, KV usage; adapter loads", async () => {
  await f.client.completions.create({ model: SERVED, prompt: [1, 2, 3, 4], max_tokens: 4, temperature: 0 });
  const text = await (await fetch(url("/metrics"))).text();
  for (const name of ["vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"]) {
    const line = text.split("\n").find((l) => l.startsWith(`${name}{model_name="${SERVED}"}`));
    assert.ok(line && Number(line.split(" ").at(-1)) >= 1, name);
  }
  assert.match(text, /vllm:prompt_tokens_total\{model_name="my-model"\} \d+/);
  assert.match(text, /vllm:generation_tokens_total\{model_name="my-model"\} \d+/);
  assert.match(text, /vllm:kv_cache_usage_perc\{model_name="my-model"\} 0/);
  assert.match(text, /vllm:request_success_total\{model_name="my-model",finished_reason="length"\} \d+/);
  assert.match(text, /milora_adapter_loads_total \d+/);
  assert.match(text, /milora_requests_total\{adapter="alpha",finish="length"\} 1/);
});

test("an adapter directory's own chat_template.jinja renders its chats; the base keeps its own", async () => {
  const dir = f.adapterDir("templated", 9);
  writeFileSync(join(dir, "chat_template.jinja"), "{% for m in messages %}<<{{ m.content }}>>{% endfor %}");
  assert.is((await post("/v1/load_lora_adapter", { lora_name: "templated", lora_path: dir })).status, 200);
  const messages = [{ role: "user" as const, content: "hi" }];
  const own = miloraField(await f.client.chat.completions.create({ model: "templated", messages, max_tokens: 1 }));
  const want = (await post("/tokenize", { prompt: "<<hi>>", add_special_tokens: false })).json.tokens;
  assert.equal(own.prompt_token_ids, want);
  const base = miloraField(await f.client.chat.completions.create({ model: SERVED, messages, max_tokens: 1 }));
  assert.not.equal(base.prompt_token_ids, want);
});

test("--chat-template FILE is used for every request", async () => {
  const g = await startFixture({ fromCheckpoint: (dir) => {
    const file = join(dir, "..", "custom.jinja");
    writeFileSync(file, "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}");
    return { chatTemplateFile: file };
  } });
  try {
    const r = await g.client.chat.completions.create({ model: "tiny", messages: [{ role: "user", content: "yo" }], max_tokens: 1 });
    const res = await fetch(`${g.serving.server.url}/tokenize`, { method: "POST", body: JSON.stringify({ prompt: "[user] yo", add_special_tokens: false }) });
    assert.equal(miloraField(r).prompt_token_ids, ((await res.json()) as { tokens: number[] }).tokens);
  } finally {
    await g.close();
  }
});

test.run();
