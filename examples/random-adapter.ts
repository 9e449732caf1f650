// Writes adapters with seeded random weights, for tests, the README demo and benchmarks: MiLoRA
// adapters for a checked spec (per_module and per_ffn baselines included), and plain PEFT LoRA adapters. Run it to make an adapter of a spec:
//   node --import tsx examples/random-adapter.ts examples/llama-tiny.milora ADAPTER adapters/a --seed 7
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";
import { FFN_MODULES, storedRank, type Adapter, type BaseModel, type ExpertModule } from "../compiler/model.ts";
import { rationalInit } from "../compiler/rational.ts";
import { loraSlot } from "../runtime/formats/adapter-config.ts";
import {
  layerExperts,
  loraKey,
  moeRouterKey,
  writeAdapter,
  type LoadedAdapter,
  type LoraKey,
  type LoraWeights,
  type MoeRouterKey,
  type RouterWeights,
} from "../runtime/formats/adapter.ts";
import { loraRowNorms } from "../runtime/engine/dora.ts";
import { seededNormal } from "./random-checkpoint.ts";

export interface RandomAdapterOptions {
  readonly spec: Adapter;
  readonly seed: number;
  /** Size of the LoRA update relative to the base module's output; 0.5 unless given. */
  readonly scale?: number;
  /**
   * Spread of the router logits for an input of unit-size entries: router weights are drawn with standard
   * deviation routerScale / sqrt(in), so logits are about routerScale apart; 4 unless given.
   */
  readonly routerScale?: number;
  /** The name the adapter is addressed by; the spec's name unless given. */
  readonly name?: string;
  /** A base weight [out, in] as f32: needed for DoRA experts, whose magnitudes are drawn near its row norms. */
  readonly baseWeight?: (layer: number, module: ExpertModule) => Float32Array;
}

/**
 * An adapter with random weights for `spec`. B is not zero, so the LoRA changes the logits; router
 * weights are large enough that different prompts (or, per token, different tokens) pick different
 * experts. A per_module or per_ffn spec (spec.moe) gets LoRA of storedRank() rows (a per_ffn MLP module
 * its experts stacked) and a router [num_experts, in] per module or per layer. The same options give the
 * same weights.
 */
export function randomAdapter(o: RandomAdapterOptions): LoadedAdapter {
  const { spec } = o;
  const scale = o.scale ?? 0.5;
  const routerScale = o.routerScale ?? 4;
  const normal = seededNormal(o.seed);
  const gaussian = (length: number, std: number) => Float32Array.from({ length }, () => std * normal());
  const lora = new Map<LoraKey, LoraWeights>();
  for (const e of spec.experts) {
    // A x has entries of the size of x; B is scaled so that scaling * B A x is `scale` times W x (for a
    // per_ffn expert: each expert's own rank-r update, of which the router mixes k with gates summing to 1).
    const rank = storedRank(spec, e);
    const a = gaussian(rank * e.inFeatures, 1 / Math.sqrt(e.inFeatures));
    const b = gaussian(e.outFeatures * rank, scale / (e.scaling * Math.sqrt(e.rank)));
    const weights: LoraWeights = { a, b, rank, scaling: e.scaling };
    if (!e.dora) {
      lora.set(loraKey(e.layer, e.module), weights);
      continue;
    }
    if (spec.moe) throw new Error(`random adapter ${spec.name}: layer ${e.layer} ${e.module} is DoRA under a ${spec.moe.placement} router, which has no DoRA (MIL217)`);
    if (!o.baseWeight) throw new Error(`random adapter ${spec.name}: layer ${e.layer} ${e.module} is DoRA, whose magnitudes need the base weights (option baseWeight)`);
    // PEFT starts m at ||W + s B A||_row (factor 1); training moves it: here by about 10% per row.
    const norms = loraRowNorms(o.baseWeight(e.layer, e.module), weights);
    lora.set(loraKey(e.layer, e.module), { ...weights, magnitude: Float32Array.from(norms, (n) => n * (1 + 0.1 * normal())) });
  }
  const name = o.name ?? spec.name;
  if (spec.moe) {
    // Logits a few units apart, so each token's choice follows the token rather than being near a tie.
    const moeRouters = new Map<MoeRouterKey, Float32Array>();
    const experts = spec.moe.experts;
    if (spec.moe.placement === "per_module") {
      for (const e of spec.experts) moeRouters.set(moeRouterKey(e.layer, e.module), gaussian(experts * e.inFeatures, routerScale / Math.sqrt(e.inFeatures)));
    } else {
      const hidden = spec.base.hiddenSize;
      for (const layer of spec.layers) {
        if (!spec.experts.some((e) => e.layer === layer && FFN_MODULES.includes(e.module))) continue;
        moeRouters.set(moeRouterKey(layer, "ffn"), gaussian(experts * hidden, routerScale / Math.sqrt(hidden)));
      }
    }
    return { name, spec, lora, moeRouters };
  }
  if (!spec.router) return { name, spec, lora };
  const hidden = spec.base.hiddenSize;
  const router = new Map<number, RouterWeights>();
  for (const layer of spec.layers) {
    const experts = layerExperts(spec, layer);
    // Gate logits a few units apart, so the choice follows the prompt rather than being near a tie.
    const gate = gaussian(experts.length * hidden, routerScale / Math.sqrt(hidden));
    const noise = gaussian(experts.length * hidden, 1 / Math.sqrt(hidden));
    // w_sa: attention scores a few units apart across the prompt, so the weights are far from uniform.
    const pooler = spec.router.pooling === "attention" ? gaussian(hidden, 2 / Math.sqrt(hidden)) : undefined;
    // The GELU-fit initialisation with every coefficient moved by up to about 20%, so that a run that
    // ignored the adapter's coefficients (using the initialisation) would be caught.
    const init = spec.router.activation === "rational" ? rationalInit(spec.router.rational!) : undefined;
    const perturb = (c: readonly number[]) => Float32Array.from(c, (x) => x * (1 + 0.1 * normal()));
    const rational = init && { numerator: perturb(init.numerator), denominator: perturb(init.denominator) };
    router.set(layer, { gate, experts, ...(spec.router.noise ? { noise } : {}), ...(pooler ? { pooler } : {}), ...(rational ? { rational } : {}) });
  }
  return { name, spec, lora, router };
}

/** Writes randomAdapter(o) to `dir` (see writeAdapter) and returns it. */
export function writeRandomAdapter(dir: string, o: RandomAdapterOptions): LoadedAdapter {
  const adapter = randomAdapter(o);
  writeAdapter(dir, adapter);
  return adapter;
}

export interface RandomPeftOptions {
  readonly base: BaseModel;
  readonly modules: readonly ExpertModule[];
  readonly rank: number;
  readonly alpha: number;
  /** Every layer unless given. */
  readonly layers?: readonly number[];
  readonly rslora?: boolean;
  /** DoRA on every module (writing one needs RandomAdapterOptions.baseWeight). */
  readonly dora?: boolean;
  readonly seed: number;
  readonly name?: string;
}

/** The spec of a plain LoRA adapter: `modules` in every one of `layers`, one rank and alpha, no router. */
export function peftSpec(o: RandomPeftOptions): Adapter {
  const layers = [...(o.layers ?? Array.from({ length: o.base.layers }, (_, i) => i))].sort((a, b) => a - b);
  const options = { rank: o.rank, alpha: o.alpha, dropout: 0, rslora: o.rslora ?? false, ...(o.dora ? { dora: true as const } : {}) };
  const at = { offset: 0, line: 1, column: 1 };
  return {
    name: o.name ?? "peft",
    base: o.base,
    layers,
    experts: layers.flatMap((layer) => o.modules.map((m) => loraSlot(o.base, layer, m, options))),
    span: { file: "<random>", start: at, end: at },
  };
}

/** Writes a plain PEFT LoRA adapter with random weights (no `milora` section, no router) and returns it. */
export function writeRandomPeftAdapter(dir: string, o: RandomPeftOptions): LoadedAdapter {
  return writeRandomAdapter(dir, { spec: peftSpec(o), seed: o.seed });
}

async function main(argv: string[]): Promise<number> {
  const usage = "usage: random-adapter.ts SPEC.milora ADAPTER OUT_DIR [--seed N] [--scale X]";
  let parsed;
  try {
    parsed = parseArgs({ args: argv, allowPositionals: true, options: { seed: { type: "string", default: "1" }, scale: { type: "string" } } });
  } catch (e) {
    console.error(`${(e as Error).message}\n${usage}`);
    return 2;
  }
  const [specPath, adapterName, dir] = parsed.positionals;
  const seed = Number(parsed.values.seed);
  const scale = parsed.values.scale === undefined ? undefined : Number(parsed.values.scale);
  if (parsed.positionals.length !== 3 || !specPath || !adapterName || !dir || !Number.isInteger(seed) || (scale !== undefined && !(scale >= 0))) {
    console.error(usage);
    return 2;
  }
  // Loaded here so that importing this module for its generators does not pull in the checker.
  const { checkFiles } = await import("../compiler/check.ts");
  const { renderDiagnostic } = await import("../grammar/code-frame.ts");
  const { program, diagnostics, sources } = checkFiles([specPath]);
  for (const d of diagnostics) console.error(renderDiagnostic(d, sources.get(d.span.file)));
  const spec = program.adapters.find((a) => a.name === adapterName);
  if (!spec) {
    const known = program.adapters.map((a) => a.name).join(", ") || "none";
    console.error(`${specPath}: no adapter ${adapterName} that checks without errors (adapters: ${known})`);
    return 1;
  }
  try {
    writeRandomAdapter(dir, { spec, seed, ...(scale !== undefined ? { scale } : {}) });
  } catch (e) {
    console.error((e as Error).message);
    return 1;
  }
  console.log(`${dir}: random adapter ${adapterName} (seed ${seed})`);
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  void main(process.argv.slice(2)).then((code) => (process.exitCode = code));
}
