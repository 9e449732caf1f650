// The server driven by the official OpenAI client: completions and chat, streamed and not, and many
// tenants at once, where every response must equal the same request served alone (greedy decoding).
import { test } from "uvu";
import * as assert from "uvu/assert";
import { MODEL, eventually, miloraField, startFixture, type Fixture } from "./fixture.ts";

const TENANTS = ["alpha", "beta", "gamma", "delta"];
let f: Fixture;

test.before(async () => {
  f = await startFixture({ adapterNames: TENANTS });
});
test.after(async () => {
  await f.close();
});

type Outcome = { text: string; tokens: number[]; finish: string | null };

async function complete(model: string, prompt: string | number[], maxTokens: number, stream: boolean): Promise<Outcome> {
  const params = { model, prompt, max_tokens: maxTokens, temperature: 0 };
  if (!stream) {
    const r = await f.client.completions.create(params);
    return { text: r.choices[0]!.text, tokens: miloraField(r).token_ids, finish: r.choices[0]!.finish_reason };
  }
  const out: Outcome = { text: "", tokens: [], finish: null };
  for await (const chunk of await f.client.completions.create({ ...params, stream: true })) {
    out.text += chunk.choices[0]?.text ?? "";
    out.tokens.push(...miloraField(chunk).token_ids);
    out.finish = chunk.choices[0]?.finish_reason ?? out.finish;
  }
  return out;
}

async function chat(model: string, content: string, stream: boolean): Promise<Outcome> {
  const params = { model, messages: [{ role: "user" as const, content }], max_tokens: 5, temperature: 0 };
  if (!stream) {
    const r = await f.client.chat.completions.create(params);
    return { text: r.choices[0]!.message.content ?? "", tokens: miloraField(r).token_ids, finish: r.choices[0]!.finish_reason };
  }
  const out: Outcome = { text: "", tokens: [], finish: null };
  let roles = 0;
  for await (const chunk of await f.client.chat.completions.create({ ...params, stream: true })) {
    const delta = chunk.choices[0]?.delta;
    if (delta?.role) roles++;
    out.text += delta?.content ?? "";
    out.tokens.push(...miloraField(chunk).token_ids);
    out.finish = chunk.choices[0]?.finish_reason ?? out.finish;
  }
  assert.is(roles, 1, "the first chunk alone names the role");
  return out;
}

test("GET /v1/models lists the base and every adapter", async () => {
  const models = await f.client.models.list();
  assert.equal(
    models.data.map((m) => m.id),
    [MODEL, ...TENANTS],
  );
  assert.is((await f.client.models.retrieve("beta")).id, "beta");
});

test("a completion: text, token ids, usage; streaming gives the same", async () => {
  const r = await f.client.completions.create({ model: MODEL, prompt: "hello world", max_tokens: 6, temperature: 0 });
  const ids = miloraField(r);
  assert.is(ids.token_ids.length, r.usage!.completion_tokens);
  assert.is(ids.prompt_token_ids!.length, r.usage!.prompt_tokens);
  assert.is(r.usage!.total_tokens, r.usage!.prompt_tokens + r.usage!.completion_tokens);
  // The tokenizer puts <s> first; the text is the tokenizer's decoding of the ids.
  assert.is(ids.prompt_token_ids![0], 1);
  const streamed = await complete(MODEL, "hello world", 6, true);
  assert.equal(streamed, { text: r.choices[0]!.text, tokens: ids.token_ids, finish: r.choices[0]!.finish_reason });
});

test("a prompt of token ids runs as given", async () => {
  const asText = await f.client.completions.create({ model: MODEL, prompt: "hello there", max_tokens: 4, temperature: 0 });
  const asIds = await complete(MODEL, miloraField(asText).prompt_token_ids!, 4, false);
  assert.equal(asIds.tokens, miloraField(asText).token_ids);
});

test("chat renders the model's template; streamed and not agree", async () => {
  const whole = await chat(MODEL, "how are you today?", false);
  assert.is(whole.tokens.length > 0, true);
  assert.equal(await chat(MODEL, "how are you today?", true), whole);
  const tenant = await chat("gamma", "how are you today?", false);
  assert.equal(await chat("gamma", "how are you today?", true), tenant);
});

test("a stop string ends the text before it", async () => {
  const free = await complete(MODEL, "the model reads", 8, false);
  assert.ok(free.text.length >= 4, `"${free.text}" is too short to cut`);
  const cut = free.text.slice(2, 4);
  const r = await f.client.completions.create({ model: MODEL, prompt: "the model reads", max_tokens: 8, temperature: 0, stop: [cut] });
  assert.is(r.choices[0]!.text, free.text.slice(0, free.text.indexOf(cut)));
  assert.is(r.choices[0]!.finish_reason, "stop");
});

test("64 requests over 4 tenants from 16 clients: each equals the same request alone, and no slot leaks", async () => {
  const prompts = ["hello world", "how are you", "the model reads", "thank you"];
  const jobs = Array.from({ length: 64 }, (_, i) => ({ model: [MODEL, ...TENANTS][i % 5]!, prompt: prompts[i % prompts.length]!, stream: i % 3 === 0 }));
  const alone = new Map<string, Outcome>();
  for (const job of jobs) {
    const key = `${job.model} ${job.prompt}`;
    if (!alone.has(key)) alone.set(key, await complete(job.model, job.prompt, 5, false));
  }

  let next = 0;
  const results: Outcome[] = [];
  const client = async () => {
    for (let i = next++; i < jobs.length; i = next++) results[i] = await complete(jobs[i]!.model, jobs[i]!.prompt, 5, jobs[i]!.stream);
  };
  const stepsBefore = (await f.metric("milora_steps_total"))!;
  await Promise.all(Array.from({ length: 16 }, client));
  jobs.forEach((job, i) => assert.equal(results[i], alone.get(`${job.model} ${job.prompt}`), `request ${i} (${job.model}, "${job.prompt}")`));
  // Batched: far fewer steps than 64 requests x 5 tokens run one at a time.
  const steps = (await f.metric("milora_steps_total"))! - stepsBefore;
  assert.ok(steps < (64 * 5) / 2, `${steps} steps for 320 tokens`);
  await eventually(async () => (await f.metric("milora_running_sequences")) === 0);
  assert.is(await f.metric("milora_queue_depth"), 0);
  assert.is(f.serving.engine.freeSlots, 4);
  // Four tenants through two resident places: adapters were evicted and reloaded under load.
  assert.ok((await f.metric("milora_adapter_evictions_total"))! > 0);
  assert.is(await f.metric("milora_adapters_resident"), 2);
});

test("a 900 KB prompt is refused by its size before tokenizing: 400 at once, other streams keep flowing", async () => {
  const stream = (await f.client.completions.create({ model: MODEL, prompt: "hello", max_tokens: 60, temperature: 0, stream: true, ignore_eos: true } as never)) as unknown as AsyncIterable<unknown>;
  const iterator = stream[Symbol.asyncIterator]();
  await iterator.next();
  // The server runs in this process: a stalled event loop shows as a late tick.
  let last = performance.now();
  let worstGap = 0;
  const ticker = setInterval(() => {
    const now = performance.now();
    worstGap = Math.max(worstGap, now - last);
    last = now;
  }, 5);
  const started = performance.now();
  const res = await fetch(`${f.serving.server.url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: MODEL, prompt: "the quick brown fox ".repeat(45_000) }),
  });
  const took = performance.now() - started;
  clearInterval(ticker);
  assert.is(res.status, 400);
  const error = ((await res.json()) as { error: { code: string; message: string } }).error;
  assert.is(error.code, "context_length_exceeded");
  assert.match(error.message, "900000 bytes");
  assert.ok(worstGap < 250, `the event loop stalled for ${worstGap.toFixed(0)} ms`);
  assert.ok(took < 2000, `answered after ${took.toFixed(0)} ms`);
  let more = 0;
  for (let r = await iterator.next(); !r.done; r = await iterator.next()) more++;
  assert.ok(more > 0, "the stream finished");
});

test.run();
