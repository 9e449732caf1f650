import { readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { computeBudget } from "../../compiler/budget.ts";
import { checkFiles } from "../../compiler/check.ts";

const examples = fileURLToPath(new URL("../../examples/", import.meta.url));
const specs = readdirSync(examples).filter((f) => f.endsWith(".milora"));

function check(name: string) {
  return checkFiles([join(examples, name)]);
}

function adapter(name: string, adapterName: string) {
  const found = check(name).program.adapters.find((a) => a.name === adapterName);
  assert.ok(found, `${adapterName} in ${name}`);
  return found;
}

test("every example checks clean, without warnings", () => {
  assert.ok(specs.length >= 5);
  for (const spec of specs) {
    const { diagnostics } = check(spec);
    assert.equal(
      diagnostics.map((d) => `${d.span.file}:${d.span.start.line} ${d.code} ${d.message}`),
      [],
      spec,
    );
  }
  assert.ok(
    specs.includes("llama-tiny.milora") && specs.includes("llama2-7b.milora") && specs.includes("llama3.2-1b.milora"),
  );
});

test("llama-tiny: MiLoRA on 7 modules, with per-token and plain-LoRA variants", () => {
  const tiny = adapter("llama-tiny.milora", "tiny");
  assert.equal([tiny.base.hiddenSize, tiny.base.layers, tiny.base.heads, tiny.base.kvHeads], [64, 2, 4, 2]);
  assert.is(tiny.experts.length, 2 * 7);
  assert.ok(tiny.experts.every((e) => e.rank === 4));
  assert.equal(tiny.router?.selection, { rule: "top_k", k: 2, renormalize: false });
  assert.equal([tiny.router?.pooling, tiny.router?.balance], ["attention", 0.01]);
  assert.is(adapter("llama-tiny.milora", "tiny_token").router?.when, "token");
  assert.is(adapter("llama-tiny.milora", "tiny_lora").router, undefined);
});

test("llama2-7b: the paper's settings, 79,953,920 LoRA parameters at rank 32 on all modules", () => {
  const a = adapter("llama2-7b.milora", "llama2_milora");
  assert.equal([a.router?.pooling, a.router?.activation, a.router?.rational, a.router?.balance], ["attention", "rational", { numerator: 6, denominator: 5 }, 0.01]);
  const budget = computeBudget(a);
  // Per layer r (in + out) summed over the 7 modules at r = 32:
  //   q, k, v, o: 4 x 32 x (4096 + 4096) = 1,048,576; gate, up, down: 3 x 32 x (4096 + 11008) = 1,449,984;
  //   2,498,560 a layer (4 x the rank-8 624,640), x 32 layers = 79,953,920.
  assert.is(budget.loraParams, 79_953_920);
  // Per layer router: W_gate 7 x 4096 = 28,672, W_noise the same (noise true), w_sa 4,096,
  // rational 7 + 5 = 12: 61,452; x 32 layers = 1,966,464.
  assert.is(budget.routerParams, 1_966_464);
  assert.is(budget.trainableParams, 79_953_920 + 1_966_464); // 81,920,384
  assert.is(budget.baseParams, 6_738_415_616);
});

test("llama3.2-1b: grouped-query attention shapes and per-layer ranks", () => {
  const a = adapter("llama3.2-1b.milora", "llama32_milora");
  const v = a.experts.find((e) => e.module === "v_proj")!;
  assert.equal([v.inFeatures, v.outFeatures], [2048, 512]);
  assert.equal(
    [11, 12].map((layer) => a.experts.find((e) => e.layer === layer && e.module === "up_proj")!.rank),
    [8, 4],
  );
  assert.is(computeBudget(a).baseParams, 1_235_814_400);
  assert.equal(a.base.ropeScaling, { type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 });
});

test("from-config: a base from config.json, imported", () => {
  const { program } = check("from-config.milora");
  const bot = program.adapters.find((a) => a.name === "support_bot")!;
  assert.equal([bot.base.name, bot.base.hiddenSize, bot.base.maxPositions], ["tiny_hf", 64, 128]);
  assert.ok(bot.base.configPath?.endsWith(join("examples", "tiny-hf", "config.json")));
  assert.is(
    bot.experts.some((e) => e.module === "k_proj"),
    false,
  );
  const down = bot.experts.filter((e) => e.module === "down_proj").map((e) => e.rank);
  assert.equal(down, [16, 4]);
});

test.run();
