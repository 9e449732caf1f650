// The data flow of docs/architecture.md, checked: every import of every .ts file in the repository
// (static, dynamic and `export ... from`, type-only included) is resolved and refused when it goes
// against the flow. A new exception belongs in docs/architecture.md first, then here.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";

const root = resolve(".");
const SKIP = new Set(["node_modules", "dist", ".git", "golden"]);

function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    if (SKIP.has(name) || name.startsWith(".")) return [];
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return tsFiles(path);
    return name.endsWith(".ts") ? [relative(root, path)] : [];
  });
}

/** Relative module specifiers of a file's imports, resolved to repository paths. */
export function importsOf(file: string, text: string): string[] {
  const specs = [...text.matchAll(/(?:^|\n)\s*(?:import|export)\b[^;]*?\bfrom\s*["']([^"']+)["']|\bimport\(\s*["']([^"']+)["']\s*\)|(?:^|\n)\s*import\s*["']([^"']+)["']/g)].map((m) => m[1] ?? m[2] ?? m[3]!);
  return specs.filter((s) => s.startsWith(".")).map((s) => relative(root, resolve(dirname(join(root, file)), s)));
}

/** The compiler modules the inference runtime may use: the checked model's vocabulary and its limits, no generator or planner. */
const RUNTIME_MAY_USE = new Set(["compiler/model.ts", "compiler/modules.ts", "compiler/limits.ts", "compiler/base-keys.ts", "compiler/rational.ts", "compiler/json-syntax.ts", "compiler/families.ts"]);
/** The runtime modules the compiler writes to: the kernel contract, buffer layouts, the package format, the training kernels resolver; and the user errors it throws. */
const CONTRACTS = new Set(["runtime/gpu/kernel.ts", "runtime/gpu/layouts.ts", "runtime/package/format.ts", "runtime/training/kernels.ts", "runtime/errors.ts"]);

/** Why `from` may not import `to`, or undefined. */
export function violation(from: string, to: string): string | undefined {
  const top = (p: string) => p.split("/")[0]!;
  const f = top(from);
  const t = top(to);
  if (f === "grammar" && t !== "grammar") return "grammar/ imports nothing outside itself";
  if (f === "compiler" && t === "runtime" && !CONTRACTS.has(to)) return "compiler/ imports from runtime/ only the contracts it writes (kernel.ts, layouts.ts, format.ts, training/kernels.ts) and errors.ts";
  if (f === "compiler" && (t === "bin" || t === "test" || t === "bench" || t === "examples")) return `compiler/ does not import ${t}/`;
  if (f === "runtime") {
    if (from === "runtime/package/format.ts" || from === "runtime/gpu/kernel.ts" || from === "runtime/gpu/layouts.ts") {
      if (t !== "runtime") return "the package format and kernel contract import nothing outside runtime/";
    }
    // Training takes its kernels from a resolver the CLI passes in; the host-side helpers (packing,
    // constant types) of its kernels still sit beside their generators (docs/architecture.md).
    const training = from.startsWith("runtime/training/");
    if (t === "grammar") return "runtime/ does not import grammar/";
    if (t === "compiler" && !RUNTIME_MAY_USE.has(to) && !(training && (to.startsWith("compiler/kernels/") || to === "compiler/plan.ts")))
      return "runtime/ imports no compiler generator, planner or emitter";
    if (t === "bin" || t === "test" || t === "bench" || t === "examples") return `runtime/ does not import ${t}/`;
  }
  if (f === "bin" && (t === "test" || t === "bench")) return `bin/ does not import ${t}/`;
  if ((f === "examples" || f === "scripts") && (t === "test" || t === "bench")) return `${f}/ does not import ${t}/`;
  return undefined;
}

test("every import in the repository follows the data flow of docs/architecture.md", () => {
  const problems = tsFiles(root).flatMap((file) =>
    importsOf(file, readFileSync(join(root, file), "utf8")).flatMap((to) => {
      const why = violation(file, to);
      return why === undefined ? [] : [`${file} imports ${to}: ${why}`];
    }),
  );
  assert.equal(problems, []);
});

test("the check refuses imports against the flow", () => {
  assert.ok(violation("runtime/engine/engine.ts", "compiler/plan.ts"));
  assert.ok(violation("runtime/package/loader.ts", "compiler/emit/manifest.ts"));
  assert.ok(violation("runtime/formats/adapter-config.ts", "grammar/ast.ts"));
  assert.ok(violation("runtime/engine/engine.ts", "compiler/kernels/beam-topk.ts"));
  assert.ok(violation("grammar/parse.ts", "compiler/model.ts"));
  assert.ok(violation("runtime/package/format.ts", "compiler/model.ts"));
  assert.ok(violation("compiler/plan.ts", "runtime/engine/engine.ts"));
  assert.is(violation("compiler/plan.ts", "runtime/package/format.ts"), undefined);
  assert.is(violation("compiler/plan.ts", "runtime/errors.ts"), undefined);
  assert.ok(violation("compiler/plan.ts", "runtime/formats/safetensors.ts"));
  assert.is(violation("bin/engine-plan.ts", "compiler/plan.ts"), undefined);
  assert.is(violation("runtime/engine/engine.ts", "compiler/model.ts"), undefined);
  assert.equal(importsOf("runtime/x/a.ts", 'import type { A } from "../../compiler/plan.ts";\nexport { b } from "./b.ts";\nawait import("../c.ts");'), [
    "compiler/plan.ts",
    "runtime/x/b.ts",
    "runtime/c.ts",
  ]);
});

test.run();
