// The package format without a device: a manifest is checked field by field, with errors naming the
// file and the field; kernel interfaces are typed, so a wrong binding name does not compile.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { compilePackage } from "../../../compiler/emit/compile-package.ts";
import type { StepEncoder } from "../../../runtime/gpu/kernel-runner.ts";
import { workgroups, type KernelSource } from "../../../runtime/gpu/kernel.ts";
import { MANIFEST_FILE, PackageError, validateManifest } from "../../../runtime/package/format.ts";

const manifest = (): Record<string, any> =>
  JSON.parse(compilePackage({ spec: "examples/llama-tiny.milora", adapter: "tiny" }).package!.files.find((f) => f.path === MANIFEST_FILE)!.contents);

function refused(json: unknown, message: string | RegExp) {
  try {
    validateManifest(json, "pkg/manifest.json");
    assert.unreachable("accepted");
  } catch (e) {
    assert.instance(e, PackageError);
    assert.match((e as Error).message, message);
  }
}

test("a compiled manifest validates; one missing plan.kernels, or with a wrong field, is a PackageError naming it", () => {
  assert.ok(validateManifest(manifest(), "pkg/manifest.json"));
  const noKernels = manifest();
  delete noKernels.plan.kernels;
  refused(noKernels, "pkg/manifest.json: field plan.kernels must be an array (it is missing)");
  const badAccess = manifest();
  badAccess.kernels[0].bindings[0].access = "write";
  refused(badAccess, 'pkg/manifest.json: field kernels[0].bindings[0].access must be one of "read", "read_write", "uniform" (got "write")');
  const badOp = manifest();
  badOp.plan.layer[0].op = "conv";
  refused(badOp, "field plan.layer[0].op must be one of rmsnorm, linear");
  const renamed = manifest();
  renamed.kernels[0].bindings[0].name = "input";
  refused(renamed, /field kernels\[0\] \(rmsnorm\(.*\)\): a rmsnorm kernel binds x, weight, out, params; this one binds input, weight, out, params/);
  refused({ format: 3, compiler: { version: "0.1.0" } }, "was written by milora 0.1.0 (manifest format 3)");
  refused(null, "not a milora manifest");
});

test("workgroup rules as data: grids, explicit groups, nothing for zero rows", () => {
  const rule = (dispatch: KernelSource["dispatch"]) => ({ key: "k", dispatch });
  assert.equal(workgroups(rule({ grid: { param: "rows" } }), { rows: 3 }), [3, 1, 1]);
  assert.equal(workgroups(rule({ grid: { param: "rows", times: 4 } }), { rows: 20000 }), [40000, 2, 1]);
  assert.equal(workgroups(rule({ grid: { param: "n", per: 256 } }), { n: 257 }), [2, 1, 1]);
  assert.equal(workgroups(rule({ grid: { param: "rows", times: 70000 } }), { rows: 1 }), [35000, 2, 1]);
  assert.equal(workgroups(rule({ groups: [3, { param: "rows", per: 64 }, 1], emptyWhenZero: "rows" }), { rows: 65 }), [3, 2, 1]);
  assert.equal(workgroups(rule({ groups: [3, { param: "rows", per: 64 }, 1], emptyWhenZero: "rows" }), { rows: 0 }), [0, 0, 1]);
  assert.equal(workgroups(rule({ grid: 5, emptyWhenZero: "rows" }), { rows: 0 }), [0, 1, 1]);
  assert.throws(() => workgroups(rule({ groups: [1, { param: "rows" }, 1] }), { rows: 70000 }), /exceed one dispatch/);
});

// Compile-time only: a kernel typed by its bindings refuses a buffer under another name.
export function typedBindings(step: StepEncoder, k: KernelSource<"x" | "out" | "params">, b: GPUBuffer): void {
  step.dispatch(k, { x: b, out: b });
  // @ts-expect-error "y" is not a binding of this kernel
  step.dispatch(k, { x: b, y: b });
}

test.run();
