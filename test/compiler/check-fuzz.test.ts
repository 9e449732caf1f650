// Property tests for the checker: specs that parse but say odd things (values, names and numbers
// swapped between real examples, statements dropped or repeated) never make checkSource throw or
// hang, and every diagnostic points inside the file it names.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import fc from "fast-check";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../compiler/check.ts";
import { lex } from "../../grammar/lexer.ts";

const EXAMPLES = new URL("../../examples/", import.meta.url).pathname;
// Imports and `from` paths resolve against the spec's own folder, so the fuzzed text claims to live there.
const FILE = join(EXAMPLES, "fuzz.milora");
const SEEDS = readdirSync(EXAMPLES)
  .filter((f) => f.endsWith(".milora"))
  .map((f) => readFileSync(join(EXAMPLES, f), "utf8"));

/** Replacement words: every identifier and number the examples use, plus edge cases for the checker. */
const WORDS = [
  ...new Set(SEEDS.flatMap((s) => lex(s).tokens.map((t) => t.image)).filter((w) => /^[\w.-]+$/.test(w))),
  "0", "-1", "1e309", "0.5", "1e-30", "99999999999", "all", "none", "layers", "top_k", "dense", "threshold",
  // sizes far past milora's limits: each must be one diagnostic, never a grid or a list that large
  "100000", "1025", "65537", "100000000000000000000", "9".repeat(400), "0..1000000000", "4097",
];
const RUNS = 300;
const SLOW_MS = 3000;

function check(text: string): void {
  const started = performance.now();
  const { diagnostics } = checkSource(text, FILE);
  assert.ok(performance.now() - started < SLOW_MS, "checking took too long");
  for (const d of diagnostics) {
    assert.ok(/^MIL\d{3}$/.test(d.code), d.code);
    assert.ok(d.message.length > 0);
    if (d.span.file !== FILE) continue; // a problem inside an imported file is reported against that file
    const { start, end } = d.span;
    assert.ok(0 <= start.offset && start.offset <= end.offset && end.offset <= text.length, JSON.stringify(d));
  }
}

/** Rewrites one token of a real example: a word or number from elsewhere, or the token dropped or doubled. */
function mutate(text: string, index: number, op: "replace" | "drop" | "repeat", word: string): string {
  const tokens = lex(text).tokens;
  const t = tokens[index % tokens.length]!;
  const [start, end] = [t.startOffset, t.endOffset! + 1];
  const replacement = op === "replace" ? word : op === "drop" ? "" : `${t.image} ${t.image}`;
  return text.slice(0, start) + replacement + text.slice(end);
}

test("every example, with tokens swapped, dropped or doubled, checks without throwing", () => {
  fc.assert(
    fc.property(
      fc.constantFrom(...SEEDS),
      fc.array(fc.tuple(fc.nat(), fc.constantFrom("replace" as const, "drop" as const, "repeat" as const), fc.constantFrom(...WORDS)), {
        minLength: 1,
        maxLength: 4,
      }),
      (seed, edits) => check(edits.reduce((text, [i, op, w]) => mutate(text, i, op, w), seed)),
    ),
    { numRuns: RUNS, seed: 20261128 },
  );
});

test("arbitrary text checks without throwing", () => {
  fc.assert(fc.property(fc.string({ maxLength: 300 }), (text) => check(text)), { numRuns: 100, seed: 7 });
});

test("deep nesting and huge sizes in real examples check quickly", () => {
  const huge = fc.constantFrom("100000", "100000000000000000000", "1e999", "9".repeat(300), "1025");
  const key = fc.constantFrom("layers", "hidden_size", "heads", "head_dim", "vocab_size", "intermediate_size", "max_positions");
  fc.assert(
    fc.property(fc.constantFrom(...SEEDS), key, huge, fc.integer({ min: 0, max: 5000 }), (seed, k, n, depth) => {
      // a huge size in the first base block, and an adapter buried under `depth` unclosed router blocks
      const sized = seed.replace(/\{/, `{ ${k} ${n} `);
      check(sized + "\nadapter deep on b {\n" + "router {\n".repeat(depth));
    }),
    { numRuns: 40, seed: 99 },
  );
});

test.run();
