// The contract between kernel generators (compiler/kernels/*) and the runtime that dispatches them. It
// lives with the runtime (runtime/gpu/kernel.ts), which must run a package without the compiler; the
// generators produce it. A generator is a pure function of the plan's constants; the runtime caches
// pipelines by `key`.
export type { DispatchRule, GroupCount, KernelBinding, KernelInterface, KernelParam, KernelSource } from "../../runtime/gpu/kernel.ts";
