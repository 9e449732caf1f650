import { test } from "uvu";
import * as assert from "uvu/assert";
import { baseParams, computeBudget } from "../../compiler/budget.ts";
import { EXPERT_MODULES, type Adapter, type BaseModel, type ExpertModule, type RouterConfig } from "../../compiler/model.ts";
import { ROUTER_DEFAULTS } from "../../compiler/defaults.ts";
import { countedAdapter, llama2_7b, llama32_1b } from "./budget-models.ts";

/** `modules` of `layers` (every layer unless given) at `rank`, alpha 16, under a MiLoRA `router` or none. */
function adapterOn(
  base: BaseModel,
  modules: readonly ExpertModule[],
  rank: number,
  router: RouterConfig | undefined,
  layers = Array.from({ length: base.layers }, (_, i) => i),
): Adapter {
  return countedAdapter(base, modules, () => rank, () => 16, layers, router ? { router } : {});
}

test("LLaMA-2-7B with all 7 modules at rank 8 (PEFT's count)", () => {
  const budget = computeBudget(adapterOn(llama2_7b, EXPERT_MODULES, 8, undefined));
  const q = budget.modules.find((m) => m.module === "q_proj")!;
  assert.is(q.params / q.layers, 8 * (4096 + 4096)); // 65,536
  assert.is(budget.layers[0]!.loraParams, 624_640);
  assert.is(budget.loraParams, 19_988_480);
  assert.is(budget.routerParams, 0);
  assert.is(budget.trainableParams, 19_988_480);
});

test("base parameters match the published model sizes", () => {
  assert.is(baseParams(llama2_7b), 6_738_415_616); // LLaMA-2-7B
  assert.is(baseParams(llama32_1b), 1_235_814_400); // Llama-3.2-1B: tied embeddings, GQA
});

test("a MiLoRA router adds W_gate and W_noise per layer; top_k 2 of 7 is the expected FLOPs share", () => {
  const budget = computeBudget(adapterOn(llama2_7b, EXPERT_MODULES, 8, ROUTER_DEFAULTS));
  assert.is(budget.routerParams, 32 * 2 * 4096 * 7);
  assert.is(budget.trainableParams, 19_988_480 + 1_835_008);
  assert.is(budget.flopsPerToken.allEnabled, 2 * 19_988_480);
  assert.ok(Math.abs(budget.flopsPerToken.expected - (2 * 19_988_480 * 2) / 7) < 1e-6);
  assert.is(budget.bytes.f32, 4 * 21_823_488);
  assert.is(budget.bytes.f16, 2 * 21_823_488);
  assert.ok(Math.abs(budget.shareOfBasePercent - (100 * 21_823_488) / 6_738_415_616) < 1e-12);
});

test("the self-attention pooler adds its vector w_sa [hidden]; no noise drops W_noise", () => {
  const router: RouterConfig = { ...ROUTER_DEFAULTS, pooling: "attention", noise: false };
  const budget = computeBudget(adapterOn(llama32_1b, ["q_proj", "v_proj"], 4, router, [0, 1]));
  // Per layer W_gate 2048 x 2 and w_sa 2048.
  assert.is(budget.routerParams, 2 * (2048 * 2 + 2048));
  // GQA: v_proj is 2048 -> 8 * 64
  assert.is(budget.loraParams, 2 * (4 * (2048 + 2048) + 4 * (2048 + 512)));
});

test("the rational activation adds its m + 1 + n coefficients per router", () => {
  const router: RouterConfig = { ...ROUTER_DEFAULTS, noise: false, activation: "rational", rational: { numerator: 6, denominator: 5 } };
  const budget = computeBudget(adapterOn(llama32_1b, ["q_proj"], 4, router, [0, 1, 2]));
  // Per layer W_gate 2048 x 1 and a_0..a_6, b_1..b_5 (12 numbers).
  assert.is(budget.routerParams, 3 * (2048 + 12));
});

test("threshold T bounds the expected share by min(n, floor(1/T)) of n; the gate form changes no count", () => {
  const share = (selection: RouterConfig["selection"]) => {
    const b = computeBudget(adapterOn(llama32_1b, EXPERT_MODULES, 8, { ...ROUTER_DEFAULTS, selection }));
    return b.flopsPerToken.expected / b.flopsPerToken.allEnabled;
  };
  // floor(1 / 0.3) = 3 experts at most reach 0.3; floor(1 / 0.6) = 1 (the argmax, always kept); 1 / 0.1 = 10 > 7.
  assert.ok(Math.abs(share({ rule: "threshold", threshold: 0.3, renormalize: false }) - 3 / 7) < 1e-12);
  assert.ok(Math.abs(share({ rule: "threshold", threshold: 0.6, renormalize: true }) - 1 / 7) < 1e-12);
  assert.ok(Math.abs(share({ rule: "threshold", threshold: 0.1, renormalize: false }) - 1) < 1e-12);
  assert.is(share({ rule: "top_k", k: 2, renormalize: true }), share({ rule: "top_k", k: 2, renormalize: false }));
});

test("dense selection and plain LoRA expect every enabled module to run", () => {
  for (const router of [{ ...ROUTER_DEFAULTS, selection: { rule: "dense" } } as RouterConfig, undefined]) {
    const budget = computeBudget(adapterOn(llama32_1b, EXPERT_MODULES, 8, router));
    assert.is(budget.flopsPerToken.expected, budget.flopsPerToken.allEnabled);
  }
});

test("modules report the range of ranks they have across layers", () => {
  const adapter = adapterOn(llama32_1b, ["down_proj"], 8, undefined, [0, 1, 2]);
  const experts = adapter.experts.map((e) => (e.layer === 2 ? { ...e, rank: 2 } : e));
  const [down] = computeBudget({ ...adapter, experts }).modules;
  assert.equal([down!.minRank, down!.maxRank, down!.params], [2, 8, (8 + 8 + 2) * (8192 + 2048)]);
});

test.run();
