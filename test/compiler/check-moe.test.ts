// The per-token Mixture-of-LoRA baselines in the spec language: `router { placement per_module |
// per_ffn ... }` resolving to Adapter.moe (defaults, variants, switching back), and every diagnostic
// of those routers with its place in the file.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkSource } from "../../compiler/check.ts";
import { MOE_DEFAULTS, ROUTER_DEFAULTS } from "../../compiler/defaults.ts";
import { storedRank } from "../../compiler/model.ts";

const FILE = "/virtual/spec.milora";
/** A 4-layer base on line 1, so adapters in the tests start on line 2. */
const BASE = "base b: llama { hidden_size 64 layers 4 heads 4 intermediate_size 128 vocab_size 100 }\n";

function clean(text: string) {
  const { diagnostics, program } = checkSource(BASE + text, FILE);
  assert.equal(
    diagnostics.map((d) => `${d.code} ${d.span.start.line}:${d.span.start.column} ${d.message}`),
    [],
  );
  return (name: string) => {
    const found = program.adapters.find((a) => a.name === name);
    assert.ok(found, name);
    return found;
  };
}

/** Asserts the spec (after BASE) gives exactly one diagnostic, with this code, place and message. */
function expectOne(text: string, code: string, e: { line: number; column: number; message: RegExp; hint?: RegExp }): void {
  const { diagnostics } = checkSource(BASE + text, FILE);
  assert.equal(
    diagnostics.map((d) => d.code),
    [code],
    diagnostics.map((d) => `${d.code} ${d.span.start.line}:${d.span.start.column} ${d.message}`).join("\n"),
  );
  const [d] = diagnostics;
  assert.is(d!.span.file, FILE);
  assert.equal([d!.span.start.line, d!.span.start.column], [e.line, e.column]);
  assert.match(d!.message, e.message);
  if (e.hint) assert.match(d!.hint ?? "", e.hint);
}

// ---- resolving

test("placement per_module and per_ffn alone give MOE_DEFAULTS and no MiLoRA router", () => {
  const adapter = clean(
    "adapter m on b { experts all { rank 8 } router { placement per_module } }\n" +
      "adapter f on b { experts all { rank 8 } router { placement per_ffn } }\n",
  );
  const m = adapter("m");
  assert.equal(m.moe, { placement: "per_module", experts: 8, selection: { rule: "top_k", k: 4, renormalize: true }, balance: 0.01 });
  assert.equal(m.moe, MOE_DEFAULTS.per_module);
  assert.is(m.router, undefined);
  const f = adapter("f");
  assert.equal(f.moe, { placement: "per_ffn", experts: 8, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 });
  assert.is(f.router, undefined);
  // The spec's rank stays on the slots; per_ffn stores its MLP experts stacked.
  const rankOf = (module: string) => storedRank(f, f.experts.find((e) => e.module === module)!);
  assert.equal([rankOf("q_proj"), rankOf("gate_proj"), rankOf("down_proj")], [8, 64, 64]);
  assert.is(storedRank(m, m.experts[0]!), 8);
});

test("num_experts, select and balance set the router; the keys apply wherever placement is written", () => {
  const adapter = clean(
    "adapter m on b { experts all { rank 8 } router { num_experts 4 select top_k 2 balance 0.05 placement per_module } }\n" +
      "adapter d on b { experts mlp.* { rank 4 } router { placement per_ffn num_experts 16 select dense } }\n",
  );
  assert.equal(adapter("m").moe, { placement: "per_module", experts: 4, selection: { rule: "top_k", k: 2, renormalize: false }, balance: 0.05 });
  assert.equal(adapter("d").moe, { placement: "per_ffn", experts: 16, selection: { rule: "dense" }, balance: 0.01 });
});

test("variants: extends keeps the placement and its settings, a new placement starts from its defaults", () => {
  const adapter = clean(
    "adapter m on b { experts all { rank 16 } router { placement per_module num_experts 4 balance 0.02 } }\n" +
      "adapter keep extends m { router { select top_k 3 } }\n" +
      "adapter bare extends m { experts q_proj off }\n" +
      "adapter ffn extends m { router { placement per_ffn } }\n",
  );
  assert.equal(adapter("keep").moe, { placement: "per_module", experts: 4, selection: { rule: "top_k", k: 3, renormalize: false }, balance: 0.02 });
  assert.equal(adapter("bare").moe, adapter("m").moe);
  assert.is(adapter("bare").experts.some((e) => e.module === "q_proj"), false);
  assert.equal(adapter("ffn").moe, MOE_DEFAULTS.per_ffn);
});

test("a MiLoRA adapter's variant may switch to per_module; placement per_layer and router off switch back", () => {
  const adapter = clean(
    "adapter mi on b { experts all { rank 8 } router { pooling attention activation gelu } }\n" +
      "adapter m extends mi { router { placement per_module } }\n" +
      "adapter layer extends m { router { placement per_layer select top_k 3 } }\n" +
      "adapter lora extends m { router off }\n",
  );
  assert.equal(adapter("mi").router?.pooling, "attention");
  // The MiLoRA keys of the parent are not per_module keys: they do not travel into the moe router.
  assert.equal(adapter("m").moe, MOE_DEFAULTS.per_module);
  assert.is(adapter("m").router, undefined);
  // Back to per_layer from a per-token router: the MiLoRA router starts from its defaults.
  assert.is(adapter("layer").moe, undefined);
  assert.equal(adapter("layer").router, { ...ROUTER_DEFAULTS, selection: { rule: "top_k", k: 3, renormalize: false } });
  assert.equal([adapter("lora").router, adapter("lora").moe], [undefined, undefined]);
});

test("a per_module top_k is bounded by num_experts, not by the layer's enabled modules", () => {
  // One module enabled, 4 experts in it: top_k 3 is fine here (MiLoRA's rule would say MIL401).
  const adapter = clean("adapter m on b { experts q_proj { rank 8 } router { placement per_module num_experts 4 select top_k 3 } }");
  assert.equal(adapter("m").moe?.selection, { rule: "top_k", k: 3, renormalize: false });
});

// ---- MIL407: keys and selections of another placement, num_experts out of range

test("MIL407 a per_layer-only key under per_module (each of MiLoRA's keys)", () => {
  expectOne("adapter a on b { experts all { rank 8 } router { placement per_module pooling mean } }", "MIL407", {
    line: 2,
    column: 71,
    message: /`pooling` applies to MiLoRA's per_layer router only: a per_module router routes every token/,
    hint: /placement per_layer/,
  });
  for (const key of ["input layer_input", "pooling last", "activation gelu", "when token", "noise false"]) {
    const { diagnostics } = checkSource(BASE + `adapter a on b { experts all { rank 8 } router { placement per_ffn ${key} } }`, FILE);
    assert.equal(diagnostics.map((d) => [d.code, d.span.start.column]), [["MIL407", 68]], key);
  }
});

test("MIL407 threshold selection under per_ffn", () => {
  expectOne("adapter a on b { experts all { rank 8 } router { placement per_ffn select threshold 0.2 } }", "MIL407", {
    line: 2,
    column: 75,
    message: /a per_ffn router keeps top_k experts or all of them \(dense\); threshold selection is MiLoRA's/,
    hint: /select top_k 2 renormalize/,
  });
});

test("MIL407 num_experts out of range: below 2, above 64, fractional", () => {
  for (const [value, column] of [["1", 80], ["65", 80], ["2.5", 80]] as const) {
    expectOne(`adapter a on b { experts all { rank 8 } router { placement per_ffn num_experts ${value} } }`, "MIL407", {
      line: 2,
      column,
      message: new RegExp(`num_experts must be an integer from 2 to 64, got ${value.replace(".", "\\.")}`),
    });
  }
});

test("MIL407 num_experts under a per_layer router", () => {
  expectOne("adapter a on b { experts all { rank 8 } router { num_experts 4 } }", "MIL407", {
    line: 2,
    column: 50,
    message: /num_experts applies to per_module and per_ffn routers: MiLoRA's experts are the layer's enabled modules/,
    hint: /placement per_module/,
  });
  // Also beside an explicit `placement per_layer`.
  expectOne("adapter a on b { experts all { rank 8 } router { placement per_layer num_experts 4 } }", "MIL407", {
    line: 2,
    column: 70,
    message: /num_experts applies to per_module and per_ffn routers/,
  });
});

// ---- MIL401, MIL211, MIL217-219

test("MIL401 top_k larger than num_experts", () => {
  expectOne("adapter a on b { experts all { rank 8 } router { placement per_module num_experts 4 select top_k 5 } }", "MIL401", {
    line: 2,
    column: 98,
    message: /top_k 5 is larger than the router's 4 experts \(num_experts\)/,
    hint: /at most 4/,
  });
});

test("MIL211 a per_ffn stacked rank above 256", () => {
  // 8 experts of rank 64 stack to 512 on each MLP module; the attention modules' rank 64 is fine.
  expectOne("adapter a on b { experts all { rank 64 } router { placement per_ffn num_experts 8 } }", "MIL211", {
    line: 2,
    column: 42,
    message: /layer 0 gate_proj: 8 experts of rank 64 stack to rank 512, above the 256 the LoRA kernels take/,
  });
  // 8 x 32 = 256 is the largest taken.
  clean("adapter a on b { experts all { rank 32 } router { placement per_ffn } }");
});

test("MIL217 DoRA under a per-token router", () => {
  expectOne("adapter a on b { experts all { rank 8 dora true } router { placement per_module } }", "MIL217", {
    line: 2,
    column: 51,
    message: /routes tokens per_module but uses DoRA \(layer 0 q_proj\)/,
    hint: /MiDoRA/,
  });
});

test("MIL218 a per_module rank that does not split into num_experts", () => {
  expectOne("adapter a on b { experts all { rank 12 } router { placement per_module } }", "MIL218", {
    line: 2,
    column: 42,
    message: /layer 0 q_proj has rank 12, which does not split into 8 experts of equal rank/,
  });
  // A later line's rank on one layer is named by its layer.
  expectOne(
    "adapter a on b {\n  experts all { rank 8 }\n  at layers 3 { experts v_proj { rank 6 } }\n  router { placement per_module num_experts 4 }\n}",
    "MIL218",
    { line: 5, column: 3, message: /layer 3 v_proj has rank 6, which does not split into 4 experts/ },
  );
});

test("MIL219 a per_ffn router with no MLP module enabled", () => {
  expectOne("adapter a on b { experts attn.* { rank 8 } router { placement per_ffn } }", "MIL219", {
    line: 2,
    column: 44,
    message: /routes per_ffn but enables none of gate_proj, up_proj, down_proj/,
  });
});

test.run();
