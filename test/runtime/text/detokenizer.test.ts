// The incremental detokenizer: token by token it releases exactly the text of the whole output,
// never a half character ("cafe ☕" over byte tokens), keeps SentencePiece's word spaces, and decodes
// only a window per token (the work per token does not grow with the output).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PRESETS, writeRandomCheckpoint } from "../../../examples/random-checkpoint.ts";
import { IncrementalDetokenizer, detokenize } from "../../../runtime/text/detokenizer.ts";
import { Tokenizer } from "../../../runtime/text/tokenizer.ts";

/** A byte-level tokenizer: token i is byte i; decoding replaces incomplete UTF-8 with U+FFFD, as HF's does. */
const bytes = (ids: readonly number[]) => new TextDecoder().decode(Uint8Array.from(ids));
/** SentencePiece-like: tokens are words, each with a leading space that decoding drops at the very start. */
const WORDS = ["▁cafe", "▁☕", "▁ok", "s"];
const pieces = (ids: readonly number[]) => ids.map((i) => WORDS[i]!).join("").replaceAll("▁", " ").replace(/^ /, "");

test("byte tokens: each delta is whole characters, and the deltas make the whole text", () => {
  const text = "cafe ☕ and 日本語 🎉!";
  const ids = [...Buffer.from(text, "utf8")];
  const d = new IncrementalDetokenizer(bytes);
  const deltas = ids.map((id) => d.push(id));
  assert.ok(deltas.every((x) => !x.includes("\uFFFD")), "no replacement character is ever released");
  assert.is(deltas.join("") + d.flush(), text);
  // ☕ is three bytes: nothing comes out for the first two.
  const at = Buffer.from("cafe ", "utf8").length;
  assert.equal(deltas.slice(at, at + 3), ["", "", "☕"]);
});

test("SentencePiece spaces between words survive the window", () => {
  const ids = [0, 1, 2, 3, 0];
  assert.is(detokenize(pieces, ids), pieces(ids));
  const d = new IncrementalDetokenizer(pieces);
  assert.equal(ids.map((i) => d.push(i)), ["cafe", " ☕", " ok", "s", " cafe"]);
});

test("bytes that never become a character are released after a few tokens, not held forever", () => {
  const d = new IncrementalDetokenizer(bytes);
  const out = [0xe2, 0xe2, 0xe2, 0xe2, 0xe2, 0xe2, 0xe2, 0xe2, 0xe2, 0x41].map((b) => d.push(b)).join("") + d.flush();
  assert.ok(out.endsWith("A") && out.includes("\uFFFD"));
});

test("the work per token is a window: decode sees a bounded number of ids whatever the length", () => {
  let longest = 0;
  const d = new IncrementalDetokenizer((ids) => {
    longest = Math.max(longest, ids.length);
    return bytes(ids);
  });
  for (let i = 0; i < 5000; i++) d.push(0x61 + (i % 26));
  assert.ok(longest <= 2, `decode saw ${longest} ids at once`);
  assert.is(d.text.length, 5000);
});

test("a real tokenizer: pushing the ids of multi-byte text one by one gives its decoding", async () => {
  const root = mkdtempSync(join(tmpdir(), "milora-detok-"));
  try {
    const dir = join(root, "tiny");
    writeRandomCheckpoint(dir, { ...PRESETS.tiny, seed: 3, tokenizer: true });
    const tokenizer = (await Tokenizer.load(dir))!;
    try {
      for (const text of ["cafe ☕", "naïve 日本 🎉 ok"]) {
        const ids = tokenizer.encode(text, { addBos: false });
        const d = new IncrementalDetokenizer((x) => tokenizer.decode(x));
        const deltas = ids.map((id) => d.push(id));
        assert.ok(deltas.every((x) => !x.includes("\uFFFD")), JSON.stringify(deltas));
        assert.is(deltas.join("") + d.flush(), tokenizer.decode(ids));
      }
    } finally {
      tokenizer.close();
    }
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test.run();
