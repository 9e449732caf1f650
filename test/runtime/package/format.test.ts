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

/** Every path of a JSON value ("plan.layer[0].op"), with the value there. */
function paths(v: unknown, at = ""): [string, unknown][] {
  const here: [string, unknown][] = at === "" ? [] : [[at, v]];
  if (Array.isArray(v)) return [...here, ...v.flatMap((x, i) => paths(x, `${at}[${i}]`))];
  if (typeof v === "object" && v !== null) return [...here, ...Object.entries(v).flatMap(([k, x]) => paths(x, at === "" ? k : `${at}.${k}`))];
  return here;
}

/** `json` with the value at `path` replaced (or deleted, for undefined). */
function changed(json: Record<string, any>, path: string, value: unknown): Record<string, any> {
  const copy = JSON.parse(JSON.stringify(json));
  const keys = [...path.matchAll(/[^.[\]]+/g)].map((m) => m[0]);
  const parent = keys.slice(0, -1).reduce((o, k) => o[k], copy);
  const last = keys.at(-1)!;
  if (value === undefined) {
    if (Array.isArray(parent)) parent.splice(Number(last), 1);
    else delete parent[last];
  } else parent[last] = value;
  return copy;
}

/** A value of another JSON type than `v`. */
const wrongType = (v: unknown): unknown => (typeof v === "string" ? 7 : typeof v === "number" ? "7" : typeof v === "boolean" ? "yes" : Array.isArray(v) ? { length: 1 } : "x");

test("every field a loader reads is checked: a wrong type anywhere is a PackageError naming the field, never a TypeError", () => {
  const good = manifest();
  // What the runtime does not read: the budget (for the README and API) and each kernel's constants
  // (the generator's; the interface beside the file is what runs); `format` and `compiler` go first, as versions.
  const opaque = /^(budget|plan\.kernels\[\d+\]\.constants|format$|compiler)/;
  let checked = 0;
  for (const [path, value] of paths(good)) {
    const outcome = (json: unknown) => {
      try {
        validateManifest(json, "pkg/manifest.json");
        return "accepted";
      } catch (e) {
        assert.instance(e, PackageError, `${path}: ${(e as Error).message}`);
        return (e as Error).message;
      }
    };
    const wrong = outcome(changed(good, path, wrongType(value)));
    if (opaque.test(path)) continue;
    checked++;
    assert.ok(wrong.startsWith(`pkg/manifest.json: field ${path} must be `), `${path} = ${JSON.stringify(wrongType(value))}: ${wrong}`);
    // Deleting a field is refused unless it is optional (an array element removed is a shorter array);
    // in a union (a dispatch rule of grid or groups) the refusal may name the other case's field.
    if (/\]$/.test(path)) continue;
    const missing = outcome(changed(good, path, undefined));
    const parent = path.slice(0, path.lastIndexOf("."));
    if (missing !== "accepted") assert.ok(missing.includes(`field ${path} must be `) || missing.includes(`field ${parent}.`), `${path} deleted: ${missing}`);
  }
  assert.ok(checked > 500, `${checked} fields`);
});

test("manifests broken by hand: each refusal names the field and what it must be", () => {
  const m = manifest();
  const cases: [(m: Record<string, any>) => void, string][] = [
    [(m) => delete m.plan.kernels, "field plan.kernels must be an array (it is missing)"],
    [(m) => (m.plan.kernels = {}), "field plan.kernels must be an array (got {})"],
    [(m) => (m.plan.dims.hidden = "64"), 'field plan.dims.hidden must be a whole number >= 0 (got "64")'],
    [(m) => (m.plan.dims.ropeTheta = null), "field plan.dims.ropeTheta must be a number (got null)"],
    [(m) => (m.plan.tensors[0].shape = [512, -1]), "field plan.tensors[0].shape[1] must be a whole number >= 0 (got -1)"],
    [(m) => (m.plan.router.selection = { rule: "top_p" }), 'field plan.router.selection.rule must be one of top_k, threshold, dense (got "top_p")'],
    [(m) => delete m.plan.router.when, 'field plan.router.when must be one of "prompt", "token" (it is missing)'],
    [(m) => (m.adapter.experts[3].rank = 2.5), "field adapter.experts[3].rank must be a whole number >= 0 (got 2.5)"],
    [(m) => (m.kernels[4].dispatch = { groups: [1, 1] }), "field kernels[4].dispatch.groups must be three counts (got [1,1])"],
    [(m) => (m.base.tieEmbeddings = 0), "field base.tieEmbeddings must be true or false (got 0)"],
    [(m) => (m.plan.dims.ropeScaling = { type: "yarn", factor: 2 }), 'field plan.dims.ropeScaling.type must be one of linear, dynamic, llama3 (got "yarn")'],
    [(m) => (m.base.ropeScaling = { type: "linear", factor: 0.5 }), "field base.ropeScaling.factor must be a number >= 1 (got 0.5)"],
    [(m) => (m.plan.dims.ropeScaling = { type: "dynamic", factor: 2 }), "field plan.dims.ropeScaling.originalMaxPositions must be a whole number >= 1 (it is missing)"],
    [
      (m) => (m.plan.dims.ropeScaling = { type: "llama3", factor: 8, lowFreqFactor: 4, highFreqFactor: 1, originalMaxPositions: 16 }),
      "field plan.dims.ropeScaling.highFreqFactor must be above lowFreqFactor 4 (got 1)",
    ],
  ];
  for (const [breakIt, message] of cases) {
    const broken = JSON.parse(JSON.stringify(m));
    breakIt(broken);
    refused(broken, `pkg/manifest.json: ${message}`);
  }
  const scaled = JSON.parse(JSON.stringify(m));
  scaled.base.ropeScaling = scaled.plan.dims.ropeScaling = { type: "llama3", factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 };
  assert.ok(validateManifest(scaled, "pkg/manifest.json"), "a rope_scaling in the base and the dims is a field like the others");
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
