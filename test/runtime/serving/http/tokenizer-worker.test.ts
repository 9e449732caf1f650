// Tokenizer.encodeAsync: long texts are encoded on a worker thread, giving the same ids as encode()
// while the calling thread's event loop keeps turning (the server's streams with it).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PRESETS, writeRandomCheckpoint } from "../../../../examples/random-checkpoint.ts";
import { INLINE_ENCODE_BYTES, Tokenizer } from "../../../../runtime/text/tokenizer.ts";

const root = mkdtempSync(join(tmpdir(), "milora-tok-"));
writeRandomCheckpoint(join(root, "m"), { ...PRESETS.tiny, seed: 11, tokenizer: true });
const tokenizer = (await Tokenizer.load(join(root, "m")))!;
test.after(() => {
  tokenizer.close();
  rmSync(root, { recursive: true, force: true });
});

test("a 300 KB text: the worker's ids equal encode()'s, and the event loop never stalls meanwhile", async () => {
  const text = "the quick brown fox jumps over the lazy dog ".repeat(7000);
  assert.ok(Buffer.byteLength(text) > INLINE_ENCODE_BYTES);
  const inline = tokenizer.encode(text, { addBos: true });
  let last = performance.now();
  let worstGap = 0;
  const ticker = setInterval(() => {
    const now = performance.now();
    worstGap = Math.max(worstGap, now - last);
    last = now;
  }, 5);
  const started = performance.now();
  const ids = await tokenizer.encodeAsync(text, { addBos: true });
  const took = performance.now() - started;
  clearInterval(ticker);
  assert.equal(ids, inline);
  // encode() on this thread would have held it for the whole `took`.
  assert.ok(worstGap < Math.max(100, took / 3), `the loop stalled ${worstGap.toFixed(0)} ms of ${took.toFixed(0)} ms`);
});

test("short texts are encoded inline, and every text's bound on bytes per token holds", async () => {
  for (const text of ["hello", "héllo wörld ✓", "  spaces   and\ttabs\n", "the quick brown fox"]) {
    const ids = await tokenizer.encodeAsync(text, { addBos: false });
    assert.equal(ids, tokenizer.encode(text, { addBos: false }));
    assert.ok(Buffer.byteLength(text) <= ids.length * tokenizer.maxBytesPerToken, text);
  }
});

test.run();
