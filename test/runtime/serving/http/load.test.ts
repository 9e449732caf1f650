// Load: 64 requests from 16 concurrent clients over loopback, mixing completions and chat, streaming
// and not, n > 1, beam search, long prompts, penalties, logit_bias, logprobs, min_p/top_k, stop ids, three adapters
// for two resident places (so adapters are evicted and reloaded) and a few clients that hang up
// mid-stream. Every request must end (200, or its client's own hang-up), and afterwards no KV slot,
// adapter pin or queued request may be left.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { CTX, MODEL, eventually, startFixture } from "./fixture.ts";

const TENANTS = [MODEL, "a", "b", "c"];
const REQUESTS = 64;
const CLIENTS = 16;

function body(i: number): { path: string; body: Record<string, unknown>; hangUp: boolean } {
  const model = TENANTS[i % TENANTS.length]!;
  const long = i % 5 === 0;
  const prompt = Array.from({ length: long ? 100 + (i % 17) : 3 + (i % 7) }, (_, j) => (i * 31 + j * 7) % 500);
  const maxTokens = long ? CTX - prompt.length - 1 : 4 + (i % 6);
  // Beam search holds three slots at once until it ends, beside the batch.
  if (i % 16 === 9) return { path: "/v1/completions", body: { model, prompt, max_tokens: 6, n: 2, best_of: 3, use_beam_search: true }, hangUp: false };
  const fields: Record<string, unknown> = { model, max_tokens: Math.min(maxTokens, 12), temperature: i % 3 === 0 ? 0 : 0.8, seed: i };
  if (i % 4 === 1) fields.n = 2 + (i % 2);
  if (i % 6 === 2) Object.assign(fields, { presence_penalty: 0.5, frequency_penalty: 0.3, repetition_penalty: 1.2 });
  if (i % 7 === 3) fields.logit_bias = { 17: 5, 42: -100 };
  if (i % 8 === 4) fields.min_p = 0.1;
  if (i % 9 === 5) fields.top_k = 5;
  if (i % 10 === 6) fields.stop_token_ids = [17];
  const stream = i % 2 === 0;
  if (stream) Object.assign(fields, { stream: true, stream_options: { include_usage: true } });
  const chat = i % 3 === 1;
  if (chat && i % 5 !== 0) {
    if (i % 11 === 7) Object.assign(fields, { logprobs: true, top_logprobs: 2 });
    return { path: "/v1/chat/completions", body: { ...fields, messages: [{ role: "user", content: `message ${i}` }] }, hangUp: false };
  }
  if (i % 11 === 7) fields.logprobs = 2;
  return { path: "/v1/completions", body: { ...fields, prompt }, hangUp: stream && i % 13 === 0 };
}

test("64 mixed requests from 16 clients all finish; no slot, pin or queue entry is left", async () => {
  const f = await startFixture({ adapterNames: ["a", "b", "c"] });
  try {
    const started = Date.now();
    let next = 0;
    const outcomes: string[] = [];
    const client = async () => {
      for (let i = next++; i < REQUESTS; i = next++) {
        const { path, body: b, hangUp } = body(i);
        const abort = new AbortController();
        const res = await fetch(`${f.serving.server.url}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(b), signal: abort.signal });
        assert.is(res.status, 200, `request ${i}: ${res.status} ${res.status === 200 ? "" : await res.text()}`);
        if (hangUp) {
          const reader = res.body!.getReader();
          await reader.read();
          abort.abort();
          outcomes.push("hung up");
          continue;
        }
        const text = await res.text();
        if (b.stream) {
          assert.ok(text.endsWith("data: [DONE]\n\n"), `request ${i} stream ends with [DONE]`);
          const chunks = text.split("\n\n").filter((l) => l.startsWith("data: {")).map((l) => JSON.parse(l.slice(6)) as { choices: { index: number; finish_reason: string | null }[]; usage?: unknown });
          const finished = new Set(chunks.flatMap((c) => c.choices.filter((x) => x.finish_reason).map((x) => x.index)));
          assert.is(finished.size, (b.n as number | undefined) ?? 1, `request ${i}: every choice finishes`);
          assert.ok(chunks.slice(0, -1).every((c) => c.usage === null) && chunks.at(-1)!.usage !== null, `request ${i}: usage`);
        } else {
          const json = JSON.parse(text) as { choices: unknown[] };
          assert.is(json.choices.length, (b.n as number | undefined) ?? 1, `request ${i}: choices`);
        }
        outcomes.push("ok");
      }
    };
    await Promise.all(Array.from({ length: CLIENTS }, client));
    assert.is(outcomes.length, REQUESTS);
    assert.ok(Date.now() - started < 120_000, "bounded in time");
    // Hang-ups are settled at the scheduler's next step.
    const stats = () => f.serving.server && (f.serving as unknown as { engine: { freeSlots: number } }).engine.freeSlots;
    await eventually(async () => stats() === 4);
    const metrics = await (await fetch(`${f.serving.server.url}/metrics`)).text();
    assert.match(metrics, /milora_running_sequences 0/);
    assert.match(metrics, /milora_queue_depth 0/);
    const adapters = (await (await fetch(`${f.serving.server.url}/v1/adapters`)).json()) as { data: { running: number }[] };
    assert.ok(adapters.data.every((a) => a.running === 0), "no adapter pin left");
    assert.ok(Number(/milora_adapter_evictions_total (\d+)/.exec(metrics)![1]) > 0, "three adapters for two places: some were evicted");
  } finally {
    await f.close();
  }
});

test.run();
