// A temporary project in which compiled packages resolve `milora/runtime` as an installed dependency
// would: the build's JavaScript and declarations, through node_modules/milora -> this repository.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";

export const repo = resolve(".");

/** Runs `npm run build` (tsc emits even while other files have type errors) and checks the entries exist. */
export function buildRuntime(): void {
  const started = Date.now();
  const build = spawnSync("npm", ["run", "--silent", "build"], { cwd: repo, encoding: "utf8" });
  for (const entry of ["dist/runtime/package/loader.js", "dist/runtime/package/cli.js", "dist/runtime/package/loader.d.ts"]) {
    const path = join(repo, entry);
    if (!existsSync(path) || statSync(path).mtimeMs < started - 1000) throw new Error(`npm run build did not write ${entry}:\n${build.stdout}${build.stderr}`);
  }
}

/** A fresh folder with node_modules/{milora, @types/node} linked to this repository's; remove() deletes it. */
export function packageProject(prefix: string): { root: string; remove(): void } {
  const root = mkdtempSync(join(tmpdir(), prefix));
  mkdirSync(join(root, "node_modules/@types"), { recursive: true });
  symlinkSync(repo, join(root, "node_modules/milora"));
  symlinkSync(join(repo, "node_modules/@types/node"), join(root, "node_modules/@types/node"));
  // The registry packages the runtime a compiled package carries imports (test/package-install.test.ts installs them for real).
  for (const name of ["webgpu", "@webgpu/types", "@huggingface/tokenizers", "re2js"]) {
    mkdirSync(dirname(join(root, "node_modules", name)), { recursive: true });
    symlinkSync(join(repo, "node_modules", name), join(root, "node_modules", name));
  }
  writeFileSync(join(root, "package.json"), '{ "type": "module" }\n');
  return { root, remove: () => rmSync(root, { recursive: true, force: true }) };
}
