// Where a step should switch from the matvec kernels to the matmul: one layer's linear products plus
// the output head, timed at several row counts both ways, with the plan's own kernels (so each weight
// storage format is measured with the kernels that read it, and a split weight as its row blocks).
// `milora bench --calibrate` stores the crossover per device (calibration.ts); bench/linear-rows.ts
// prints the table it comes from.
import type { KernelSource } from "../../compiler/kernels/kernel.ts";
import { MATVEC_GROUP_ROWS } from "../../compiler/kernels/matvec.ts";
import { layerTensor, plannedKernelSource, rowsPerBlock, type Plan, type PlanOp } from "../../compiler/plan.ts";
import { packWeights } from "../../runtime/engine/weight-storage.ts";
import type { GpuContext } from "../../runtime/gpu/device.ts";
import { PipelineCache, StepEncoder, createStorage } from "../../runtime/gpu/kernel-runner.ts";
import { storageRowWords, type WeightFormat } from "../../runtime/package/format.ts";
import type { FormatCrossover } from "./calibration.ts";
import { bestMicros, type TimingOptions } from "./kernel-timing.ts";

/** Row counts `milora bench --calibrate` measures: decode batches up to the engine's default step (256 rows). */
export const CALIBRATION_ROWS = [1, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 64, 96, 128, 192, 256] as const;

/** One weight's row block (the whole weight when it fits one binding) and its two kernels. */
interface LinearBlock {
  readonly firstRow: number;
  readonly rows: number;
  readonly matvec: KernelSource;
  readonly matmul: KernelSource;
}

/** A linear product as a step dispatches it: [N, K] weights stored as `format`, maybe over a residual. */
export interface TimedLinear {
  readonly K: number;
  readonly N: number;
  readonly format: WeightFormat;
  readonly residual: boolean;
  readonly blocks: readonly LinearBlock[];
}

/** Three ways of running the rows: the matvec over all of them, separate 8-row matvec dispatches, the matmul. */
export type LinearWay = "matvec" | "8-row dispatches" | "matmul";

/** The linears of one layer of `plan` and its lm_head, with the plan's kernels. */
export function planLinears(plan: Plan): TimedLinear[] {
  const kernel = (key: string) => {
    const k = plan.kernels.find((p) => p.key === key);
    if (!k) throw new Error(`plan has no kernel ${key}`);
    return plannedKernelSource(k);
  };
  return [...plan.layer, ...plan.head].flatMap((op: PlanOp): TimedLinear[] => {
    if (op.op !== "linear") return [];
    const tensor = plan.tensors.find((t) => t.name === layerTensor(op.weight, 0));
    if (!tensor) throw new Error(`plan has no tensor ${layerTensor(op.weight, 0)}`);
    const [N, K] = tensor.shape as [number, number];
    const format = tensor.gpuDtype as WeightFormat;
    const residual = op.residual !== undefined;
    if (!op.blocks) return [{ K, N, format, residual, blocks: [{ firstRow: 0, rows: N, matvec: kernel(op.matvec), matmul: kernel(op.matmul) }] }];
    // Split as the engine splits it (runtime/engine/weights.ts): full blocks, then the remainder.
    const height = rowsPerBlock(tensor.shape, plan.maxBindingBytes, format);
    const blocks: LinearBlock[] = [];
    for (let first = 0; first < N; first += height) {
      const rows = Math.min(height, N - first);
      const b = op.blocks.find((x) => x.rows === rows)!;
      blocks.push({ firstRow: first, rows, matvec: kernel(b.matvec), matmul: kernel(b.matmul) });
    }
    return [{ K, N, format, residual, blocks }];
  });
}

/** Buffers for `linears` at up to `maxRows` rows, and the time of one pass over them. */
export class LinearTimer {
  readonly #gpu: GpuContext;
  readonly #step: StepEncoder;
  readonly #linears: readonly (TimedLinear & { readonly weights: readonly GPUBuffer[] })[];
  readonly #x: GPUBuffer;
  readonly #y: GPUBuffer;
  readonly #residual: GPUBuffer;

  constructor(gpu: GpuContext, linears: readonly TimedLinear[], maxRows: number) {
    const { device } = gpu;
    this.#gpu = gpu;
    this.#step = new StepEncoder(device, new PipelineCache(device));
    const widest = Math.max(...linears.flatMap((l) => [l.K, l.N]));
    this.#x = createStorage(device, randomValues(maxRows * widest), "timed x");
    this.#y = createStorage(device, maxRows * widest * 4, "timed y");
    this.#residual = createStorage(device, randomValues(maxRows * widest), "timed residual");
    this.#linears = linears.map((l) => ({ ...l, weights: l.blocks.map((b) => createStorage(device, weightWords(l.format, b.rows, l.K), `timed w ${b.rows}x${l.K} ${l.format}`)) }));
  }

  /** Best microseconds of one pass over every linear at `rows` rows, run `way`. */
  async time(rows: number, way: LinearWay, o: TimingOptions): Promise<number> {
    return bestMicros(this.#step, this.#gpu.device, () => this.#record(rows, way), o);
  }

  #record(rows: number, way: LinearWay): void {
    for (const l of this.#linears) {
      l.blocks.forEach((b, i) => {
        const buffers = { x: this.#x, w: l.weights[i]!, y: this.#y, ...(l.residual ? { residual: this.#residual } : {}) };
        const params = (n: number) => ({ rows: n, ...(l.blocks.length > 1 ? { column: b.firstRow } : {}) });
        if (way === "matmul") this.#step.dispatch(b.matmul, buffers, params(rows));
        else if (way === "matvec") this.#step.dispatch(b.matvec, buffers, params(rows));
        // separate dispatches all start at row 0: the cost of dispatching, not the output place, is the point
        else for (let first = 0; first < rows; first += MATVEC_GROUP_ROWS) this.#step.dispatch(b.matvec, buffers, params(Math.min(MATVEC_GROUP_ROWS, rows - first)));
      });
    }
  }

  destroy(): void {
    this.#step.destroy();
    for (const b of [this.#x, this.#y, this.#residual, ...this.#linears.flatMap((l) => l.weights)]) b.destroy();
  }
}

/**
 * The largest row count for the matvec kernels from timings at ascending row counts. The matvec's time
 * grows with the rows and the matmul's hardly does (one tile of rows), so the matvec wins up to the
 * last count it wins at (a loss before that is another job's noise), and the crossover lies where the
 * difference of the two, linear between that count and the next, changes sign. Unbounded when the
 * matvec wins at the last count measured.
 */
export function crossoverOf(timings: readonly { readonly rows: number; readonly matvecUs: number; readonly matmulUs: number }[]): { matvecMaxRows: number; bounded: boolean } {
  if (timings.length === 0) throw new Error("crossoverOf: no timings");
  const won = timings.findLastIndex((t) => t.matvecUs <= t.matmulUs);
  if (won === timings.length - 1) return { matvecMaxRows: timings[won]!.rows, bounded: false };
  // A step of one row always runs the matvec (the plan's lower limit), even where the matmul wins.
  if (won < 0) return { matvecMaxRows: 1, bounded: true };
  const [a, b] = [timings[won]!, timings[won + 1]!];
  const [da, db] = [a.matvecUs - a.matmulUs, b.matvecUs - b.matmulUs];
  return { matvecMaxRows: Math.max(a.rows, Math.floor(a.rows + ((b.rows - a.rows) * -da) / (db - da))), bounded: true };
}

/** Times `plan`'s linears both ways at each of `rows` (after one warm-up pass) and draws the crossover. */
export async function measureCrossover(gpu: GpuContext, plan: Plan, rows: readonly number[], o: TimingOptions): Promise<FormatCrossover> {
  const linears = planLinears(plan);
  const timer = new LinearTimer(gpu, linears, Math.max(...rows));
  try {
    // GL drivers compile a shader on its first dispatch
    for (const way of ["matvec", "matmul"] as const) await timer.time(Math.max(...rows), way, { repeats: 1, rounds: 1 });
    const timings = [];
    for (const n of rows) timings.push({ rows: n, matvecUs: await timer.time(n, "matvec", o), matmulUs: await timer.time(n, "matmul", o) });
    // The format is the layers' (the lm_head of a tied embedding stays f32).
    return { weights: linears[0]!.format, ...crossoverOf(timings), timings };
  } finally {
    timer.destroy();
  }
}

function randomValues(n: number): Float32Array {
  return Float32Array.from({ length: n }, () => Math.random() * 2 - 1);
}

/** `rows` rows of K values in `format`, one packed random row repeated (the values do not change the time). */
function weightWords(format: WeightFormat, rows: number, K: number): Uint32Array {
  const row = packWeights(format, Float32Array.from({ length: K }, () => (Math.random() * 2 - 1) / Math.sqrt(K)), [1, K], "timed weight");
  const words = storageRowWords(format, K);
  const out = new Uint32Array(rows * words);
  for (let r = 0; r < rows; r++) out.set(row, r * words);
  return out;
}
