// The contract between kernel generators (compiler/kernels/*) and the runtime that dispatches them.
// A generator is a pure function of the plan's constants; the runtime caches pipelines by `key`.

/** One storage or uniform binding, `@group(0) @binding(index)` in declaration order. */
export interface KernelBinding {
  readonly name: string;
  readonly access: "read" | "read_write" | "uniform";
}

/** A scalar field of the kernel's `Params` uniform struct (the last binding, named "params"). */
export interface KernelParam {
  readonly name: string;
  readonly type: "u32" | "i32" | "f32";
}

export interface KernelSource {
  /** Short kernel family name, e.g. "matmul". */
  readonly name: string;
  /** Stable cache key: equal keys mean byte-identical WGSL. */
  readonly key: string;
  readonly wgsl: string;
  readonly entryPoint: string;
  readonly bindings: readonly KernelBinding[];
  /** Per-dispatch values (row counts, positions) that are not baked into the WGSL. */
  readonly params: readonly KernelParam[];
  /** Workgroup counts for a dispatch with these param values. */
  dispatch(params: Readonly<Record<string, number>>): readonly [number, number, number];
}
