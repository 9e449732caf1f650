// Golden files: the kernels and typed API compiled from examples/llama-tiny.milora (adapter tiny) are
// kept under test/golden/llama-tiny, so any change to code generation shows up here as a line diff.
// After checking the diff is intended, update them with `npm run golden:update`.
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { compilePackage } from "../../../compiler/emit/compile-package.ts";

const GOLDEN = "test/golden/llama-tiny";
const update = process.env.MILORA_UPDATE_GOLDEN === "1";

/** The generated files worth reviewing as text: WGSL, the API source and its declarations. */
function reviewed(path: string): boolean {
  return path.startsWith("kernels/") || path === "src/index.ts" || path === "index.d.ts";
}

function goldenFiles(dir: string, prefix = ""): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? goldenFiles(join(dir, e.name), `${prefix}${e.name}/`) : [`${prefix}${e.name}`],
  );
}

const generated = new Map(
  compilePackage({ spec: "examples/llama-tiny.milora", adapter: "tiny" })
    .package!.files.filter((f) => reviewed(f.path))
    .map((f) => [f.path, f.contents]),
);

if (update) {
  rmSync(GOLDEN, { recursive: true, force: true });
  for (const [path, text] of generated) {
    mkdirSync(dirname(join(GOLDEN, path)), { recursive: true });
    writeFileSync(join(GOLDEN, path), text);
  }
}

test("the same files are generated as the golden set holds", () => {
  assert.equal([...generated.keys()].sort(), goldenFiles(GOLDEN).sort(), "run `npm run golden:update` if files were added or removed on purpose");
});

for (const [path, text] of generated) {
  test(`${path} matches its golden copy`, () => {
    const golden = join(GOLDEN, path);
    assert.ok(existsSync(golden), `${golden} is missing: run \`npm run golden:update\``);
    // fixture() prints a line diff when they differ
    assert.fixture(text, readFileSync(golden, "utf8"));
  });
}

test.run();
