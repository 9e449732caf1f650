import fc from "fast-check";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { CheckpointError } from "../../../runtime/formats/safetensors.ts";
import { Tokenizer } from "../../../runtime/text/tokenizer.ts";

const root = mkdtempSync(join(tmpdir(), "milora-tokenizer-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
const tiny = join(root, "tiny");
writeRandomCheckpoint(tiny, PRESETS.tiny);
const tokenizer = (await Tokenizer.load(tiny))!;

test("the tiny tokenizer has exactly vocab_size tokens, with LLaMA's special ids", () => {
  const json = JSON.parse(readFileSync(join(tiny, "tokenizer.json"), "utf8")) as { model: { vocab: Record<string, number> } };
  const ids = Object.values(json.model.vocab).sort((a, b) => a - b);
  assert.equal(ids, Array.from({ length: PRESETS.tiny.vocabSize }, (_, i) => i));
  assert.is(tokenizer.bosId, 1);
  assert.equal(tokenizer.eosIds, [2]);
  assert.match(tokenizer.chatTemplate ?? "", "add_generation_prompt");
});

test("encode puts <s> first on request, and common words are one token", () => {
  const plain = tokenizer.encode("hello", { addBos: false });
  assert.is(plain.length, 1);
  assert.equal(tokenizer.encode("hello", { addBos: true }), [1, ...plain]);
  assert.is(tokenizer.decode([1, ...plain, 2]), "hello");
});

test("any text round trips through encode and decode", () => {
  fc.assert(
    fc.property(fc.string({ unit: "grapheme", maxLength: 40 }), (text) => {
      const ids = tokenizer.encode(text, { addBos: true });
      assert.ok(ids.every((id) => Number.isInteger(id) && id >= 0 && id < PRESETS.tiny.vocabSize));
      assert.is(tokenizer.decode(ids), text);
    }),
    { numRuns: 200, seed: 11 },
  );
});

test("eos ids include generation_config.json's", async () => {
  const dir = join(root, "generation");
  cpSync(tiny, dir, { recursive: true });
  writeFileSync(join(dir, "generation_config.json"), JSON.stringify({ eos_token_id: [2, 5] }));
  assert.equal((await Tokenizer.load(dir))!.eosIds, [2, 5]);
});

test("no tokenizer.json means no tokenizer; a broken one is a CheckpointError", async () => {
  assert.is(await Tokenizer.load(root), undefined);
  const dir = join(root, "broken");
  cpSync(tiny, dir, { recursive: true });
  writeFileSync(join(dir, "tokenizer.json"), "{");
  try {
    await Tokenizer.load(dir);
    assert.unreachable("loaded a broken tokenizer.json");
  } catch (e) {
    assert.instance(e, CheckpointError);
    assert.match((e as Error).message, "tokenizer.json: cannot read as JSON");
  }
});

test.run();
