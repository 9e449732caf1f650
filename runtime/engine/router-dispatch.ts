// Dispatching MiLoRA's routers inside a step. The sequences that route in a step are grouped by
// adapter (one router's weights per dispatch); at the start of each layer the adapter routes, each
// group runs the router kernels (compiler/kernels/router.ts) on the layer input, the gate kernel
// writing straight into the step's gate table: prompt routing pools each sequence's prompt (score,
// pool, then activation and gate) and writes the one decision to all its rows; token routing
// activates and gates every row alone. A prompt longer than one step is routed over the prompt's
// hidden states held whole (forward.ts, a step run layer by layer over chunks), its decision written
// to the table rows every chunk runs on. The WGSL comes from the engine (the plan's kernels, or its
// resolver's): nothing is generated here.
import type { RouterConfig } from "../../compiler/model.ts";
import type { RouterKernels } from "./kernels.ts";
import type { GpuRouter, Tenant } from "./tenants.ts";
import { createStorage, type BufferArg, type StepEncoder } from "../gpu/kernel-runner.ts";
import { MODULES_PER_LAYER } from "./routing.ts";

/** A sequence whose gates are computed on the GPU in this step: rows first .. first + count - 1. */
export interface RouteJob {
  readonly tenant: Tenant;
  readonly config: RouterConfig;
  readonly first: number;
  readonly count: number;
  /** Token routing: every row routes on its own hidden state. */
  readonly perRow: boolean;
  /**
   * Prompt routing over chunks: the decision goes to table rows [0, tableRows), the rows each chunk
   * runs on, rather than to the job's own rows (which are rows of the prompt's hidden states).
   */
  readonly tableRows?: number;
}

/** One tenant's jobs in a step, with the index tables its dispatches read. */
export interface RouteGroup {
  readonly tenant: Tenant;
  readonly config: RouterConfig;
  readonly perRow: boolean;
  /** Items the gate kernel routes: one per prompt, or one per row for token routing. */
  readonly items: number;
  /** One past the last row of the group's jobs (attention scores are computed up to it). */
  readonly end: number;
  readonly ranges: BufferArg;
  /** Per item (input row, first table row, end table row). */
  readonly itemRows: BufferArg;
}

const ALIGN = 256;
const align = (bytes: number) => Math.ceil(bytes / ALIGN) * ALIGN;

export interface RouterDispatchOptions {
  readonly device: GPUDevice;
  readonly hidden: number;
  /** Rows of a step. */
  readonly maxRows: number;
  /** Tenants routed in one step. */
  readonly maxGroups: number;
  /** Rows of the longest prompt routed over chunks (attention pooling scores each). */
  readonly maxPromptRows: number;
  /** A router's kernels in its layer, as the engine resolves them (the plan's, or its resolver's). */
  readonly kernelsOf: (config: RouterConfig, layer: number, router: GpuRouter) => RouterKernels;
}

export class RouterDispatch {
  readonly #device: GPUDevice;
  readonly #maxRows: number;
  readonly #kernelsOf: (config: RouterConfig, layer: number, router: GpuRouter) => RouterKernels;
  /** Per group a segment of (start, end) ranges and (input row, first row, end row) items. */
  readonly #indices: GPUBuffer;
  readonly #segment: number;
  readonly #scores: GPUBuffer;
  readonly #pooled: GPUBuffer;

  constructor(options: RouterDispatchOptions) {
    const { device, hidden, maxRows } = options;
    this.#device = device;
    this.#kernelsOf = options.kernelsOf;
    this.#maxRows = maxRows;
    this.#segment = align(maxRows * 8) + align(maxRows * 12);
    this.#indices = createStorage(device, Math.max(1, options.maxGroups) * this.#segment, "router indices");
    this.#scores = createStorage(device, Math.max(maxRows, options.maxPromptRows) * 4, "router scores");
    this.#pooled = createStorage(device, maxRows * hidden * 4, "router pooled inputs");
  }

  /** Groups a step's jobs by tenant and uploads their index tables (before the step is submitted). */
  prepare(jobs: readonly RouteJob[]): RouteGroup[] {
    const byTenant = new Map<Tenant, RouteJob[]>();
    for (const job of jobs) byTenant.set(job.tenant, [...(byTenant.get(job.tenant) ?? []), job]);
    return [...byTenant.values()].map((mine, g) => {
      const { tenant, config, perRow } = mine[0]!;
      const ranges = new Uint32Array(this.#maxRows * 2);
      const itemRows = new Uint32Array(this.#maxRows * 3);
      let items = 0;
      for (const job of mine) {
        if (perRow) {
          for (let r = job.first; r < job.first + job.count; r++) itemRows.set([r, r, r + 1], 3 * items++);
        } else {
          // The gate reads the item's pooled row and writes the decision to every row of the prompt.
          ranges.set([job.first, job.first + job.count], 2 * items);
          itemRows.set([items, job.tableRows === undefined ? job.first : 0, job.tableRows ?? job.first + job.count], 3 * items++);
        }
      }
      const at = g * this.#segment;
      const pairs = align(this.#maxRows * 8);
      const queue = this.#device.queue;
      queue.writeBuffer(this.#indices, at, ranges);
      queue.writeBuffer(this.#indices, at + pairs, itemRows);
      const end = Math.max(...mine.map((j) => j.first + j.count));
      return {
        tenant,
        config,
        perRow,
        items,
        end,
        ranges: { buffer: this.#indices, offset: at, size: pairs },
        itemRows: { buffer: this.#indices, offset: at + pairs, size: align(this.#maxRows * 12) },
      };
    });
  }

  /** Records `group`'s router of `layer` (if the adapter routes it): gates of its rows into `table`. */
  route(step: StepEncoder, group: RouteGroup, layer: number, x: GPUBuffer, table: { readonly buffer: GPUBuffer; readonly stride: number }): void {
    const router = group.tenant.routers.get(layer);
    if (!router) return;
    const kernels = this.#kernelsOf(group.config, layer, router);
    let input: GPUBuffer = x;
    if (kernels.score) step.dispatch(kernels.score, { h: x, pooler: router.pooler!, scores: this.#scores }, { rows: group.end });
    if (kernels.pool) {
      step.dispatch(kernels.pool, { h: x, ranges: group.ranges, ...(kernels.score ? { scores: this.#scores } : {}), pooled: this.#pooled }, { count: group.items });
      input = this.#pooled;
    }
    const rational: Record<string, GPUBuffer> = router.rational ? { rational: router.rational } : {};
    step.dispatch(kernels.gate, { x: input, items: group.itemRows, weight: router.gate, ...rational, table: table.buffer }, { count: group.items, stride: table.stride, base: layer * MODULES_PER_LAYER });
  }

  destroy(): void {
    for (const b of [this.#indices, this.#scores, this.#pooled]) b.destroy();
  }
}
