// Property tests: whatever the input, parseSpec returns in good time with diagnostics that point
// inside the text, and whatever parses cleanly formats to a fixed point with the same meaning.
import { readFileSync } from "node:fs";
import fc from "fast-check";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { formatSpec } from "../../grammar/format.ts";
import { lex } from "../../grammar/lexer.ts";
import { MAX_DEPTH, parseSpec } from "../../grammar/parse.ts";
import { MAX_SYNTAX_ERRORS } from "../../grammar/parser.ts";
import { SourceText } from "../../grammar/source-text.ts";

const SEEDS = ["support-bot.milora", "messy.milora"].map((name) =>
  readFileSync(new URL(`fixtures/${name}`, import.meta.url), "utf8"),
);
/** Characters that matter to the lexer, plus a few it rejects. */
const PIECES = [..."{}:,.*\"\\/\n -0123456789eE_abz#;=\t\r", "..", "/*", "*/", "//", "base", "adapter", "experts", "router", "select", "at", "off", "on", "import", "from", "extends", "true"];
const RUNS = 250;
/** Far above what any of these inputs takes; only a runaway parse (a hang, a blow-up) comes near it. */
const SLOW_MS = 2000;

function checkParse(text: string): ReturnType<typeof parseSpec> {
  const started = performance.now();
  const result = parseSpec(text, "fuzz.milora");
  const ms = performance.now() - started;
  assert.ok(ms < SLOW_MS, `parse took ${ms} ms`);
  const source = new SourceText(text, "fuzz.milora");
  for (const d of result.diagnostics) {
    const { start, end } = d.span;
    assert.ok(0 <= start.offset && start.offset <= end.offset && end.offset <= text.length, JSON.stringify(d));
    assert.equal(source.position(start.offset), start);
    assert.equal(source.position(end.offset), end);
    assert.ok(d.message.length > 0);
  }
  return result;
}

/** The AST without spans, comments as their texts. */
function meaning(result: ReturnType<typeof parseSpec>): unknown {
  const { comments, ...rest } = JSON.parse(JSON.stringify(result.ast, (k, v: unknown) => (k === "span" ? undefined : v)));
  return { ...rest, comments: (comments as { text: string }[]).map((c) => c.text.replace(/\r\n?/g, "\n")).sort() };
}

function checkFormat(text: string): void {
  const result = checkParse(text);
  if (result.diagnostics.length > 0) return;
  const once = formatSpec(result.ast);
  const reparsed = parseSpec(once, "fuzz.milora");
  assert.equal(reparsed.diagnostics, [], once);
  assert.is(formatSpec(reparsed.ast), once);
  assert.equal(meaning(reparsed), meaning(result));
}

const piece = fc.constantFrom(...PIECES);
const seed = fc.constantFrom(...SEEDS);

/** Edits at character level: delete a range, insert pieces, duplicate a slice. */
const charEdit = fc.oneof(
  fc.record({ op: fc.constant("delete" as const), at: fc.nat(), length: fc.integer({ min: 1, max: 12 }) }),
  fc.record({ op: fc.constant("insert" as const), at: fc.nat(), text: fc.array(piece, { minLength: 1, maxLength: 4 }) }),
  fc.record({ op: fc.constant("duplicate" as const), at: fc.nat(), length: fc.integer({ min: 1, max: 40 }) }),
);

type CharEdit = typeof charEdit extends fc.Arbitrary<infer E> ? E : never;

function applyCharEdit(text: string, edit: CharEdit): string {
  const at = text.length === 0 ? 0 : edit.at % (text.length + 1);
  switch (edit.op) {
    case "delete":
      return text.slice(0, at) + text.slice(at + edit.length);
    case "insert":
      return text.slice(0, at) + edit.text.join("") + text.slice(at);
    case "duplicate":
      return text.slice(0, at + edit.length) + text.slice(at, at + edit.length) + text.slice(at + edit.length);
  }
}

/** Edits at token level: drop, repeat or swap whole tokens. */
function applyTokenEdit(text: string, op: "drop" | "repeat" | "swap", index: number): string {
  const tokens = lex(text).tokens;
  if (tokens.length < 2) return text;
  const i = index % (tokens.length - 1);
  const a = tokens[i]!;
  const b = tokens[i + 1]!;
  const aEnd = a.startOffset + a.image.length;
  const bEnd = b.startOffset + b.image.length;
  if (op === "drop") return text.slice(0, a.startOffset) + text.slice(aEnd);
  if (op === "repeat") return `${text.slice(0, aEnd)} ${a.image}${text.slice(aEnd)}`;
  return text.slice(0, a.startOffset) + b.image + text.slice(aEnd, b.startOffset) + a.image + text.slice(bEnd);
}

test("random text never throws and its diagnostics lie inside it", () => {
  fc.assert(
    fc.property(fc.array(fc.oneof(piece, fc.string({ maxLength: 3 })), { maxLength: 80 }), (parts) => {
      checkParse(parts.join(""));
    }),
    { numRuns: RUNS },
  );
});

test("valid specs with characters deleted, inserted or duplicated", () => {
  fc.assert(
    fc.property(seed, fc.array(charEdit, { minLength: 1, maxLength: 3 }), (text, edits) => {
      checkFormat(edits.reduce(applyCharEdit, text));
    }),
    { numRuns: RUNS },
  );
});

test("valid specs with tokens dropped, repeated or swapped", () => {
  const tokenEdit = fc.tuple(fc.constantFrom("drop" as const, "repeat" as const, "swap" as const), fc.nat());
  fc.assert(
    fc.property(seed, fc.array(tokenEdit, { minLength: 1, maxLength: 3 }), (text, edits) => {
      checkFormat(edits.reduce((t, [op, index]) => applyTokenEdit(t, op, index), text));
    }),
    { numRuns: RUNS },
  );
});

test("any layout and any comments between tokens format to one fixed point", () => {
  const gap = fc.constantFrom(" ", "\n", "\n\n  ", "\t", " // note\n", "\n// own line\n", " /* inline */ ", "/*\n block\n*/");
  fc.assert(
    fc.property(seed, fc.array(gap, { minLength: 400, maxLength: 400 }), (text, gaps) => {
      const tokens = lex(text).tokens;
      const relaid = tokens.map((t, i) => t.image + (gaps[i % gaps.length] ?? " ")).join("");
      checkFormat(relaid);
    }),
    { numRuns: 60 },
  );
});

test("deep nesting and huge numbers parse in bounded time with a bounded number of diagnostics", () => {
  const opener = fc.constantFrom("{", "router {", "experts all {", "at layers 0 {", "adapter a on b {", "base b: llama {");
  const number = fc.oneof(
    fc.constantFrom("1e308", "1e999", "-1e999", "100000000000000000000", "9".repeat(400), "0.".concat("0".repeat(300), "1")),
    fc.bigInt({ min: 0n, max: 10n ** 40n }).map(String),
  );
  const filler = fc.oneof(number, number.map((n) => `layers ${n}..${n}`), fc.constantFrom("rank", "}", ",", " "));
  fc.assert(
    fc.property(opener, fc.integer({ min: 1, max: 20_000 }), fc.array(filler, { maxLength: 20 }), fc.nat(), (open, depth, inside, closed) => {
      const text = `${open} `.repeat(depth) + inside.join(" ") + " }".repeat(closed % (depth + 1));
      const { diagnostics } = checkParse(text);
      // at most: the syntax-error cap, its notice, the nesting notice, and lexical ones among the filler
      assert.ok(diagnostics.length <= MAX_SYNTAX_ERRORS + 2 + inside.length, `${diagnostics.length} diagnostics`);
      if (text.split("{").length - 1 - closed % (depth + 1) > MAX_DEPTH) assert.ok(diagnostics.some((d) => d.code === "MIL008"));
    }),
    { numRuns: 60, seed: 4242 },
  );
});

test.run();
