// The device self-test: milora's own kernels (matvec, RMSNorm, attention, sampling with top-k and
// top-p, MiLoRA's router with the self-attention pooler) run once on small random inputs and are
// compared with float64 references written here from the math. A driver that miscompiles one of them (Mesa 22.3 did, docs/drivers.md) is caught before it serves
// wrong tokens. `milora doctor` prints the result; `run` and `serve` refuse a device that fails it.
import { attentionKernel } from "../../compiler/kernels/attention.ts";
import type { KernelSource } from "../../compiler/kernels/kernel.ts";
import { matvecKernel } from "../../compiler/kernels/matvec.ts";
import { rmsNormKernel } from "../../compiler/kernels/rmsnorm.ts";
import { routerGateKernel, routerPoolKernel, routerScoreKernel } from "../../compiler/kernels/router.ts";
import { sampleCpu } from "./sampling-reference.ts";
import { packSamplingSettings, samplingKernel, type SamplingSettings } from "../../compiler/kernels/sampling.ts";
import { mulberry32 } from "../../runtime/random.ts";
import type { GpuContext } from "../../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage, readBuffer } from "../../runtime/gpu/kernel-runner.ts";
import { MiloraError } from "../../runtime/errors.ts";

export interface KernelCheck {
  readonly kernel: string;
  readonly ok: boolean;
  /** What was compared: a relative error, or mismatching tokens. */
  readonly detail: string;
}

export interface SelfTestReport {
  readonly ok: boolean;
  readonly checks: readonly KernelCheck[];
  readonly ms: number;
}

/** f32 kernels against float64 references: a few ulps per reduction step, far below this bound. */
const BOUND = 1e-5;

function floats(next: () => number, n: number, scale = 1): Float32Array {
  return Float32Array.from({ length: n }, () => (next() * 2 - 1) * scale);
}

function relativeError(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < want.length; i++) {
    const d = got[i]! - want[i]!;
    if (!Number.isFinite(d)) return Infinity;
    diff += d * d;
    norm += want[i]! * want[i]!;
  }
  return Math.sqrt(diff / norm);
}

class Runner {
  readonly #device: GPUDevice;
  readonly #step: StepEncoder;
  constructor(device: GPUDevice) {
    this.#device = device;
    this.#step = new StepEncoder(device, new PipelineCache(device));
  }
  /** Runs `kernel` once over fresh buffers and returns the contents of `output`. */
  run(kernel: KernelSource, data: Record<string, Float32Array | Uint32Array>, params: Record<string, number>, output: string) {
    return this.runSteps([[kernel, Object.keys(data), params]], data, output);
  }

  /**
   * Runs each kernel in order, each bound to the named ones of the same fresh buffers (`binding=buffer`
   * where the kernel's name for it differs); returns `output`.
   */
  async runSteps(steps: readonly (readonly [KernelSource, readonly string[], Record<string, number>])[], data: Record<string, Float32Array | Uint32Array>, output: string) {
    const buffers = Object.fromEntries(Object.entries(data).map(([name, d]) => [name, createStorage(this.#device, d, name)]));
    try {
      for (const [kernel, names, params] of steps) {
        const bound = names.map((n) => n.split("=") as [string, string?]).map(([binding, buffer]) => [binding, buffers[buffer ?? binding]!]);
        this.#step.dispatch(kernel, Object.fromEntries(bound), params);
      }
      this.#step.submit();
      return await readBuffer(this.#device, buffers[output]!, 0, data[output]!.byteLength);
    } finally {
      for (const b of Object.values(buffers)) b.destroy();
    }
  }
}

function errorCheck(kernel: string, error: number): KernelCheck {
  return { kernel, ok: error < BOUND, detail: `relative error ${error.toExponential(2)} (bound ${BOUND})` };
}

async function checkMatvec(gpu: Runner, next: () => number): Promise<KernelCheck> {
  const [rows, K, N] = [3, 70, 45]; // K not a multiple of 4, N not of the 32-column tile
  const x = floats(next, rows * K);
  const w = floats(next, N * K);
  const got = await gpu.run(matvecKernel({ K, N, residual: false }), { x, w, y: new Float32Array(rows * N).fill(NaN) }, { rows }, "y");
  const want = new Float64Array(rows * N);
  for (let r = 0; r < rows; r++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[r * K + k]! * w[n * K + k]!;
      want[r * N + n] = s;
    }
  return errorCheck("matvec", relativeError(got, want));
}

async function checkRmsNorm(gpu: Runner, next: () => number): Promise<KernelCheck> {
  const [rows, hidden, eps] = [3, 300, 1e-5];
  const x = floats(next, rows * hidden, 2);
  const weight = floats(next, hidden);
  const got = await gpu.run(rmsNormKernel({ hidden, eps }), { x, weight, out: new Float32Array(rows * hidden).fill(NaN) }, { rows }, "out");
  const want = new Float64Array(rows * hidden);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < hidden; i++) ss += x[r * hidden + i]! ** 2;
    const scale = 1 / Math.sqrt(ss / hidden + eps);
    for (let i = 0; i < hidden; i++) want[r * hidden + i] = x[r * hidden + i]! * scale * weight[i]!;
  }
  return errorCheck("rmsnorm", relativeError(got, want));
}

async function checkAttention(gpu: Runner, next: () => number): Promise<KernelCheck> {
  // Two decode rows over 70 and 5 cached positions (past one 64-key block), 4 query heads over 2 KV heads.
  const [heads, kvHeads, headDim, maxPositions] = [4, 2, 16, 72];
  const width = kvHeads * headDim;
  const rowSlot = Uint32Array.from([1, 0]);
  const positions = Uint32Array.from([69, 4]);
  const kCache = floats(next, 2 * maxPositions * width);
  const vCache = floats(next, 2 * maxPositions * width);
  const q = floats(next, 2 * heads * headDim);
  const kernel = attentionKernel({ heads, kvHeads, headDim, maxPositions });
  const got = await gpu.run(kernel, { q, kCache, vCache, rowSlot, positions, out: new Float32Array(q.length).fill(NaN) }, { rows: 2 }, "out");
  const want = new Float64Array(q.length);
  for (let r = 0; r < 2; r++)
    for (let h = 0; h < heads; h++) {
      const keyAt = (p: number) => (rowSlot[r]! * maxPositions + p) * width + Math.floor(h / (heads / kvHeads)) * headDim;
      const scores = Array.from({ length: positions[r]! + 1 }, (_, p) => {
        let s = 0;
        for (let d = 0; d < headDim; d++) s += q[(r * heads + h) * headDim + d]! * kCache[keyAt(p) + d]!;
        return s / Math.sqrt(headDim);
      });
      const top = Math.max(...scores);
      const weights = scores.map((s) => Math.exp(s - top));
      const total = weights.reduce((a, b) => a + b, 0);
      for (let d = 0; d < headDim; d++)
        want[(r * heads + h) * headDim + d] = weights.reduce((sum, wt, p) => sum + wt * vCache[keyAt(p) + d]!, 0) / total;
    }
  return errorCheck("attention", relativeError(got, want));
}

async function checkSampling(gpu: Runner, next: () => number): Promise<KernelCheck> {
  // Greedy, top-k, top-p and both together: the top-p rows are the ones Mesa 22.3 got wrong.
  const vocab = 777;
  const kinds: Omit<SamplingSettings, "step">[] = [
    { temperature: 0, topK: 0, topP: 1, seed: 0 },
    { temperature: 0.7, topK: 5, topP: 1, seed: 2 },
    { temperature: 1.3, topK: 0, topP: 0.9, seed: 3 },
    { temperature: 1, topK: 40, topP: 0.6, seed: 4 },
  ];
  const settings = Array.from({ length: 8 }, (_, i) => ({ ...kinds[i % kinds.length]!, step: i }));
  const logits = floats(next, settings.length * vocab, 3);
  const tokens = new Uint32Array(settings.length).fill(0xffffffff);
  const got = new Uint32Array(
    (await gpu.run(samplingKernel({ vocab }), { logits, settings: packSamplingSettings(settings), tokens }, { rows: settings.length }, "tokens")).buffer,
  );
  const want = sampleCpu(logits, vocab, settings);
  const wrong = settings.map((_, i) => i).filter((i) => got[i] !== want[i]);
  return {
    kernel: "sampling",
    ok: wrong.length === 0,
    detail: wrong.length === 0
      ? `${settings.length} rows (greedy, top-k, top-p) pick the reference's tokens`
      : `rows ${wrong.map((i) => `${i} (T ${settings[i]!.temperature}, top-k ${settings[i]!.topK}, top-p ${settings[i]!.topP}): got ${got[i]}, want ${want[i]}`).join("; ")}`,
  };
}

async function checkRouter(gpu: Runner, next: () => number): Promise<KernelCheck> {
  // MiLoRA's prompt routing as the paper defines it: the self-attention pooler (eq. 8) over two prompts,
  // then TopK(softmax(p W^T)) with the kept experts' probabilities as gates (eq. 3), top 2 of 7.
  const [hidden, rows, experts] = [96, 9, 7];
  const ranges = [[0, 4], [4, 9]] as const;
  const h = floats(next, rows * hidden, 2);
  const pooler = floats(next, hidden, 0.5);
  const weight = floats(next, experts * hidden, 0.5);
  const steps = [
    [routerScoreKernel({ hidden }), ["h", "pooler", "scores"], { rows }],
    [routerPoolKernel({ hidden, pooling: "attention" }), ["h", "ranges", "pooled", "scores"], { count: 2 }],
    [
      routerGateKernel({ hidden, columns: [0, 1, 2, 3, 4, 5, 6], width: experts, selection: { rule: "top_k", k: 2, renormalize: false }, activation: "none" }),
      ["x=pooled", "items", "weight", "table"],
      { count: 2, stride: experts, base: 0 },
    ],
  ] as const;
  const data = {
    h,
    pooler,
    scores: new Float32Array(rows),
    ranges: Uint32Array.from(ranges.flat()),
    pooled: new Float32Array(2 * hidden).fill(NaN),
    items: Uint32Array.from(ranges.flatMap(([start, end], i) => [i, start, end])),
    weight,
    table: new Float32Array(rows * experts).fill(NaN),
  };
  const got = await gpu.runSteps(steps, data, "table");
  const want = new Float64Array(rows * experts);
  for (const [start, end] of ranges) {
    const u = Array.from({ length: end - start }, (_, t) => h.subarray((start + t) * hidden, (start + t + 1) * hidden).reduce((acc, x, i) => acc + x * pooler[i]!, 0));
    const top = Math.max(...u);
    const a = u.map((x) => Math.exp(x - top));
    const total = a.reduce((x, y) => x + y, 0);
    const p = Array.from({ length: hidden }, (_, i) => a.reduce((acc, w, t) => acc + (w / total) * h[(start + t) * hidden + i]!, 0));
    const z = Array.from({ length: experts }, (_, e) => p.reduce((acc, x, i) => acc + x * weight[e * hidden + i]!, 0));
    const zt = Math.max(...z);
    const ez = z.map((x) => Math.exp(x - zt));
    const zs = ez.reduce((x, y) => x + y, 0);
    const order = z.map((_, e) => e).sort((x, y) => z[y]! - z[x]! || x - y);
    for (let r = start; r < end; r++) for (const e of order.slice(0, 2)) want[r * experts + e] = ez[e]! / zs;
  }
  return errorCheck("router", relativeError(got, want));
}

/** Runs every kernel check on the device; never throws for a wrong result, only for a device error. */
export async function runSelfTest(ctx: GpuContext): Promise<SelfTestReport> {
  const started = performance.now();
  const gpu = new Runner(ctx.device);
  const next = mulberry32(20261201);
  const checks: KernelCheck[] = [];
  for (const check of [checkMatvec, checkRmsNorm, checkAttention, checkSampling, checkRouter]) {
    ctx.device.pushErrorScope("validation");
    let result: KernelCheck;
    try {
      result = await check(gpu, next);
    } catch (err) {
      result = { kernel: check.name.replace(/^check/, "").toLowerCase(), ok: false, detail: `failed to run: ${(err as Error).message}` };
    }
    const error = await ctx.device.popErrorScope();
    checks.push(error ? { ...result, ok: false, detail: `WebGPU validation error: ${error.message}` } : result);
  }
  return { ok: checks.every((c) => c.ok), checks, ms: performance.now() - started };
}

/** A device whose self-test failed, refused by `run` and `serve`. */
export class DeviceSelfTestError extends MiloraError {
  override name = "DeviceSelfTestError";
  readonly kind = "device";
}

const verdicts = new WeakMap<GPUDevice, Promise<SelfTestReport>>();

/**
 * Refuses a device whose self-test fails, naming the kernels and the command that shows why.
 * The test runs once per device; MILORA_IGNORE_SELF_TEST=1 turns the refusal into a warning.
 */
export async function requireHealthyDevice(ctx: GpuContext): Promise<void> {
  let verdict = verdicts.get(ctx.device);
  if (!verdict) verdicts.set(ctx.device, (verdict = runSelfTest(ctx)));
  judgeSelfTest(await verdict, ctx.report.description);
}

/** Throws DeviceSelfTestError for a failed report (or warns on stderr under MILORA_IGNORE_SELF_TEST=1). */
export function judgeSelfTest(report: SelfTestReport, device: string, env: NodeJS.ProcessEnv = process.env): void {
  if (report.ok) return;
  const failed = report.checks.filter((c) => !c.ok).map((c) => `${c.kernel}: ${c.detail}`);
  const message =
    `this device computes milora's kernels wrongly (${device}):\n  ${failed.join("\n  ")}\n` +
    "run `milora doctor` for the full report (docs/drivers.md lists known driver problems)";
  if (env.MILORA_IGNORE_SELF_TEST === "1") process.stderr.write(`milora: WARNING: ${message}; continuing because MILORA_IGNORE_SELF_TEST=1\n`);
  else throw new DeviceSelfTestError(`${message}; set MILORA_IGNORE_SELF_TEST=1 to run anyway`);
}
