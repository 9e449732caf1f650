// The compiled package's README.md: what the adapter is (modules, ranks, router, budget), the spec it
// came from, and how to run it from the command line and from TypeScript.
import type { Adapter, MoeRouting, RouterConfig } from "../model.ts";

export interface ReadmeInput {
  readonly adapter: Adapter;
  readonly packageName: string;
  readonly className: string;
  readonly specFile: string;
  readonly budgetTable: string;
  readonly specLines: readonly string[];
  readonly kernelCount: number;
}

export function renderReadme(r: ReadmeInput): string {
  const { adapter } = r;
  const base = adapter.base;
  const bin = r.packageName.replace(/^@[^/]+\//, "");
  return [
    `# ${r.packageName}`,
    "",
    `Compiled by \`milora compile\` from \`${r.specFile}\`: adapter \`${adapter.name}\` on base \`${base.name}\` ` +
      `(${base.family}, ${base.layers} layers, hidden size ${base.hiddenSize}, vocabulary ${base.vocabSize}).`,
    "",
    "## Run it",
    "",
    "```sh",
    `npx ${bin} --base path/to/checkpoint --prompt "Hello"`,
    `npx ${bin} --base path/to/checkpoint --adapter alice=path/to/adapter --tenant alice --prompt "Hello"`,
    "```",
    "",
    "```ts",
    `import { ${r.className} } from "${r.packageName}";`,
    "",
    `const model = await ${r.className}.load({ base: "path/to/checkpoint", adapters: { alice: "path/to/adapter" } });`,
    `for await (const token of model.generate("Hello", { maxTokens: 32 })) process.stdout.write(token.text ?? "");`,
    `const routing = await model.route("Hello", { tenant: "alice" }); // gates per layer and module`,
    "model.destroy();",
    "```",
    "",
    "The checkpoint is a Hugging Face directory (`config.json`, safetensors weights, optionally `tokenizer.json`);",
    "an adapter is a PEFT directory (`adapter_config.json`, `adapter_model.safetensors`) with MiLoRA's router tensors.",
    "",
    "## Router",
    "",
    ...(adapter.moe ? moeLines(adapter.moe) : routerLines(adapter.router)),
    "",
    "## Budget",
    "",
    "```text",
    r.budgetTable,
    "```",
    "",
    "## Spec",
    "",
    "```milora",
    ...r.specLines,
    "```",
    "",
    "## Contents",
    "",
    "- `manifest.json`: the plan (dimensions, tensor table, op sequence), router, budget, spec hash, compiler version",
    `- \`kernels/\`: the ${r.kernelCount} WGSL kernels the runtime loads, each headed by the spec lines it came from`,
    "- `index.js`, `index.d.ts` (from `src/index.ts`): the typed API; `cli.js`: the command line",
    "",
  ].join("\n");
}

function moeLines(moe: MoeRouting): string[] {
  const s = moe.selection;
  const what =
    moe.placement === "per_module"
      ? `a router in every adapted module, over ${moe.experts} experts that split its LoRA's rank (MOELoRA/MoLoRA)`
      : `a router per layer over ${moe.experts} feed-forward experts, each a full LoRA of the MLP modules (MixLoRA); attention modules are plain LoRA`;
  return [
    `Per-token Mixture-of-LoRA baseline: ${what}, routed again at every token.`,
    "",
    `| setting | value |`,
    `|---|---|`,
    `| placement | ${moe.placement} |`,
    `| num_experts | ${moe.experts} |`,
    `| select | ${s.rule === "dense" ? "dense" : `top ${s.k}${s.renormalize ? ", gates renormalised to sum to 1" : ", gates = softmax probabilities over all experts"}`} |`,
    `| balance (training) | ${moe.balance} |`,
  ];
}

function routerLines(router: RouterConfig | undefined): string[] {
  if (router === undefined) return ["None: plain LoRA, every enabled module always on with gate 1."];
  const s = router.selection;
  const gates = s.rule === "dense" ? "" : s.renormalize ? ", gates renormalised to sum to 1" : ", gates = softmax probabilities over all experts (paper eq. 3)";
  const select = (s.rule === "top_k" ? `top ${s.k}` : s.rule === "threshold" ? `threshold ${s.threshold}` : "dense") + gates;
  const activation = router.activation === "rational" ? `rational (numerator ${router.rational?.numerator}, denominator ${router.rational?.denominator}), on the pooled vector` : `${router.activation}, on the pooled vector`;
  return [
    `| setting | value |`,
    `|---|---|`,
    `| placement | ${router.placement} |`,
    `| input | ${router.input} |`,
    `| pooling | ${router.pooling} |`,
    `| select | ${select} |`,
    `| activation | ${activation} |`,
    `| when | ${router.when === "prompt" ? "prompt (routed once, reused for every generated token)" : "token (routed again at every token)"} |`,
    `| noise (training) | ${router.noise} |`,
    `| balance (training) | ${router.balance} |`,
  ];
}
