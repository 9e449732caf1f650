// Sizes far beyond any real model, in specs and in the config.json a spec reads: each is refused with one
// diagnostic at its place, quickly and without the allocation it would take to honour it.
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../compiler/check.ts";
import { MAX_LAYER_LIST_ITEMS } from "../../compiler/limits.ts";

const FILE = "/virtual/limits.milora";
const SMALL = "hidden_size 64 heads 4 intermediate_size 128 vocab_size 100";

/** Runs `work`, asserting it took under `ms` and grew the heap by under `mb` megabytes. */
function bounded<T>(ms: number, mb: number, work: () => T): T {
  const heap = process.memoryUsage().heapUsed;
  const started = performance.now();
  const result = work();
  const took = performance.now() - started;
  const grew = (process.memoryUsage().heapUsed - heap) / 2 ** 20;
  assert.ok(took < ms, `took ${took.toFixed(0)} ms`);
  assert.ok(grew < mb, `heap grew by ${grew.toFixed(0)} MB`);
  return result;
}

/** The diagnostics of a spec as `CODE line:col message`. */
function problems(text: string, file = FILE): string[] {
  return checkSource(text, file).diagnostics.map((d) => `${d.code} ${d.span.start.line}:${d.span.start.column} ${d.message}`);
}

test("a base with 100,000 layers, or 10^20, is refused at the number (MIL211) before any grid is built", () => {
  for (const layers of ["100000", "100000000000000000000"]) {
    const text = `base b: llama { ${SMALL} layers ${layers} }\nadapter a on b { experts all }\n`;
    const found = bounded(500, 50, () => problems(text));
    assert.equal(found, [`MIL211 1:${text.indexOf(layers) + 1} \`layers\` ${layers} is above milora's limit of 1024`]);
  }
});

test("every base size has a limit no released model reaches", () => {
  for (const [key, value, limit] of [
    ["hidden_size", "1000000000", 65536],
    ["heads", "4096", 1024],
    ["kv_heads", "2048", 1024],
    ["head_dim", "100000000", 1024],
    ["intermediate_size", "1000000", 2 ** 18],
    ["vocab_size", "100000000", 2 ** 22],
    ["max_positions", "1000000000", 2 ** 24],
  ] as const) {
    const text = `base b: llama { ${key} ${value} }`;
    assert.equal(bounded(500, 50, () => problems(text)), [`MIL211 1:${text.indexOf(value) + 1} \`${key}\` ${value} is above milora's limit of ${limit}`]);
  }
  // 10^999 is no finite number at all
  assert.match(problems("base b: llama { rope_theta 1e999 }").join(), /MIL205 .*`rope_theta` must be a positive number/);
});

test("a head size derived from hidden_size / heads is bounded too, and the fix is named", () => {
  const { diagnostics } = checkSource("base b: llama { hidden_size 65536 heads 2 }", FILE);
  assert.equal(diagnostics.map((d) => [d.code, d.span.start.column]), [["MIL211", 17]]);
  assert.match(diagnostics[0]!.message, "the head size hidden_size / heads = 65536 / 2 = 32768 is above milora's limit of 1024");
  assert.is(diagnostics[0]!.hint, "give head_dim, or more heads");
  assert.equal(problems("base b: llama { hidden_size 65536 heads 2 head_dim 128 }"), []);
});

test("a rank above 4096 is refused at the number", () => {
  const text = `base b: llama { ${SMALL} layers 2 }\nadapter a on b { experts all { rank 100000 } }\n`;
  assert.equal(problems(text), ["MIL211 2:37 rank 100000 is above milora's limit of 4096"]);
});

test("a 200,000-item layer list is one MIL212, not 200,000 diagnostics", () => {
  const items = Array.from({ length: 200_000 }, (_, i) => String(i % 7)).join(", ");
  const text = `base b: llama { ${SMALL} layers 8 }\nadapter a on b { layers ${items} experts all }\n`;
  const found = bounded(8000, 400, () => checkSource(text, FILE).diagnostics);
  assert.equal(found.map((d) => d.code), ["MIL212"]);
  assert.equal([found[0]!.span.start.line, found[0]!.span.start.column], [2, 25 + 3 * MAX_LAYER_LIST_ITEMS]);
  assert.match(found[0]!.message, `a layer list has 200000 items; at most ${MAX_LAYER_LIST_ITEMS} are read`);
  // a list of every layer of a 1024-layer base is fine
  const all = Array.from({ length: 1024 }, (_, i) => String(i)).join(", ");
  assert.equal(problems(`base b: llama { ${SMALL} layers 1024 }\nadapter a on b { layers ${all} experts all }\n`), []);
});

test("a config.json with a huge size is refused naming the file and the key (MIL308), at the `from` string", () => {
  const dir = mkdtempSync(join(tmpdir(), "milora-limits-"));
  const config = { model_type: "llama", hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 128, vocab_size: 100 };
  for (const [key, value, limit] of [
    ["head_dim", 1e8, 1024],
    ["hidden_size", 1e9, 65536],
    ["num_hidden_layers", 1e6, 1024],
  ] as const) {
    writeFileSync(join(dir, "config.json"), JSON.stringify({ ...config, [key]: value }));
    const spec = join(dir, "spec.milora");
    const text = `base b from "config.json"\nadapter a on b { experts all }\n`;
    const found = bounded(500, 50, () => checkSource(text, spec).diagnostics);
    assert.equal(found.map((d) => [d.code, d.span.start.line, d.span.start.column]), [["MIL308", 1, 13]]);
    assert.is(found[0]!.message, `${key} in config ${join(dir, "config.json")} is ${value}, above milora's limit of ${limit}`);
  }
});

test("checking time grows linearly with the file: 10x the adapters takes at most about 20x as long", () => {
  const adapter = (i: number) =>
    `adapter a${i} on b {\n  layers 0..3\n  experts attn.* { rank 8 alpha 16 }\n  experts mlp.* { rank 4 }\n  at layers 1, 2 { experts q_proj { rank 2 } }\n  router { select top_k 2 }\n}\n`;
  const spec = (n: number) => `base b: llama { ${SMALL} layers 4 }\n` + Array.from({ length: n }, (_, i) => adapter(i)).join("");
  const time = (text: string): number => {
    const best = [0, 1, 2].map(() => {
      const started = performance.now();
      checkSource(text, FILE);
      return performance.now() - started;
    });
    return Math.min(...best);
  };
  time(spec(50)); // warm up the parser and the JIT
  const small = time(spec(200));
  const large = time(spec(2000));
  assert.ok(large < 20 * small + 50, `200 adapters: ${small.toFixed(0)} ms, 2000 adapters: ${large.toFixed(0)} ms`);
});

test("checking time stays linear in the number of errors too", () => {
  const spec = (n: number) => `base b: llama { ${SMALL} layers 4 }\nadapter a on b {\n${"  experts al { rank 0 }\n".repeat(n)}}\n`;
  const time = (text: string): number => {
    const started = performance.now();
    const { diagnostics } = checkSource(text, FILE);
    assert.ok(diagnostics.length > 0);
    return performance.now() - started;
  };
  time(spec(100));
  const small = time(spec(1000));
  const large = time(spec(10_000));
  assert.ok(large < 20 * small + 50, `1000 errors: ${small.toFixed(0)} ms, 10,000 errors: ${large.toFixed(0)} ms`);
});

test.run();
