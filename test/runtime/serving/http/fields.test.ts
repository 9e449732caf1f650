// Every sampling and output field the server honours, driven through the official OpenAI client, and
// checked against float64 definitions over the reference model where the field changes the math:
// penalties and logit_bias (greedy tokens), logprobs (values and the top tokens), min_p and top_k
// (every sampled token allowed). Fields it does not honour are a 400 naming them.
import { join } from "node:path";
import OpenAI from "openai";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { argmax, loadReferenceWeights, referenceLogits } from "../../../reference/llama.ts";
import { referenceBeamSearch, referenceNextLogprobs } from "../../../reference/beam.ts";
import { allowedTokens, logSoftmax64, penalisedLogits, type ReferencePenalties } from "../../../reference/sampling.ts";
import { CTX, MODEL, miloraField, startFixture, type Fixture } from "./fixture.ts";

let f: Fixture;
let ref: ReturnType<typeof loadReferenceWeights>;
const PROMPT = [1, 17, 42, 99, 7, 250, 31];
// f32 engine against float64 reference: logits agree to ~1e-5 on the tiny model; log-softmax keeps that.
const LOGPROB_BOUND = 1e-3;

test.before(async () => {
  f = await startFixture();
  ref = loadReferenceWeights(join(f.root, MODEL));
});
test.after(async () => {
  await f.close();
});

const logitsAfter = (tokens: readonly number[]) => referenceLogits(ref.base, ref.weights, tokens).at(-1)!;

function referencePenalisedGreedy(prompt: readonly number[], count: number, p: ReferencePenalties): number[] {
  const out: number[] = [];
  while (out.length < count) out.push(argmax(penalisedLogits(logitsAfter([...prompt, ...out]), prompt, out, p)));
  return out;
}

async function status(run: () => Promise<unknown>): Promise<{ status: number; param: string | null | undefined; message: string }> {
  try {
    await run();
  } catch (e) {
    if (e instanceof OpenAI.APIError) return { status: e.status ?? 0, param: e.param, message: e.message };
    throw e;
  }
  return { status: 200, param: undefined, message: "" };
}

test("repetition, frequency and presence penalties and logit_bias: greedy tokens equal the float64 reference's", async () => {
  const cases: (ReferencePenalties & { body: Record<string, unknown> })[] = [
    { presence: 0, frequency: 0, repetition: 1.5, bias: new Map(), body: { repetition_penalty: 1.5 } },
    { presence: 1.2, frequency: 0.8, repetition: 1, bias: new Map(), body: { presence_penalty: 1.2, frequency_penalty: 0.8 } },
    { presence: 0.4, frequency: 0.5, repetition: 1.3, bias: new Map([[5, 3], [17, -100]]), body: { presence_penalty: 0.4, frequency_penalty: 0.5, repetition_penalty: 1.3, logit_bias: { 5: 3, 17: -100 } } },
  ];
  for (const c of cases) {
    const r = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 10, temperature: 0, ...c.body });
    assert.equal(miloraField(r).token_ids, referencePenalisedGreedy(PROMPT, 10, c), JSON.stringify(c.body));
  }
  // The penalties do change something here: the plain greedy continuation differs from at least one case.
  const plain = referencePenalisedGreedy(PROMPT, 10, { presence: 0, frequency: 0, repetition: 1, bias: new Map() });
  assert.ok(cases.some((c) => JSON.stringify(referencePenalisedGreedy(PROMPT, 10, c)) !== JSON.stringify(plain)));
});

test("completions logprobs: each token's log-probability and the top ones equal the float64 log-softmax", async () => {
  const r = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 6, temperature: 0.9, seed: 5, logprobs: 3 });
  const tokens = miloraField(r).token_ids;
  const lp = r.choices[0]!.logprobs!;
  assert.is(lp.token_logprobs!.length, tokens.length);
  assert.is(lp.tokens!.length, tokens.length);
  tokens.forEach((t, i) => {
    const want = logSoftmax64(logitsAfter([...PROMPT, ...tokens.slice(0, i)]));
    assert.ok(Math.abs(lp.token_logprobs![i]! - want[t]!) < LOGPROB_BOUND, `token ${i}: ${lp.token_logprobs![i]} vs ${want[t]}`);
    const top3 = [...want].sort((a, b) => b - a).slice(0, 3);
    const got = Object.values(lp.top_logprobs![i]!).sort((a, b) => b - a);
    // Distinct ids may decode to the same text (a map keeps one), so compare the largest values.
    assert.ok(Math.abs(got[0]! - top3[0]!) < LOGPROB_BOUND, `top 1 of token ${i}`);
    assert.ok(got.length <= 3 && got.length >= 1);
  });
  assert.equal(lp.text_offset![0], 0);
});

test("chat logprobs with top_logprobs: the chat shape, values equal the float64 log-softmax, sorted, bytes given", async () => {
  const r = await f.client.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "hi there" }], max_tokens: 5, temperature: 0, logprobs: true, top_logprobs: 4 });
  const m = miloraField(r);
  const content = r.choices[0]!.logprobs!.content!;
  assert.is(content.length, m.token_ids.length);
  content.forEach((entry, i) => {
    const want = logSoftmax64(logitsAfter([...m.prompt_token_ids!, ...m.token_ids.slice(0, i)]));
    assert.ok(Math.abs(entry.logprob - want[m.token_ids[i]!]!) < LOGPROB_BOUND);
    assert.is(entry.top_logprobs.length, 4);
    const top = [...want].sort((a, b) => b - a).slice(0, 4);
    entry.top_logprobs.forEach((t, j) => assert.ok(Math.abs(t.logprob - top[j]!) < LOGPROB_BOUND, `token ${i} top ${j}`));
    // Greedy: the sampled token is the most likely one.
    assert.ok(Math.abs(entry.logprob - entry.top_logprobs[0]!.logprob) < 1e-6);
    assert.equal(entry.bytes, [...Buffer.from(entry.token, "utf8")]);
  });
});

test("min_p and top_k: every token sampled over n = 4 choices is one the float64 definition allows", async () => {
  for (const body of [{ min_p: 0.3 }, { top_k: 2 }, { min_p: 0.1, top_k: 3 }]) {
    const r = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 6, temperature: 1.3, seed: 9, n: 4, ...body } as never);
    const m = miloraField(r) as unknown as { choices: { token_ids: number[] }[] };
    assert.is(m.choices.length, 4);
    for (const { token_ids } of m.choices) {
      token_ids.forEach((t, i) => {
        const logits = logitsAfter([...PROMPT, ...token_ids.slice(0, i)]);
        // A relaxed min_p (1e-3 below) leaves room for f32 against float64 at the cut.
        const allowed = allowedTokens(logits, 1.3, Math.max(0, ((body as { min_p?: number }).min_p ?? 0) * (1 - 1e-3)), (body as { top_k?: number }).top_k ?? 0);
        assert.ok(allowed.has(t), `${JSON.stringify(body)}: token ${t} at ${i} is not allowed (${[...allowed]})`);
      });
    }
  }
});

test("n choices share the prompt: greedy choices are all the same; sampled choice i is the n = 1 answer with seed + i", async () => {
  const greedy = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 6, temperature: 0, n: 3 });
  assert.is(greedy.choices.length, 3);
  assert.equal(greedy.choices.map((c) => c.index), [0, 1, 2]);
  assert.ok(greedy.choices.every((c) => c.text === greedy.choices[0]!.text));
  assert.is(greedy.usage!.completion_tokens, 18);
  const sampled = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 8, temperature: 1.5, n: 3, seed: 40 });
  const ids = (miloraField(sampled) as unknown as { choices: { token_ids: number[] }[] }).choices.map((c) => c.token_ids);
  for (let i = 0; i < 3; i++) {
    const one = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 8, temperature: 1.5, seed: 40 + i });
    assert.equal(miloraField(one).token_ids, ids[i], `choice ${i}`);
  }
  assert.ok(new Set(ids.map((t) => t.join())).size > 1, "different seeds give different choices");
});

test("streamed n = 2 with include_usage: chunks name their choice, usage is null until the last chunk, which has it", async () => {
  const stream = await f.client.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "x" }], max_tokens: 4, temperature: 0, n: 2, stream: true, stream_options: { include_usage: true } });
  const text = ["", ""];
  const finishes: (string | null)[] = [null, null];
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  for (const c of chunks.slice(0, -1)) {
    assert.is(c.usage, null);
    for (const choice of c.choices) {
      text[choice.index] += choice.delta.content ?? "";
      finishes[choice.index] = choice.finish_reason ?? finishes[choice.index]!;
    }
  }
  assert.equal(finishes, ["length", "length"]);
  assert.is(text[0], text[1]);
  const last = chunks.at(-1)!;
  assert.equal(last.choices, []);
  assert.is(last.usage!.completion_tokens, 8);
});

test("stop_token_ids end a choice at that token (kept in token_ids, not in the text); stop_reason names it", async () => {
  const plain = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 8, temperature: 0 });
  const ids = miloraField(plain).token_ids;
  const stopAt = ids.findIndex((t, i) => i >= 2 && !ids.slice(0, i).includes(t));
  assert.ok(stopAt > 0);
  const r = (await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 8, temperature: 0, stop_token_ids: [ids[stopAt]] } as never)) as OpenAI.Completion;
  assert.equal(miloraField(r).token_ids, ids.slice(0, stopAt + 1));
  assert.is(r.choices[0]!.finish_reason, "stop");
  assert.is((r.choices[0] as unknown as { stop_reason: number }).stop_reason, ids[stopAt]);
});

test("echo returns the prompt's text before the completion", async () => {
  const r = await f.client.completions.create({ model: MODEL, prompt: "hello world", max_tokens: 3, temperature: 0, echo: true });
  const plain = await f.client.completions.create({ model: MODEL, prompt: "hello world", max_tokens: 3, temperature: 0 });
  assert.is(r.choices[0]!.text, "hello world" + plain.choices[0]!.text);
});

test("fields not honoured are a 400 naming them: response_format, tools, best_of > n, unknown fields", async () => {
  const base = { model: MODEL, messages: [{ role: "user" as const, content: "x" }], max_tokens: 2 };
  const cases: [Record<string, unknown>, string][] = [
    [{ response_format: { type: "json_object" } }, "response_format"],
    [{ tools: [{ type: "function", function: { name: "f", parameters: {} } }] }, "tools"],
    [{ tool_choice: "required" }, "tool_choice"],
    [{ guided_json: { type: "object" } }, "guided_json"],
    [{ frobnicate: 1 }, "frobnicate"],
    [{ logit_bias: { 999999: 1 } }, "logit_bias"],
    [{ top_logprobs: 3 }, "top_logprobs"],
  ];
  for (const [extra, param] of cases) {
    const got = await status(() => f.client.chat.completions.create({ ...base, ...extra } as never));
    assert.is(got.status, 400, param);
    assert.is(got.param, param, got.message);
  }
  const bestOf = await status(() => f.client.completions.create({ model: MODEL, prompt: "x", best_of: 3 }));
  assert.is(bestOf.param, "best_of");
  // response_format text is plain text: honoured.
  assert.is((await status(() => f.client.chat.completions.create({ ...base, response_format: { type: "text" } }))).status, 200);
});

test("use_beam_search: the n best of best_of beams, with scores, equal the float64 beam search over the reference model; its sampling fields are refused", async () => {
  const next = referenceNextLogprobs(ref.base, ref.weights);
  const want = referenceBeamSearch(next, PROMPT, { numBeams: 3, maxNewTokens: 5, eos: [], lengthPenalty: 1, earlyStopping: false, numReturnSequences: 2 });
  const r = await f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 5, n: 2, best_of: 3, ignore_eos: true, use_beam_search: true } as never);
  const m = miloraField(r) as unknown as { choices: { token_ids: number[]; score: number }[] };
  assert.equal(m.choices.map((c) => c.token_ids), want.map((b) => b.tokens));
  m.choices.forEach((c, i) => assert.ok(Math.abs(c.score - want[i]!.score) < 1e-3, `hypothesis ${i}: ${c.score} vs ${want[i]!.score}`));
  assert.is((r as OpenAI.Completion).choices.length, 2);
  for (const extra of [{ temperature: 0.7 }, { stream: true }, { logprobs: 2 }, { presence_penalty: 1 }]) {
    const got = await status(() => f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 2, use_beam_search: true, ...extra } as never));
    assert.is(got.status, 400);
    assert.is(got.param, Object.keys(extra)[0]);
  }
  assert.is((await status(() => f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: 2, length_penalty: 2 } as never))).param, "length_penalty");
});

test("max_tokens past the context: 400 context_length_exceeded naming the prompt's tokens and max_tokens", async () => {
  const got = await status(() => f.client.completions.create({ model: MODEL, prompt: PROMPT, max_tokens: CTX }));
  assert.is(got.status, 400);
  assert.ok(got.message.includes(`${PROMPT.length} in the prompt`) && got.message.includes(`max_tokens ${CTX}`) && got.message.includes(`${CTX} tokens`), got.message);
});

test.run();
