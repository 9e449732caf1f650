// The step planner: how a batch of sequences' pending tokens is packed into engine steps of at most
// `maxRows` rows. Sequences are taken in batch order, each contributing as many of its pending tokens
// as the step has room for (a prefill chunk, or one decode token), so a long prompt runs over several
// steps and the rest of the batch rides along. A prompt routed on the prompt needs each layer's
// decision, pooled over the whole prompt, before any of its rows runs that layer: one that fits a step
// runs in one; a longer one gets a step of its own that runs layer by layer over chunks of at most
// `maxRows` rows (forward.ts). Pure: no device, so it is tested on its own
// (test/runtime/engine/step-planner.test.ts); the forward encoder runs what it returns.
import type { LogitsMode } from "./sequence.ts";

/** One token of a step: its id, its position and the KV cache slot of its sequence. */
export interface Row {
  readonly slot: number;
  readonly token: number;
  readonly position: number;
  /** The tenant's slot in the stacked LoRA buffers (NO_ADAPTER for the base alone). */
  readonly tenantSlot: number;
  /** The gates known before the step (plain LoRA's, a prompt's decision), [layers * 7]. */
  readonly gates?: Float32Array;
}

/** A sequence as the planner sees it; `seq` is the caller's handle, returned in the plan. */
export interface PlanSequence<S> {
  readonly seq: S;
  readonly slot: number;
  readonly tenantSlot: number;
  /** Every token of the sequence; those from `cached` on are pending. */
  readonly tokens: readonly number[];
  readonly cached: number;
  readonly gates?: Float32Array;
  /**
   * How its rows are routed on the device in these steps: "prompt" once over all its pending rows,
   * "token" every row on its own; absent when nothing routes.
   */
  readonly routes?: "prompt" | "token";
  readonly logits: LogitsMode;
}

export interface PlannedRow<S> extends Row {
  readonly seq: S;
}

/** A sequence routed on the device in a step: rows first .. first + count - 1. */
export interface PlannedRoute<S> {
  readonly seq: S;
  readonly first: number;
  readonly count: number;
  /** Token routing: every row routes on its own hidden state. */
  readonly perRow: boolean;
}

export interface PlannedStep<S> {
  readonly rows: readonly PlannedRow<S>[];
  /**
   * Present for a prompt routed over chunks (the step's only sequence): the sizes of the consecutive
   * chunks of rows that run together, each layer over every chunk before the next layer.
   */
  readonly chunks?: readonly number[];
  /** Rows (indices into rows) the head runs on, ascending: each finishing row, and every row of a logits "all" sequence. */
  readonly outRows: readonly number[];
  readonly routes: readonly PlannedRoute<S>[];
  /** Sequences whose last pending token runs in this step, with the index in outRows their sample is read from. */
  readonly finishing: ReadonlyMap<S, number>;
}

/** The steps that run every pending token of `batch`, in order: prompts routed over chunks first. */
export function planSteps<S>(batch: readonly PlanSequence<S>[], maxRows: number): PlannedStep<S>[] {
  const pendingOf = (s: PlanSequence<S>) => s.tokens.length - s.cached;
  const chunked = batch.filter((s) => s.routes === "prompt" && pendingOf(s) > maxRows);
  const steps = chunked.map((s) => chunkedStep(s, maxRows));
  const cached = new Map(batch.map((s) => [s, s.cached]));
  let waiting = batch.filter((s) => pendingOf(s) > 0 && !chunked.includes(s));
  while (waiting.length > 0) {
    const rows: PlannedRow<S>[] = [];
    const outRows: number[] = [];
    const routes: PlannedRoute<S>[] = [];
    const finishing = new Map<S, number>();
    const done = new Set<PlanSequence<S>>();
    for (const s of waiting) {
      const at = cached.get(s)!;
      const pending = s.tokens.length - at;
      const take = Math.min(pending, maxRows - rows.length);
      if (take === 0) break;
      // A routed prompt that fits one step runs in one: its decision is pooled over all its rows.
      if (s.routes === "prompt" && take < pending) break;
      const first = rows.length;
      rows.push(...rowsOf(s, at, take));
      if (s.routes) routes.push({ seq: s.seq, first, count: take, perRow: s.routes === "token" });
      const last = take === pending;
      if (s.logits === "all") for (let r = first; r < rows.length; r++) outRows.push(r);
      else if (last) outRows.push(rows.length - 1);
      if (last) {
        finishing.set(s.seq, outRows.length - 1);
        done.add(s);
      }
      cached.set(s, at + take);
    }
    steps.push({ rows, outRows, routes, finishing });
    waiting = waiting.filter((s) => !done.has(s));
  }
  return steps;
}

/** A prompt routed over chunks: every pending row in one step, run layer by layer over chunks of maxRows. */
function chunkedStep<S>(s: PlanSequence<S>, maxRows: number): PlannedStep<S> {
  const pending = s.tokens.length - s.cached;
  const rows = rowsOf(s, s.cached, pending);
  const chunks = Array.from({ length: Math.ceil(pending / maxRows) }, (_, c) => Math.min(maxRows, pending - c * maxRows));
  const outRows = s.logits === "all" ? rows.map((_, r) => r) : [pending - 1];
  return { rows, chunks, outRows, routes: [{ seq: s.seq, first: 0, count: pending, perRow: false }], finishing: new Map([[s.seq, outRows.length - 1]]) };
}

function rowsOf<S>(s: PlanSequence<S>, at: number, count: number): PlannedRow<S>[] {
  return Array.from({ length: count }, (_, i) => ({ seq: s.seq, slot: s.slot, token: s.tokens[at + i]!, position: at + i, tenantSlot: s.tenantSlot, ...(s.gates ? { gates: s.gates } : {}) }));
}
