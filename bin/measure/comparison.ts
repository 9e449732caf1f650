// The comparison `milora bench` runs: one base model decoding alone, with a merged LoRA, with unmerged
// LoRA, MiLoRA (routed once per prompt), the per-token router baseline, the per-token Mixture-of-LoRA
// baselines (MOELoRA-style per_module, MixLoRA-style per_ffn) and DoRA, at each weight storage format,
// number of concurrent tenants and beam width asked for, all in one run, so that the ratios between
// them hold whatever the machine's load. Adapters have the spec's shape (rank, modules, router) and
// random weights: speed does not depend on the values.
import { MOE_DEFAULTS, ROUTER_DEFAULTS } from "../../compiler/defaults.ts";
import { EXPERT_MODULES, FFN_MODULES, storedRank, type Adapter, type BaseModel, type ExpertModule, type ExpertSlot, type MoePlacement, type RouterConfig } from "../../compiler/model.ts";
import { peftSpec, randomAdapter } from "../../examples/random-adapter.ts";
import { Engine } from "../../runtime/engine/engine.ts";
import type { GenerateRequest } from "../../runtime/engine/requests.ts";
import { userError } from "../../runtime/errors.ts";
import type { LoadedAdapter } from "../../runtime/formats/adapter.ts";
import { openCheckpoint } from "../../runtime/formats/checkpoint.ts";
import type { GpuContext } from "../../runtime/gpu/device.ts";
import type { MemoryMeter } from "../../runtime/gpu/memory-meter.ts";
import type { WeightFormat } from "../../runtime/package/format.ts";
import { plannedEngine } from "../engine-plan.ts";
import type { Calibration } from "./calibration.ts";
import { benchPrompt, bestOf, measureBatch, type GenerationFigures } from "./generation.ts";

/** One way of running the model: without an adapter (`spec` absent), with tenants of `spec`, or `spec` merged. */
export interface BenchMode {
  readonly name: string;
  readonly label: string;
  /** A spec with `moe` (a per-token baseline) runs on an engine planned for it (its kernels differ). */
  readonly spec?: Adapter;
  /** Fold the first tenant's LoRA into the weights, then decode the base kernels (every sequence shares it). */
  readonly merged?: boolean;
}

export const MODE_NAMES = ["base", "merged", "lora", "milora", "token", "moelora", "mixlora", "dora"] as const;
export type ModeName = (typeof MODE_NAMES)[number];

/** The adapter shape used without a spec: rank 8 on all seven modules of every layer, the default router. */
export function defaultBenchAdapter(base: BaseModel): Adapter {
  return { ...peftSpec({ base, modules: EXPERT_MODULES, rank: 8, alpha: 16, seed: 0, name: "bench" }), router: { ...ROUTER_DEFAULTS, noise: false } };
}

/**
 * The per-token baselines' rank rule, per module of rank r: R = r rounded up to a multiple of E = 8
 * (MOE_DEFAULTS' num_experts). MOELoRA-style (per_module, top 4 of 8, renormalised): rank R split into 8
 * experts of rank R / 8, so its LoRA parameters are rank-R LoRA's (r's when r is a multiple of 8). MixLoRA-
 * style (per_ffn, top 2 of 8, renormalised): the attention modules keep rank r; each MLP module holds 8
 * experts of rank R / 8, whose stack stores what one rank-R module does (examples/llama2-7b.milora's
 * llama2_mixlora: rank 32, 8 experts of rank 4). alpha scales with the rank, so alpha / rank (each
 * module's scaling) stays the spec's.
 */
export function moeRank(rank: number): number {
  return Math.ceil(rank / MOE_DEFAULTS.per_module.experts) * MOE_DEFAULTS.per_module.experts;
}

/**
 * The modes of MODE_NAMES for an adapter's shape: its experts as plain LoRA (merged and not), with its
 * router (ROUTER_DEFAULTS when it has none) once per prompt and per token, as the two per-token
 * Mixture-of-LoRA baselines (moeRank's rule; a spec that is one of them runs as itself in its mode) and
 * as DoRA. A spec whose MLP has no LoRA has no MixLoRA-style mode (a usage error when asked for).
 */
/** What `milora bench` runs without --modes: every mode, the MixLoRA-style one only where the adapter has MLP LoRA for its experts. */
export function defaultModeNames(adapter: Adapter): ModeName[] {
  return MODE_NAMES.filter((m) => m !== "mixlora" || adapter.experts.some((e) => FFN_MODULES.includes(e.module)));
}

export function standardModes(adapter: Adapter, names: readonly ModeName[] = MODE_NAMES): BenchMode[] {
  const { router, moe, ...shape } = adapter;
  // The LoRA modes are plain LoRA even when the spec's adapter is DoRA or a per-token baseline (a per_ffn
  // MLP module as the one LoRA of its stacked rank: the same parameters).
  const lora: Adapter = { ...shape, experts: shape.experts.map(({ dora: _dora, ...e }) => (storedRank(adapter, e) === e.rank ? e : resized(e, storedRank(adapter, e)))) };
  const routed = (when: RouterConfig["when"]): Adapter => ({ ...lora, router: { ...(router ?? { ...ROUTER_DEFAULTS, noise: false }), when } });
  const perToken = (placement: MoePlacement): Adapter => {
    if (moe?.placement === placement) return { ...shape, moe };
    const experts = lora.experts.map((e) => (placement === "per_module" ? resized(e, moeRank(e.rank)) : FFN_MODULES.includes(e.module) ? resized(e, moeRank(e.rank) / MOE_DEFAULTS.per_ffn.experts) : e));
    return { ...lora, experts, moe: MOE_DEFAULTS[placement] };
  };
  const modes: Record<ModeName, () => BenchMode> = {
    base: () => ({ name: "base", label: "base alone" }),
    merged: () => ({ name: "merged", label: "merged LoRA", spec: lora, merged: true }),
    lora: () => ({ name: "lora", label: "LoRA (unmerged)", spec: lora }),
    milora: () => ({ name: "milora", label: "MiLoRA (prompt routing)", spec: routed("prompt") }),
    token: () => ({ name: "token", label: "per-token router", spec: routed("token") }),
    moelora: () => ({ name: "moelora", label: "MOELoRA-style (per_module)", spec: perToken("per_module") }),
    mixlora: () => {
      if (!lora.experts.some((e) => FFN_MODULES.includes(e.module))) {
        throw userError("usage", `--modes mixlora: adapter ${adapter.name} has no LoRA on ${FFN_MODULES.join(", ")}, where MixLoRA's experts live`);
      }
      return { name: "mixlora", label: "MixLoRA-style (per_ffn)", spec: perToken("per_ffn") };
    },
    dora: () => ({ name: "dora", label: "DoRA (unmerged)", spec: { ...lora, experts: lora.experts.map((e) => ({ ...e, dora: true as const })) } }),
  };
  return names.map((n) => modes[n]());
}

/** `e` at another rank, alpha scaled alike so that its scaling (alpha / rank, or alpha / sqrt(rank)) keeps alpha / rank's ratio. */
function resized(e: ExpertSlot, rank: number): ExpertSlot {
  const alpha = (e.alpha * rank) / e.rank;
  return { ...e, rank, alpha, scaling: e.rslora ? alpha / Math.sqrt(rank) : alpha / rank };
}

export interface ComparisonSetup {
  readonly base: BaseModel;
  readonly checkpointDir: string;
  readonly gpu: GpuContext;
  readonly modes: readonly BenchMode[];
  readonly formats: readonly WeightFormat[];
  readonly tenants: readonly number[];
  readonly beams: readonly number[];
  /** Prompt tokens per request, and decode steps after the first token. */
  readonly prompt: number;
  readonly decode: number;
  /** Rounds over every mode; each figure is its best round. */
  readonly repeats: number;
  /** The device's calibration: the plans use its matvec row limits, as `milora run` would. */
  readonly calibration?: Pick<Calibration, "formats">;
  /** Counts the engine's buffers; its peak during each row's run is reported. */
  readonly meter?: MemoryMeter;
  /** Progress, one line per engine loaded. */
  readonly log?: (line: string) => void;
  /** Runs measured so far of all (warm-ups not counted), after each. */
  readonly progress?: (done: number, total: number) => void;
}

export interface ComparisonRow extends GenerationFigures {
  readonly weights: WeightFormat;
  readonly tenants: number;
  readonly beams: number;
  readonly mode: string;
  readonly label: string;
  /** The plan's matvec row limit for this format (calibrated or MATVEC_MAX_ROWS). */
  readonly matvecMaxRows: number;
  /** The most bytes of GPU buffers the engine held while the row ran (adapter loads and merges included); NaN without a meter. */
  readonly peakBytes: number;
  /** Milliseconds to make one tenant's adapter resident (DoRA computes its factors then); NaN for the base alone. */
  readonly adapterLoadMs: number;
}

/**
 * Runs every mode at every format, tenant count and beam width; rows in that order (format outermost).
 * Each (format, tenants) group loads one engine per plan its modes need (the plain one, and one per
 * per-token baseline, whose plan has its kernels), all held at once so that the rounds interleave every
 * mode; a row's peak counts its own engine's buffers, not the others' (idle meanwhile).
 */
export async function runComparison(s: ComparisonSetup): Promise<ComparisonRow[]> {
  const adapters = new Map<string, LoadedAdapter>();
  const tenantsOf = (mode: BenchMode, count: number, plan: Engine["plan"]): LoadedAdapter[] =>
    Array.from({ length: mode.merged ? 1 : count }, (_, i) => {
      const key = `${mode.name} ${i}`;
      if (!adapters.has(key)) adapters.set(key, randomAdapter({ spec: mode.spec!, seed: 100 + i, name: `${mode.name}-${i}`, baseWeight: baseWeights(s.checkpointDir, plan) }));
      return adapters.get(key)!;
    });
  const plans = [...new Set(s.modes.map(planOf))];
  const rows: ComparisonRow[] = [];
  const total = s.formats.length * s.tenants.length * s.repeats * s.modes.length * s.beams.length;
  let done = 0;
  for (const weights of s.formats) {
    for (const tenants of s.tenants) {
      /** Per plan: its engine and the bytes of GPU buffers it holds between runs. */
      const engines = new Map<string, { engine: Engine; bytes: number }>();
      const best = new Map<string, { figures?: GenerationFigures; peak: number; loadMs: number }>();
      try {
        for (const plan of plans) {
          const modes = s.modes.filter((m) => planOf(m) === plan);
          const before = s.meter?.liveBytes ?? NaN;
          const moeSpec = modes.find((m) => m.spec?.moe)?.spec;
          const engine = await Engine.load(
            plannedEngine({
              base: s.base,
              checkpointDir: s.checkpointDir,
              gpu: s.gpu,
              weights,
              ...(s.calibration ? { calibration: s.calibration } : {}),
              ctx: s.prompt + s.decode + 2,
              maxSequences: tenants * Math.max(...s.beams),
              maxAdapters: tenants,
              maxLoraRank: Math.max(1, ...modes.flatMap((m) => m.spec?.experts.map((e) => storedRank(m.spec!, e)) ?? [])),
              ...(moeSpec ? { adapter: moeSpec } : {}),
            }),
          );
          const bytes = (s.meter?.liveBytes ?? NaN) - before;
          engines.set(plan, { engine, bytes });
          s.log?.(`${weights} weights, ${tenants} tenant${tenants === 1 ? "" : "s"}: engine${plan === PLAIN ? "" : ` for ${plan} routing`} loaded (${(bytes / 2 ** 20).toFixed(1)} MiB)`);
        }
        // Rounds interleave the modes, so that load from other jobs falls on all of them alike; every
        // other round runs them in reverse, so that none is always first after the slowest.
        for (let round = 0; round < s.repeats; round++) {
          for (const mode of round % 2 === 0 ? s.modes : [...s.modes].reverse()) {
            const held = engines.get(planOf(mode))!;
            const { engine } = held;
            const live = s.meter?.liveBytes ?? NaN;
            const others = live - held.bytes;
            s.meter?.resetPeak();
            const loaded = mode.spec ? tenantsOf(mode, tenants, engine.plan) : [];
            const loading = performance.now();
            for (const a of loaded) engine.loadAdapter(a.name, a);
            const loadMs = loaded.length === 0 ? NaN : (performance.now() - loading) / loaded.length;
            try {
              if (mode.merged) await engine.mergeAdapter(loaded[0]!.name);
              for (const beams of s.beams) {
                const requests: GenerateRequest[] = Array.from({ length: tenants }, (_, i) => ({
                  prompt: benchPrompt(s.prompt, i, s.base.vocabSize),
                  maxTokens: s.decode + 1,
                  stop: [],
                  ...(mode.spec && !mode.merged ? { adapter: loaded[i]!.name } : {}),
                  ...(beams > 1 ? { beam: { beams } } : {}),
                }));
                // the first dispatch of a kernel compiles it on GL drivers
                if (round === 0) await engine.generateBatch(requests.map((r) => ({ ...r, maxTokens: 2 })));
                const figures = await measureBatch(engine, requests);
                s.progress?.(++done, total);
                const key = `${mode.name} ${beams}`;
                const b = best.get(key);
                best.set(key, { figures: bestOf(b?.figures, figures), peak: Math.max(b?.peak ?? 0, (s.meter?.peakBytes ?? NaN) - others), loadMs: Math.min(b?.loadMs ?? Infinity, loadMs) });
              }
            } finally {
              if (mode.merged) await engine.unmergeAdapter();
              for (const a of loaded) engine.unloadAdapter(a.name);
              // what the engine made on first use (readbacks) and keeps
              held.bytes += (s.meter?.liveBytes ?? NaN) - live;
            }
          }
        }
      } finally {
        for (const { engine } of engines.values()) engine.destroy();
      }
      for (const beams of s.beams) {
        for (const mode of s.modes) {
          const { figures, peak, loadMs } = best.get(`${mode.name} ${beams}`)!;
          const { engine } = engines.get(planOf(mode))!;
          rows.push({ weights, tenants, beams, mode: mode.name, label: mode.label, matvecMaxRows: engine.plan.matvecMaxRows, peakBytes: peak, adapterLoadMs: loadMs, ...figures! });
        }
      }
    }
  }
  return rows;
}

const PLAIN = "plain";

/** The plan a mode runs on: the plain one (base, LoRA, MiLoRA, DoRA), or its per-token baseline's placement and selection. */
function planOf(mode: BenchMode): string {
  const moe = mode.spec?.moe;
  if (!moe) return PLAIN;
  const sel = moe.selection;
  return `${moe.placement} (${moe.experts} experts, ${sel.rule === "top_k" ? `top_k ${sel.k}${sel.renormalize ? " renormalize" : ""}` : "dense"})`;
}

/** Ratios against the matching row: the base alone, one tenant, f32 weights (undefined where that was not run). */
export interface RowRatios {
  /** Decode time per token against the base alone (same format, tenants, beams). */
  readonly decodeVsBase?: number;
  /** Tokens/s against one tenant (same format, mode, beams). */
  readonly tokensPerSVsOneTenant?: number;
  /** Decode time per token against f32 weights (same mode, tenants, beams). */
  readonly decodeVsF32?: number;
}

export function ratiosOf(rows: readonly ComparisonRow[], row: ComparisonRow): RowRatios {
  const find = (p: (r: ComparisonRow) => boolean) => rows.find(p);
  const base = find((r) => r.mode === "base" && r.weights === row.weights && r.tenants === row.tenants && r.beams === row.beams);
  const one = find((r) => r.tenants === 1 && r.mode === row.mode && r.weights === row.weights && r.beams === row.beams);
  const f32 = find((r) => r.weights === "f32" && r.mode === row.mode && r.tenants === row.tenants && r.beams === row.beams);
  return {
    ...(base ? { decodeVsBase: row.decodeMsPerToken / base.decodeMsPerToken } : {}),
    ...(one ? { tokensPerSVsOneTenant: row.tokensPerS / one.tokensPerS } : {}),
    ...(f32 ? { decodeVsF32: row.decodeMsPerToken / f32.decodeMsPerToken } : {}),
  };
}

/** The base weights [out, in] of the checkpoint, for DoRA's magnitudes, which random adapters draw near W's row norms. */
function baseWeights(checkpointDir: string, plan: Engine["plan"]): (layer: number, module: ExpertModule) => Float32Array {
  return (layer, module) => {
    const t = plan.tensors.find((x) => x.role === "linear" && x.layer === layer && x.module === module);
    if (!t) throw new Error(`the plan has no linear weight for layer ${layer} ${module}`);
    const checkpoint = openCheckpoint(checkpointDir);
    try {
      return checkpoint.readF32(t.name, t.shape);
    } finally {
      checkpoint.close();
    }
  };
}
