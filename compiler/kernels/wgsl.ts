// Assembles a KernelSource from a kernel body: binding declarations, the Params struct, the cache key
// and the workgroup grid are generated here once, so each kernel file holds only its own math.
import type { DispatchRule, KernelBinding, KernelParam, KernelSource } from "./kernel.ts";

export { MAX_GROUPS_PER_DIMENSION, grid } from "../../runtime/gpu/kernel.ts";

/** A storage buffer of a kernel, with its WGSL type, e.g. `array<f32>` or `array<vec4<f32>>`. */
export interface StorageDecl {
  readonly name: string;
  readonly access: "read" | "read_write";
  readonly type: string;
}

/** Constants baked into a kernel's WGSL; they name the variant, so they make up the cache key. */
export type KernelConstants = Readonly<Record<string, number | boolean | string>>;

export interface KernelSpec {
  readonly name: string;
  readonly constants: KernelConstants;
  readonly storage: readonly StorageDecl[];
  readonly params: readonly KernelParam[];
  /** WGSL after the declarations; must define `fn main`. */
  readonly body: string;
  /** The workgroup rule, as data (runtime/gpu/kernel.ts workgroups()). */
  readonly dispatch: DispatchRule;
}

/** WGSL expression of the linear workgroup index for a {@link grid} dispatch. */
export const LINEAR_GROUP = "(wg.x + wg.y * groups.x)";
/** Entry-point builtins matching {@link LINEAR_GROUP}. */
export const GROUP_BUILTINS =
  "@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, @builtin(local_invocation_index) lid: u32";

/** Formats a number as a WGSL f32 literal that round-trips (never `1e-5` without a dot issue). */
export function f32Literal(x: number): string {
  if (!Number.isFinite(x)) throw new Error(`cannot bake ${x} into WGSL`);
  const text = Math.fround(x).toString();
  return /[.eE]/.test(text) ? text : `${text}.0`;
}

export function kernelSource(spec: KernelSpec): KernelSource {
  const constantText = Object.entries(spec.constants)
    .map(([k, v]) => `${k}=${v}`)
    .join(",");
  const lines = spec.storage.map(
    (s, i) => `@group(0) @binding(${i}) var<storage, ${s.access}> ${s.name}: ${s.type};`,
  );
  const bindings: KernelBinding[] = spec.storage.map((s) => ({ name: s.name, access: s.access }));
  if (spec.params.length > 0) {
    lines.unshift(`struct Params {\n${spec.params.map((p) => `  ${p.name}: ${p.type},`).join("\n")}\n}`);
    lines.push(`@group(0) @binding(${spec.storage.length}) var<uniform> params: Params;`);
    bindings.push({ name: "params", access: "uniform" });
  }
  return {
    name: spec.name,
    key: `${spec.name}(${constantText})`,
    wgsl: `// milora kernel ${spec.name}(${constantText})\n${lines.join("\n")}\n${spec.body.trim()}\n`,
    entryPoint: "main",
    bindings,
    params: spec.params,
    dispatch: spec.dispatch,
  };
}

/**
 * A row-major f32 matrix with `columns` columns read four columns at a time: bound as `array<vec4<f32>>`
 * when `columns` is a multiple of 4, else as `array<f32>` with each lane bounds-checked (zero past the end).
 */
export function vec4Rows(buffer: string, columns: number, access: "read" | "read_write" = "read") {
  const aligned = columns % 4 === 0;
  const quads = Math.ceil(columns / 4);
  const fn = `load_${buffer}`;
  const body = aligned
    ? `return ${buffer}[row * ${quads}u + quad];`
    : `let at = row * ${columns}u + quad * 4u;
  let c = quad * 4u;
  return vec4<f32>(
    select(0.0, ${buffer}[at], c < ${columns}u),
    select(0.0, ${buffer}[min(at + 1u, at + ${columns}u - c - 1u)], c + 1u < ${columns}u),
    select(0.0, ${buffer}[min(at + 2u, at + ${columns}u - c - 1u)], c + 2u < ${columns}u),
    select(0.0, ${buffer}[min(at + 3u, at + ${columns}u - c - 1u)], c + 3u < ${columns}u));`;
  return {
    decl: { name: buffer, access, type: aligned ? "array<vec4<f32>>" : "array<f32>" } satisfies StorageDecl,
    /** Number of vec4 quads per row (the last one zero-padded when unaligned). */
    quads,
    /** WGSL `fn load_<buffer>(row: u32, quad: u32) -> vec4<f32>`. */
    wgsl: `fn ${fn}(row: u32, quad: u32) -> vec4<f32> {\n  ${body}\n}`,
  };
}
