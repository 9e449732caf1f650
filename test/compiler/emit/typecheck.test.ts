// The generated package through the TypeScript compiler, as its users meet it: the package itself
// type-checks under --strict, a consumer using it correctly does too, and one naming a module the spec
// does not enable (or a tenant it did not load) gets the compiler's error.
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { compilePackage } from "../../../compiler/emit/compile-package.ts";
import { writePackage } from "../../../compiler/emit/write-package.ts";
import { buildRuntime, packageProject, repo } from "./package-project.ts";

const tsc = join(repo, "node_modules/.bin/tsc");
const project = packageProject("milora-typecheck-");
const root = project.root;

test.before(() => {
  // The generated code imports `milora/runtime`, whose types are the build's declarations.
  buildRuntime();
  // support_bot turns k_proj off: the module a wrong consumer will name
  writePackage(join(root, "pkg"), compilePackage({ spec: "examples/from-config.milora", adapter: "support_bot" }).package!.files);
});
test.after(() => project.remove());

/** `tsc --strict --noEmit` over `files` (relative to the temporary project); its exit code and output. */
function typecheck(files: string[]): { code: number | null; output: string } {
  const args = ["--strict", "--noEmit", "--pretty", "false", "--target", "es2022", "--lib", "es2023", "--skipLibCheck", "--module", "nodenext", "--moduleResolution", "nodenext", "--types", "node"];
  const run = spawnSync(tsc, [...args, ...files], { cwd: root, encoding: "utf8" });
  return { code: run.status, output: run.stdout + run.stderr };
}

test("the generated package type-checks under --strict", () => {
  const { code, output } = typecheck(["pkg/src/index.ts", "pkg/src/cli.ts"]);
  assert.is(code, 0, output);
});

test("a consumer that uses the API as typed compiles", () => {
  writeFileSync(
    join(root, "good.ts"),
    `import { SupportBot, EXPERT_MODULES, LAYERS, LAYER_COUNT, BUDGET, type ExpertModule, type Routing } from "./pkg/index.js";

const model = await SupportBot.load({ base: "models/tiny", adapters: { alice: "adapters/a", bob: "adapters/b" } });
for await (const token of model.generate("Hello", { tenant: "alice", maxTokens: 4, temperature: 0.7, seed: 1 })) {
  console.log(token.id, token.text ?? "");
}
const routing: Routing = await model.route([1, 2, 3], { tenant: "bob" });
const first: 0 = routing[0].layer;
const qGate: number = routing[1].gates.q_proj;
const layers: 2 = LAYER_COUNT;
const firstLayer: 0 | 1 = LAYERS[0];
const module: ExpertModule = EXPERT_MODULES[0];
const params: number = BUDGET.trainableParams;
console.log(first, qGate, layers, firstLayer, module, params);
model.destroy();
`,
  );
  const { code, output } = typecheck(["good.ts"]);
  assert.is(code, 0, output);
});

test("naming a module the spec does not enable, or a tenant never loaded, fails to compile", () => {
  writeFileSync(
    join(root, "bad.ts"),
    `import { SupportBot, type ExpertModule } from "./pkg/index.js";

const model = await SupportBot.load({ base: "models/tiny", adapters: { alice: "adapters/a" } });
const routing = await model.route("Hello", { tenant: "alice" });
const kGate = routing[0].gates.k_proj;
const module: ExpertModule = "k_proj";
model.generate("Hello", { tenant: "carol" });
console.log(kGate, module);
`,
  );
  const { code, output } = typecheck(["bad.ts"]);
  assert.is.not(code, 0);
  // TypeScript adds "Did you mean 'o_proj'?" (codes TS2551, TS2820) to these
  assert.match(output, /bad\.ts\(5,\d+\): error TS\d+: Property 'k_proj' does not exist on type '\{ readonly down_proj: number;/);
  assert.match(output, /bad\.ts\(6,7\): error TS\d+: Type '"k_proj"' is not assignable to type '"down_proj" \| "gate_proj" \| "o_proj" \| "q_proj" \| "up_proj" \| "v_proj"'/);
  assert.match(output, /bad\.ts\(7,\d+\): error TS2322: Type '"carol"' is not assignable to type '"alice"'/);
});

test.run();
