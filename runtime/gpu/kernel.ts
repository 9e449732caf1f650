// The contract between kernel generators (compiler/kernels/*) and the runtime that dispatches them, as
// data: a kernel's bindings, params and workgroup rule travel beside its WGSL (in a package's
// manifest.json, or from a generator in the CLI), so the runtime needs no generator to run one. The
// compiler imports this file; it imports nothing.

/** One storage or uniform binding, `@group(0) @binding(index)` in declaration order. */
export interface KernelBinding<B extends string = string> {
  readonly name: B;
  readonly access: "read" | "read_write" | "uniform";
}

/** A scalar field of the kernel's `Params` uniform struct (the last binding, named "params"). */
export interface KernelParam {
  readonly name: string;
  readonly type: "u32" | "i32" | "f32";
}

/** A workgroup count: a constant, or ceil(params[param] * times / per) (a missing param counts 0). */
export type GroupCount = number | { readonly param: string; readonly times?: number; readonly per?: number };

/**
 * How many workgroups a dispatch runs, as a function of its params written as data. `grid`: a linear
 * count laid out as x * y, y > 1 only past the per-dimension limit (kernels recover the linear index);
 * `groups`: the three counts as given, each within the limit. With `emptyWhenZero`, a dispatch whose
 * param of that name is 0 runs no workgroups (x is 0) though its other counts are constant.
 */
export type DispatchRule =
  | { readonly grid: GroupCount; readonly emptyWhenZero?: string }
  | { readonly groups: readonly [GroupCount, GroupCount, GroupCount]; readonly emptyWhenZero?: string };

/** What the runtime needs to run a kernel besides its WGSL. */
export interface KernelInterface<B extends string = string> {
  /** Short kernel family name, e.g. "matmul". */
  readonly name: string;
  /** Stable cache key: equal keys mean byte-identical WGSL (as generated). */
  readonly key: string;
  readonly entryPoint: string;
  readonly bindings: readonly KernelBinding<B>[];
  /** Per-dispatch values (row counts, positions) that are not baked into the WGSL. */
  readonly params: readonly KernelParam[];
  readonly dispatch: DispatchRule;
}

/** A kernel ready to compile: its interface and WGSL. `B` names its bindings ("params" included). */
export interface KernelSource<B extends string = string> extends KernelInterface<B> {
  readonly wgsl: string;
}

/** Largest workgroup count per grid dimension that WebGPU guarantees. */
export const MAX_GROUPS_PER_DIMENSION = 65535;

/**
 * A grid of at least `groups` workgroups laid out as x * y (y > 1 only past the per-dimension limit).
 * Kernels recover the linear index as `wg.x + wg.y * groups.x` and skip the excess groups.
 */
export function grid(groups: number): readonly [number, number, number] {
  if (groups <= MAX_GROUPS_PER_DIMENSION) return [Math.max(groups, 0), 1, 1];
  const y = Math.ceil(groups / MAX_GROUPS_PER_DIMENSION);
  return [Math.ceil(groups / y), y, 1];
}

/** Workgroup counts of a dispatch of `k` with these param values. Throws past the per-dimension limit. */
export function workgroups(k: Pick<KernelInterface, "key" | "dispatch">, params: Readonly<Record<string, number>>): readonly [number, number, number] {
  const rule = k.dispatch;
  const count = (c: GroupCount) => (typeof c === "number" ? c : Math.ceil(((params[c.param] ?? 0) * (c.times ?? 1)) / (c.per ?? 1)));
  const empty = rule.emptyWhenZero !== undefined && (params[rule.emptyWhenZero] ?? 0) === 0;
  if ("grid" in rule) return grid(empty ? 0 : count(rule.grid));
  const [x, y, z] = rule.groups.map(count) as [number, number, number];
  for (const n of [x, y, z]) {
    if (n > MAX_GROUPS_PER_DIMENSION) throw new Error(`${k.key}: ${n} workgroups in one dimension exceed one dispatch (params ${JSON.stringify(params)})`);
  }
  return [empty ? 0 : x, y, z];
}
