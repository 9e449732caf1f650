// The budget of the per-token Mixture-of-LoRA baselines (Adapter.moe): per_module (MoLoRA/MOELoRA)
// and per_ffn (MixLoRA), counted as docs/language.md says, and the table `milora check` prints.
import { fileURLToPath } from "node:url";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { computeBudget } from "../../compiler/budget.ts";
import { renderBudgetTable } from "../../compiler/budget-table.ts";
import { checkFiles } from "../../compiler/check.ts";
import { MOE_DEFAULTS, ROUTER_DEFAULTS } from "../../compiler/defaults.ts";
import { EXPERT_MODULES, storedRank, type Adapter, type ExpertModule, type MoeRouting } from "../../compiler/model.ts";
import { countedAdapter, llama2_7b } from "./budget-models.ts";

const ALL_LAYERS = Array.from({ length: 32 }, (_, i) => i);
const ATTN: readonly ExpertModule[] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP: readonly ExpertModule[] = ["gate_proj", "up_proj", "down_proj"];

/** An adapter on LLaMA-2-7B with the given rank per module (alpha 2 rank) in the given layers, routed by `moe`. */
function adapterOn(ranks: Partial<Record<ExpertModule, number>>, moe: MoeRouting | undefined, layers = ALL_LAYERS): Adapter {
  const modules = EXPERT_MODULES.filter((m) => ranks[m] !== undefined);
  return countedAdapter(llama2_7b, modules, (m) => ranks[m]!, (rank) => 2 * rank, layers, moe ? { moe } : {});
}

const every = (rank: number) => Object.fromEntries(EXPERT_MODULES.map((m) => [m, rank]));
/** r (in + out) of one layer's modules at rank 1: attention 4 x 8192, MLP 3 x 15104. */
const ATTN_R1 = 4 * (4096 + 4096);
const MLP_R1 = 3 * (4096 + 11008);

test("per_module: LoRA parameters as plain LoRA of rank r, a router [E, in] per module, k / E of the FLOPs", () => {
  const budget = computeBudget(adapterOn(every(32), MOE_DEFAULTS.per_module));
  // The MiLoRA example's 79,953,920: the rank-32 LoRA split 8 ways stores the same A and B.
  assert.is(budget.loraParams, 32 * 32 * (ATTN_R1 + MLP_R1));
  assert.is(budget.loraParams, 79_953_920);
  // Per layer 8 x 4096 for q, k, v, o, gate and up, 8 x 11008 for down: 284,672; 32 layers.
  assert.is(budget.layers[0]!.routerParams, 8 * (6 * 4096 + 11008));
  assert.is(budget.routerParams, 9_109_504);
  assert.is(budget.trainableParams, 79_953_920 + 9_109_504);
  assert.is(budget.bytes.f16, 2 * budget.trainableParams);
  assert.is(budget.flopsPerToken.allEnabled, 2 * 79_953_920);
  // top 4 of 8 experts of rank 4: half of each module's rank-32 work.
  assert.is(budget.flopsPerToken.expected, 79_953_920);
  assert.ok(budget.modules.every((m) => m.experts === 8 && m.minRank === 32 && m.maxRank === 32));
  assert.is(budget.ffnPasses, undefined);
});

test("per_module: dense runs every expert; the renormalisation changes no count", () => {
  const dense = computeBudget(adapterOn(every(16), { ...MOE_DEFAULTS.per_module, selection: { rule: "dense" } }));
  assert.is(dense.flopsPerToken.expected, dense.flopsPerToken.allEnabled);
  const top1 = (renormalize: boolean) =>
    computeBudget(adapterOn(every(16), { ...MOE_DEFAULTS.per_module, experts: 4, selection: { rule: "top_k", k: 1, renormalize } }));
  assert.is(top1(true).flopsPerToken.expected, top1(false).flopsPerToken.expected);
  assert.is(top1(true).flopsPerToken.expected, top1(true).flopsPerToken.allEnabled / 4);
  // 4 experts: a router [4, in] per module.
  assert.is(top1(true).routerParams, 32 * 4 * (6 * 4096 + 11008));
});

test("per_ffn: attention plain LoRA, E full-rank experts per MLP module, one router [E, hidden] per layer", () => {
  const moe = MOE_DEFAULTS.per_ffn; // 8 experts, top 2
  const a = adapterOn({ q_proj: 32, k_proj: 32, v_proj: 32, o_proj: 32, gate_proj: 4, up_proj: 4, down_proj: 4 }, moe);
  const budget = computeBudget(a);
  // 8 experts of rank 4 store what one rank-32 module does: the MiLoRA example's LoRA budget again.
  assert.is(budget.layers[0]!.loraParams, 32 * ATTN_R1 + 8 * 4 * MLP_R1);
  assert.is(budget.loraParams, 79_953_920);
  const gate = budget.modules.find((m) => m.module === "gate_proj")!;
  assert.equal([gate.experts, gate.minRank, gate.params], [8, 4, 32 * 8 * 4 * (4096 + 11008)]);
  // The params are the stored (stacked) rank's.
  assert.is(gate.params, 32 * storedRank(a, { module: "gate_proj", rank: 4 }) * (4096 + 11008));
  assert.is(budget.modules.find((m) => m.module === "q_proj")!.experts, undefined);
  assert.is(budget.routerParams, 32 * 8 * 4096);
  // All: every expert; expected: attention in full and 2 of the 8 experts on the MLP modules.
  assert.is(budget.flopsPerToken.allEnabled, 2 * 79_953_920);
  assert.is(budget.flopsPerToken.expected, 2 * 32 * (32 * ATTN_R1 + 2 * 4 * MLP_R1));
  assert.is(budget.flopsPerToken.expected, 90_308_608);
  // down_proj's base product [4096, 11008] runs 2 times a token instead of once in all 32 layers.
  assert.equal(budget.ffnPasses, {
    layers: 32,
    downProjRuns: { allEnabled: 8, expected: 2 },
    extraBaseFlops: { allEnabled: 32 * 7 * 2 * 11008 * 4096, expected: 32 * 1 * 2 * 11008 * 4096 },
  });
  assert.is(budget.ffnPasses!.extraBaseFlops.expected, 2_885_681_152);
});

test("per_ffn: routers and feed-forward passes only where the layer adapts an MLP module", () => {
  // Attention in layers 0-3, gate_proj only in layers 0 and 1.
  const attn = adapterOn({ q_proj: 8, v_proj: 8 }, MOE_DEFAULTS.per_ffn, [0, 1, 2, 3]);
  const gate = adapterOn({ gate_proj: 8 }, MOE_DEFAULTS.per_ffn, [0, 1]);
  const budget = computeBudget({ ...attn, experts: [...attn.experts, ...gate.experts].sort((x, y) => x.layer - y.layer) });
  assert.equal(budget.layers.map((l) => l.routerParams), [8 * 4096, 8 * 4096, 0, 0]);
  assert.is(budget.ffnPasses!.layers, 2);
  // Only down_proj adapted: the experts share its input, its base product runs once.
  const down = computeBudget(adapterOn({ down_proj: 8 }, { ...MOE_DEFAULTS.per_ffn, selection: { rule: "dense" } }));
  assert.equal(down.ffnPasses, { layers: 0, downProjRuns: { allEnabled: 8, expected: 8 }, extraBaseFlops: { allEnabled: 0, expected: 0 } });
  assert.is(down.flopsPerToken.expected, down.flopsPerToken.allEnabled);
  assert.is(down.routerParams, 32 * 8 * 4096);
});

test("the table: E x one expert's rank, the routers' row, and per_ffn's extra base FLOPs", () => {
  const moeTable = (a: Adapter) => renderBudgetTable(a, computeBudget(a), { color: false });
  const perModule = moeTable(adapterOn(every(32), MOE_DEFAULTS.per_module));
  assert.match(perModule, /per-token router per module \(MoLoRA\/MOELoRA\): 8 experts of rank r\/8 in each, top_k 4 renormalize/);
  assert.match(perModule, /q_proj\s+32\s+8x4\s+8,388,608/);
  assert.match(perModule, /router\s+32\s+9,109,504/);
  assert.match(perModule, /79,953,920 expected under routing/);
  assert.not.match(perModule, /base FLOPs/);

  const perFfn = moeTable(adapterOn({ q_proj: 32, gate_proj: 16, down_proj: 8 }, MOE_DEFAULTS.per_ffn));
  assert.match(perFfn, /per-token router per layer's MLP \(MixLoRA\): 8 experts of rank r in each MLP module, top_k 2 renormalize/);
  assert.match(perFfn, /q_proj\s+32\s+32\s/);
  assert.match(perFfn, /gate_proj\s+32\s+8x16\s/);
  assert.match(perFfn, /down_proj\s+32\s+8x8\s/);
  assert.match(perFfn, /base FLOPs\/token\s+\+2,885,681,152 expected: down_proj's base product runs 2 times per token in 32 layers, not once/);
  assert.match(perFfn, /\+20,199,768,064 with all 8 experts/);

  // Ranks that differ by layer: E x (range).
  const ranged = adapterOn(every(32), MOE_DEFAULTS.per_module, [0, 1]);
  const mixed = { ...ranged, experts: ranged.experts.map((e) => (e.layer === 1 ? { ...e, rank: 16 } : e)) };
  assert.match(moeTable(mixed), /q_proj\s+2\s+8x\(2-4\)/);

  // A MiLoRA adapter's table is as before.
  const milora: Adapter = { ...adapterOn(every(8), undefined), router: ROUTER_DEFAULTS };
  const table = moeTable(milora);
  assert.match(table, /MiLoRA router per layer: top_k 2, pooling last, routed once per prompt/);
  assert.match(table, /q_proj\s+32\s+8\s+2,097,152/);
  assert.match(table, /with all enabled modules\n/);
  assert.not.match(table, /base FLOPs|experts/);
});

test("examples/llama2-7b.milora: the MOELoRA- and MixLoRA-style variants keep MiLoRA's LoRA budget", () => {
  const file = fileURLToPath(new URL("../../examples/llama2-7b.milora", import.meta.url));
  const { program, diagnostics } = checkFiles([file]);
  assert.equal(diagnostics, []);
  const budgetOf = (name: string) => computeBudget(program.adapters.find((a) => a.name === name)!);
  const moelora = program.adapters.find((a) => a.name === "llama2_moelora")!;
  assert.equal(moelora.moe, { placement: "per_module", experts: 8, selection: { rule: "top_k", k: 4, renormalize: true }, balance: 0.01 });
  assert.equal([budgetOf("llama2_moelora").loraParams, budgetOf("llama2_moelora").routerParams], [79_953_920, 9_109_504]);
  const mixlora = program.adapters.find((a) => a.name === "llama2_mixlora")!;
  assert.equal(mixlora.moe, { placement: "per_ffn", experts: 8, selection: { rule: "top_k", k: 2, renormalize: true }, balance: 0.01 });
  assert.ok(mixlora.experts.filter((e) => MLP.includes(e.module)).every((e) => e.rank === 4 && e.alpha === 8));
  assert.ok(mixlora.experts.filter((e) => ATTN.includes(e.module)).every((e) => e.rank === 32 && e.alpha === 64));
  const mix = budgetOf("llama2_mixlora");
  assert.equal([mix.loraParams, mix.routerParams, mix.ffnPasses?.downProjRuns.expected], [79_953_920, 1_048_576, 2]);
  assert.is(budgetOf("llama2_milora").loraParams, 79_953_920);
});

test.run();
