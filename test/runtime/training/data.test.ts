// Training data in the four JSONL forms, as token ids and Hugging Face labels; every bad line named.
import { Template } from "@huggingface/jinja";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { Tokenizer } from "../../../runtime/text/tokenizer.ts";
import { DataError, IGNORE_INDEX as I, loadTrainData, type ChatRenderer } from "../../../runtime/training/data.ts";

const root = mkdtempSync(join(tmpdir(), "milora-data-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
const model = join(root, "model");
writeRandomCheckpoint(model, { hiddenSize: 16, layers: 1, heads: 2, kvHeads: 1, intermediateSize: 24, vocabSize: 300, seed: 1, tokenizer: true });
const tokenizer = (await Tokenizer.load(model))!;
const vocabSize = 300;

function file(name: string, lines: readonly (object | string)[]): string {
  const path = join(root, name);
  writeFileSync(path, lines.map((l) => (typeof l === "string" ? l : JSON.stringify(l))).join("\n") + "\n");
  return path;
}

const eos = tokenizer.eosIds.slice(0, 1);
const enc = (text: string, addBos = false) => tokenizer.encode(text, { addBos });

test("prompt/completion: the prompt (after BOS) is unsupervised, the completion and EOS are labels", () => {
  const data = loadTrainData(file("pc.jsonl", [{ prompt: "reverse: abc", completion: " cba" }]), { vocabSize, maxLength: 64, tokenizer });
  const p = enc("reverse: abc", true);
  const c = [...enc(" cba"), ...eos];
  assert.equal(data.examples[0]!.tokens, [...p, ...c]);
  assert.equal(data.examples[0]!.labels, [...p.map(() => I), ...c]);
});

test("text: every token is a label; pre-tokenized lines are taken as they are", () => {
  const data = loadTrainData(file("mixed.jsonl", [{ text: "hello" }, "", { input_ids: [5, 6, 7], labels: [I, I, 7] }, { input_ids: [1, 2] }]), { vocabSize, maxLength: 64, tokenizer });
  const hello = [...enc("hello", true), ...eos];
  assert.equal(data.examples.map((e) => e.labels), [hello, [I, I, 7], [1, 2]]);
  assert.equal(data.examples.map((e) => e.source), [`${join(root, "mixed.jsonl")}:1`, `${join(root, "mixed.jsonl")}:3`, `${join(root, "mixed.jsonl")}:4`]);
});

test("messages: rendered by the chat template, loss on each assistant turn only", () => {
  const template = new Template("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}");
  const chat: ChatRenderer = { render: (messages, o) => template.render({ messages: [...messages], add_generation_prompt: o.addGenerationPrompt }) };
  const messages = [
    { role: "user", content: "hi" },
    { role: "assistant", content: "yo" },
    { role: "user", content: "sort cab" },
    { role: "assistant", content: "abc" },
  ];
  const data = loadTrainData(file("chat.jsonl", [{ messages }]), { vocabSize, maxLength: 128, tokenizer, chat });
  const ex = data.examples[0]!;
  const segments: [string, boolean][] = [
    ["<user>hi\n<assistant>", false],
    ["yo\n", true],
    ["<user>sort cab\n<assistant>", false],
    ["abc\n", true],
  ];
  const want = segments.flatMap(([text, supervised], i) => enc(text, i === 0).map((id) => [id, supervised ? id : I] as const));
  assert.equal(ex.tokens, want.map(([t]) => t));
  assert.equal(ex.labels, want.map(([, l]) => l));
});

test("every bad line is named with its number and problem, and nothing is returned", () => {
  const path = file("bad.jsonl", [
    '{"prompt": "a", "completion": "b"',
    { prompt: 3, completion: "b" },
    { input_ids: [1, 2, 999] },
    { input_ids: [1, 2], labels: [I] },
    { foo: 1 },
    { input_ids: [4, 5], labels: [I, I] },
    "[1, 2]",
  ]);
  try {
    loadTrainData(path, { vocabSize, maxLength: 64, tokenizer });
    assert.unreachable("bad lines must be refused");
  } catch (e) {
    assert.instance(e, DataError);
    const m = (e as Error).message;
    assert.match(m, `${path} has 7 bad lines; nothing was trained`);
    assert.match(m, `${path}:1: not valid JSON`);
    assert.match(m, `${path}:2: "prompt" must be a string, got number`);
    assert.match(m, `${path}:3: token 999 at position 2 is outside the vocabulary (0..299)`);
    assert.match(m, `${path}:4: "labels" has 1 entries but "input_ids" has 2`);
    assert.match(m, `${path}:5: no known fields (foo)`);
    assert.match(m, `${path}:6: no supervised token`);
    assert.match(m, `${path}:7: each line must be a JSON object`);
    assert.not.match(m, '"completion": "b"'); // the line's text is never echoed
  }
});

test("examples over --max-length are cut from the end; one left without a label is dropped and counted", () => {
  const data = loadTrainData(file("long.jsonl", [{ input_ids: [1, 2, 3, 4, 5, 6] }, { input_ids: [1, 2, 3, 4, 5], labels: [I, I, I, I, 5] }]), { vocabSize, maxLength: 4 });
  assert.equal(data.examples.map((e) => e.tokens), [[1, 2, 3, 4]]);
  assert.is(data.truncated, 2);
  assert.is(data.dropped, 1);
});

test("text forms without a tokenizer say what to do instead", () => {
  try {
    loadTrainData(file("notok.jsonl", [{ text: "x" }]), { vocabSize, maxLength: 4 });
    assert.unreachable();
  } catch (e) {
    assert.match((e as Error).message, "needs the base's tokenizer.json");
  }
});

test.run();
