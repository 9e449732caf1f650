// The plan of a LLaMA base: its tensor table, its op lists and its kernel set, as plain data.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles } from "../../compiler/check.ts";
import { PlanError, kernelSources, planBase, type PlanOp } from "../../compiler/plan.ts";
import { loraPlanProblem } from "../../runtime/package/format.ts";
import { randomCheckpointBase } from "../../examples/random-checkpoint.ts";

const gqa = randomCheckpointBase({
  hiddenSize: 64,
  layers: 2,
  heads: 4,
  kvHeads: 2,
  intermediateSize: 176,
  vocabSize: 512,
  seed: 1,
});
const tied = { ...gqa, tieEmbeddings: true };

/** Every kernel key an op names. */
function keysOf(ops: readonly PlanOp[]): string[] {
  return ops.flatMap((op) =>
    op.op === "linear" ? [op.matmul, op.matvec, ...(op.lora ? [op.lora.expand] : [])] : op.op === "lora" ? [op.lora.expand] : op.op === "copy" ? [] : [op.kernel],
  );
}

test("the tensor table is exactly what a LLaMA checkpoint holds, with GQA widths", () => {
  // hidden 64, 4 heads of 16 (q 64), 2 kv heads (kv 32), intermediate 176, vocab 512: HF names, [out, in]
  const layer = (i: number) => [
    `model.layers.${i}.input_layernorm.weight [64]`,
    `model.layers.${i}.self_attn.q_proj.weight [64,64]`,
    `model.layers.${i}.self_attn.k_proj.weight [32,64]`,
    `model.layers.${i}.self_attn.v_proj.weight [32,64]`,
    `model.layers.${i}.self_attn.o_proj.weight [64,64]`,
    `model.layers.${i}.post_attention_layernorm.weight [64]`,
    `model.layers.${i}.mlp.gate_proj.weight [176,64]`,
    `model.layers.${i}.mlp.up_proj.weight [176,64]`,
    `model.layers.${i}.mlp.down_proj.weight [64,176]`,
  ];
  const expected = ["model.embed_tokens.weight [512,64]", ...layer(0), ...layer(1), "model.norm.weight [64]"];
  const table = (base: typeof gqa) => planBase(base).tensors.map((t) => `${t.name} [${t.shape.join(",")}]`);
  assert.equal(table(gqa), [...expected, "lm_head.weight [512,64]"]);
  assert.equal(table(tied), expected);
  const k = planBase(gqa).tensors.find((t) => t.name === "model.layers.1.self_attn.k_proj.weight")!;
  assert.equal(k.module, "k_proj");
  assert.equal(k.layer, 1);
  assert.is(k.splittable, true);
  assert.is(planBase(gqa).tensors.find((t) => t.role === "attn_norm")!.splittable, false);
});

test("tied embeddings: the head reads the embedding table, and there is no lm_head tensor", () => {
  const plan = planBase(tied);
  const head = plan.head.find((op) => op.op === "linear");
  assert.is(head?.op === "linear" && head.weight, "model.embed_tokens.weight");
  assert.equal(plan.tensors.filter((t) => t.role === "embedding" || t.role === "lm_head").map((t) => t.name), ["model.embed_tokens.weight"]);
});

test("the plan survives JSON, and its kernel set is what a GQA LLaMA needs, written out by hand", () => {
  const plan = planBase(gqa, { ctx: 100 });
  assert.equal(JSON.parse(JSON.stringify(plan)), plan);
  // hidden 64, 4 heads of 16 over 2 KV heads (k, v are 32 wide), ffn 176, vocab 512, 100 positions:
  // each linear shape has a prefill (matmul) and a decode (matvec) kernel; o and down add the residual.
  const linear = (K: number, N: number, residual: boolean) => [`matmul(K=${K},N=${N},residual=${residual})`, `matvec(K=${K},N=${N},residual=${residual})`];
  const want = [
    "rmsnorm(hidden=64,eps=0.000001)",
    ...linear(64, 64, false), // q
    ...linear(64, 32, false), // k, v
    "rope(heads=4,kvHeads=2,headDim=16,theta=10000)",
    "kv_write(kvHeads=2,headDim=16,maxPositions=100)",
    "attention(heads=4,kvHeads=2,headDim=16,maxPositions=100)",
    ...linear(64, 64, true), // o + residual
    ...linear(64, 176, false), // gate, up
    "swiglu()",
    ...linear(176, 64, true), // down + residual
    ...linear(64, 512, false), // lm_head
    "sampling(vocab=512)",
    "beam_topk(vocab=512)",
    "logit_adjust(vocab=512)",
    "chosen_logprob(vocab=512)",
  ];
  assert.equal(plan.kernels.map((k) => k.key).sort(), [...want].sort());
  // The ops name exactly these, in forward order: the layer's, then the head's.
  assert.equal(keysOf(plan.layer), [
    "rmsnorm(hidden=64,eps=0.000001)",
    ...linear(64, 64, false),
    ...linear(64, 32, false),
    ...linear(64, 32, false),
    "rope(heads=4,kvHeads=2,headDim=16,theta=10000)",
    "kv_write(kvHeads=2,headDim=16,maxPositions=100)",
    "attention(heads=4,kvHeads=2,headDim=16,maxPositions=100)",
    ...linear(64, 64, true),
    "rmsnorm(hidden=64,eps=0.000001)",
    ...linear(64, 176, false),
    ...linear(64, 176, false),
    "swiglu()",
    ...linear(176, 64, true),
  ]);
  assert.equal(keysOf(plan.head), ["rmsnorm(hidden=64,eps=0.000001)", ...linear(64, 512, false), "sampling(vocab=512)"]);
  assert.equal([...kernelSources(plan).keys()].sort(), [...want].sort(), "each kernel generates");
});

test("the residual stream leaves each layer where it entered", () => {
  const plan = planBase(gqa);
  const writes = plan.layer.flatMap((op) => ("output" in op ? [op.output] : []));
  assert.is(writes.at(-1), plan.input);
  for (const op of plan.layer) if (op.op === "linear" && op.residual) assert.is.not(op.residual, op.output);
});

test("what the kernels cannot run is refused with the reason", () => {
  assert.throws(
    () => planBase(gqa, { ctx: 0 }),
    (e: unknown) => e instanceof PlanError && /context 0/.test((e as Error).message),
  );
  assert.throws(() => planBase({ ...gqa, family: "falcon" }), /family "falcon" has no planner/);
});

test("serving adapters adds LoRA to every expert linear (not lm_head): one shrink op per group of modules reading one input, one pipeline per shape", () => {
  assert.ok(planBase(gqa).layer.every((op) => op.op !== "lora_shrink" && (op.op !== "linear" || op.lora === undefined)));
  const plan = planBase(gqa, { maxLoraRank: 8 });
  assert.is(plan.maxLoraRank, 8);
  const linears = plan.layer.filter((op): op is Extract<PlanOp, { op: "linear" }> => op.op === "linear");
  // Shrink is specialised by the input width (64, or 176 for down_proj), the rank and the group's
  // module count; expand by the output width (q, o, down 64; k, v 32; gate, up 176) and the rank; the
  // gate column is the module's place, t its index in its shrink's group. Every expand applies DoRA
  // factors; o_proj's and down_proj's read the residual their product fused. Decode runs the expand in
  // a matvec's epilogue instead: one per module shape and residual.
  const shrink = (inFeatures: number, modules = 1) => `lora_shrink(inFeatures=${inFeatures},maxRank=8,rowInfo=true${modules > 1 ? `,modules=${modules}` : ""})`;
  const expand = (outFeatures: number, residual = false) => `lora_expand(outFeatures=${outFeatures},maxRank=8,dora=true${residual ? ",residual=true" : ""},rowInfo=true)`;
  const matvec = (K: number, N: number, residual = false) => `matvec(K=${K},N=${N},residual=${residual},loraRank=8)`;
  assert.equal(
    linears.map((op) => [op.module, op.lora!.expand, op.lora!.matvec, op.lora!.gateColumn, op.lora!.t]),
    [
      ["q_proj", expand(64), matvec(64, 64), 0, 0],
      ["k_proj", expand(32), matvec(64, 32), 1, 1],
      ["v_proj", expand(32), matvec(64, 32), 2, 2],
      ["o_proj", expand(64, true), matvec(64, 64, true), 3, 0],
      ["gate_proj", expand(176), matvec(64, 176), 4, 0],
      ["up_proj", expand(176), matvec(64, 176), 5, 1],
      ["down_proj", expand(64, true), matvec(176, 64, true), 6, 0],
    ],
  );
  // The shrink ops, each right before the first linear of its group, reading the group's input.
  const order = plan.layer.flatMap((op) => (op.op === "lora_shrink" ? [`shrink ${op.modules.join("/")} of ${op.input} (${op.kernel}, column ${op.gateColumn})`] : op.op === "linear" ? [op.module] : []));
  assert.equal(order, [
    `shrink q_proj/k_proj/v_proj of xn (${shrink(64, 3)}, column 0)`,
    "q_proj",
    "k_proj",
    "v_proj",
    `shrink o_proj of attn (${shrink(64)}, column 3)`,
    "o_proj",
    `shrink gate_proj/up_proj of xn (${shrink(64, 2)}, column 4)`,
    "gate_proj",
    "up_proj",
    `shrink down_proj of act (${shrink(176)}, column 6)`,
    "down_proj",
  ]);
  assert.ok(plan.head.every((op) => op.op !== "linear" || op.lora === undefined));
  const sources = kernelSources(plan);
  for (const key of [shrink(64, 3), shrink(64), shrink(64, 2), shrink(176), expand(64), expand(64, true), expand(32), expand(176)]) assert.ok(sources.has(key), key);
  assert.is(loraPlanProblem(plan), undefined);
  // Not grouping (the plan before grouping): a shrink of its own before every linear.
  const single = planBase(gqa, { maxLoraRank: 8, groupLoraShrinks: false });
  const moduleOf = (op: PlanOp | undefined) => (op?.op === "linear" ? op.module : undefined);
  const shrinks = single.layer.flatMap((op, i) => (op.op === "lora_shrink" ? [[op.modules.join(), moduleOf(single.layer[i + 1]), op.kernel] as const] : []));
  assert.equal(shrinks.map(([m]) => m), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
  assert.ok(shrinks.every(([m, next, kernel]) => m === next && !kernel.includes("modules")));
  assert.ok(single.layer.every((op) => op.op !== "linear" || op.lora?.t === 0));
  assert.is(loraPlanProblem(single), undefined);
  assert.throws(() => planBase(gqa, { maxLoraRank: 300 }), /from 0 to 256/);
});

test("the MoE baselines: per_module's shrinks route each module alone; per_ffn groups its plain attention LoRA and runs each pass's MLP shrinks alone", () => {
  const adapters = checkFiles(["examples/llama2-7b.milora"]).program.adapters;
  const shrinks = (name: string) => {
    const spec = adapters.find((a) => a.name === name)!;
    const plan = planBase(spec.base, { adapter: spec, ctx: 64 });
    assert.is(loraPlanProblem(plan), undefined, name);
    return plan.layer.flatMap((op) => (op.op === "lora_shrink" ? [`${op.modules.join("/")}${op.pass === undefined ? "" : ` pass ${op.pass}`}: ${/moe=(\w+)/.exec(op.kernel)?.[1] ?? "plain"}`] : []));
  };
  assert.equal(shrinks("llama2_moelora"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map((m) => `${m}: route`));
  const pass = (p: number) => [`gate_proj pass ${p}: pass`, `up_proj pass ${p}: pass`, `down_proj pass ${p}: pass`];
  assert.equal(shrinks("llama2_mixlora"), ["q_proj/k_proj/v_proj: plain", "o_proj: plain", ...pass(0), ...pass(1)]);
});

test("the LoRA ops are checked as the engine runs them: each LoRA reads a region a shrink before it wrote, the shrink's kernel made for its modules", () => {
  const plan = planBase(gqa, { maxLoraRank: 8 });
  const edit = (f: (layer: PlanOp[]) => PlanOp[]) => loraPlanProblem({ ...plan, layer: f([...plan.layer]) });
  const k = plan.layer.findIndex((op) => op.op === "linear" && op.module === "k_proj");
  const withLora = (op: PlanOp, lora: object): PlanOp => ({ ...op, lora: { ...(op as Extract<PlanOp, { op: "linear" }>).lora!, ...lora } }) as PlanOp;
  assert.match(edit((l) => l.filter((op) => op.op !== "lora_shrink")) ?? "", /q_proj's LoRA reads region 0 of t, but no lora_shrink op before it/);
  assert.match(edit((l) => l.map((op, i) => (i === k ? withLora(op, { t: 0 }) : op))) ?? "", /k_proj's LoRA reads region 0/);
  assert.match(edit((l) => l.map((op, i) => (i === k ? withLora(op, { gateColumn: 2 }) : op))) ?? "", /k_proj's LoRA reads region 1 .* gate column 2/);
  const first = plan.layer.findIndex((op) => op.op === "lora_shrink");
  const group = plan.layer[first] as Extract<PlanOp, { op: "lora_shrink" }>;
  assert.match(edit((l) => l.map((op, i) => (i === first ? { ...group, modules: ["q_proj", "k_proj"] } : op))) ?? "", /names 2 distinct module\(s\) and a lora_shrink kernel made for as many/);
  // the shrink after the linears it serves is too late
  assert.match(edit((l) => [...l.slice(0, first), ...l.slice(first + 1, first + 4), group, ...l.slice(first + 4)]) ?? "", /q_proj's LoRA/);
});

test("a plan made for a routed adapter names its routers' kernels, per layer, from the router config", () => {
  const adapters = checkFiles(["examples/llama-tiny.milora"]).program.adapters;
  const spec = (name: string) => adapters.find((a) => a.name === name)!;
  const prompt = planBase(spec("tiny").base, { adapter: spec("tiny") });
  assert.is(prompt.maxLoraRank, 4, "the adapter's largest rank by default");
  assert.equal(prompt.routers.map((r) => r.layer), [0, 1]);
  const [first] = prompt.routers;
  // The self-attention pooler scores every row with w_sa; the pool reads the raw hidden states and the
  // gate applies the activation to the pooled vector.
  assert.match(first!.score!, /^router_score\(hidden=64\)$/);
  assert.match(first!.pool!, /^router_pool\(hidden=64,pooling=attention\)$/);
  assert.match(first!.gate, /^router_gate\(hidden=64,columns=0-1-2-3-4-5-6,width=7,selection=top_k2,activation=none\)$/);
  const sources = kernelSources(prompt);
  for (const r of prompt.routers) for (const key of [r.score!, r.pool!, r.gate]) assert.ok(sources.has(key), key);

  // Per-token routing gates every row: no pool, and the gate applies the activation itself.
  const token = planBase(spec("tiny_token").base, { adapter: spec("tiny_token") });
  assert.ok(token.routers.every((r) => r.pool === undefined && r.score === undefined));
  assert.ok(token.kernels.every((k) => k.family !== "router_pool"));
  assert.equal(planBase(spec("tiny_lora").base, { adapter: spec("tiny_lora") }).routers, []);
  assert.throws(() => planBase(gqa, { adapter: spec("tiny") }), /adapter tiny is on base llama_tiny, not /);
});

test("a weight beyond the plan's binding size gets kernels for each row-block height, written in place", () => {
  assert.ok(planBase(gqa).head.every((op) => op.op !== "linear" || op.blocks === undefined), "512 x 64 fits 128 MiB");
  // lm_head [512, 64] is 256 bytes a row: 100 rows a block, so five blocks of 100 and one of 12.
  const plan = planBase(gqa, { maxBindingBytes: 100 * 256 });
  assert.is(plan.maxBindingBytes, 25_600);
  const head = plan.head.find((op): op is Extract<PlanOp, { op: "linear" }> => op.op === "linear")!;
  assert.equal(head.blocks!.map((b) => b.rows), [100, 12]);
  assert.equal(head.blocks!.map((b) => b.matvec), ["matvec(K=64,N=100,residual=false,stride=512)", "matvec(K=64,N=12,residual=false,stride=512)"]);
  const sources = kernelSources(plan);
  for (const b of head.blocks!) for (const key of [b.matmul, b.matvec]) assert.ok(sources.has(key), key);
  // Layer weights split too, residual ones included: down_proj [64, 176] is 704 bytes a row, 36 rows a block.
  const down = plan.layer.find((op): op is Extract<PlanOp, { op: "linear" }> => op.op === "linear" && op.module === "down_proj")!;
  assert.equal(down.blocks!.map((b) => b.matmul), ["matmul(K=176,N=36,residual=true,stride=64)", "matmul(K=176,N=28,residual=true,stride=64)"]);
  for (const b of down.blocks!) for (const key of [b.matmul, b.matvec]) assert.ok(sources.has(key), key);
  assert.ok(plan.tensors.every((t) => t.splittable === (t.shape.length === 2)), "the embedding and every linear weight may split, norms never");
  assert.throws(() => planBase(gqa, { maxBindingBytes: 0 }), /at least 4/);
});

test.run();
