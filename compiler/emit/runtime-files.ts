// The runtime a compiled package carries: the built JavaScript and declarations of milora's runtime
// entries (dist/runtime/package/loader.js and cli.js) and every file they import, found by following
// the imports of the built files, copied under milora-runtime/ in the package, plus the registry
// packages those files import (with the version ranges milora itself depends on). The package then
// installs anywhere with nothing but registry packages: it does not depend on milora.
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, statSync } from "node:fs";
import { dirname, join, posix, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { PackageFile } from "./write-package.ts";
import { MiloraError } from "../../runtime/errors.ts";

/** The package folder the runtime is copied into, and the subpath imports (package.json "imports") naming its entries. */
export const RUNTIME_DIR = "milora-runtime";
export const RUNTIME_IMPORT = "#milora-runtime";
export const RUNTIME_CLI_IMPORT = "#milora-runtime/cli";
const ENTRIES = { [RUNTIME_IMPORT]: "runtime/package/loader", [RUNTIME_CLI_IMPORT]: "runtime/package/cli" } as const;

export interface RuntimeFiles {
  readonly files: readonly PackageFile[];
  /** Registry packages the runtime imports, with milora's own version ranges, sorted by name. */
  readonly dependencies: Readonly<Record<string, string>>;
  /** package.json "imports" of the compiled package: RUNTIME_IMPORT and RUNTIME_CLI_IMPORT. */
  readonly imports: Readonly<Record<string, { readonly types: string; readonly default: string }>>;
}

/** The runtime build is missing or cannot be made (running from source without the build's compiler). */
export class RuntimeBuildError extends MiloraError {
  override name = "RuntimeBuildError";
  readonly kind = "package";
}

const here = dirname(fileURLToPath(import.meta.url));
/** Running built (…/dist/compiler/emit/runtime-files.js) or from the repository's sources (compiler/emit/runtime-files.ts). */
const fromSource = import.meta.url.endsWith(".ts");
const miloraRoot = fromSource ? resolve(here, "../..") : resolve(here, "../../..");
const distRoot = join(miloraRoot, "dist");

let cached: RuntimeFiles | undefined;

/**
 * The runtime files and dependencies of a compiled package. From the repository's sources, the build
 * (`npm run build`) is run first when a file it would copy is missing or older than its source.
 */
export function runtimeFiles(): RuntimeFiles {
  if (cached !== undefined && !fromSource) return cached;
  let walked = walk();
  if (fromSource && walked.stale.length > 0) {
    build(walked.stale);
    walked = walk();
    if (walked.stale.length > 0) throw new RuntimeBuildError(`npm run build did not write ${walked.stale.slice(0, 3).join(", ")}`);
  } else if (walked.stale.length > 0) {
    throw new RuntimeBuildError(`this milora installation lacks its runtime build (${walked.stale.slice(0, 3).join(", ")}); reinstall milora`);
  }
  const manifest = JSON.parse(readFileSync(join(miloraRoot, "package.json"), "utf8")) as { dependencies?: Record<string, string>; devDependencies?: Record<string, string> };
  const ranges = { ...manifest.devDependencies, ...manifest.dependencies };
  const dependencies: Record<string, string> = {};
  for (const name of [...walked.packages].sort()) {
    const range = ranges[name];
    if (range === undefined) throw new RuntimeBuildError(`the runtime imports ${name}, which milora's package.json does not list`);
    dependencies[name] = range;
  }
  const imports = Object.fromEntries(
    Object.entries(ENTRIES).map(([key, entry]) => [key, { types: `./${RUNTIME_DIR}/${entry}.d.ts`, default: `./${RUNTIME_DIR}/${entry}.js` }]),
  );
  cached = { files: walked.files, dependencies, imports };
  return cached;
}

interface Walk {
  files: PackageFile[];
  packages: Set<string>;
  /** dist paths that are missing or older than their source (from source only). */
  stale: string[];
}

/** Follows the imports of the built entries: static, `export ... from`, dynamic, and workers named by `new URL("./x.ts", import.meta.url)`. */
function walk(): Walk {
  const files: PackageFile[] = [];
  const packages = new Set<string>();
  const stale: string[] = [];
  const seen = new Set<string>();
  const queue = Object.values(ENTRIES).map((e) => `${e}.js`);
  while (queue.length > 0) {
    const path = queue.shift()!;
    if (seen.has(path)) continue;
    seen.add(path);
    const js = join(distRoot, path);
    const dts = js.replace(/\.js$/, ".d.ts");
    if (!existsSync(js) || !existsSync(dts) || (fromSource && isOlder(js, join(miloraRoot, path.replace(/\.js$/, ".ts"))))) {
      stale.push(`dist/${path}`);
      continue;
    }
    const text = readFileSync(js, "utf8");
    const declarations = readFileSync(dts, "utf8");
    files.push({ path: `${RUNTIME_DIR}/${path}`, contents: text }, { path: `${RUNTIME_DIR}/${path.replace(/\.js$/, ".d.ts")}`, contents: declarations });
    // The declarations' imports too: type-only modules (their JavaScript imports nothing) a consumer's tsc reads.
    const specifiers = [
      ...`${text}\n${declarations}`.matchAll(/(?:^|[\s;}])(?:import|export)\s[^"'`;]*?from\s*["']([^"']+)["']/gm),
      ...`${text}\n${declarations}`.matchAll(/(?:^|[\s;}])import\s*["']([^"']+)["']/gm),
      ...`${text}\n${declarations}`.matchAll(/\bimport\(\s*["']([^"']+)["']\s*\)/g),
      ...text.matchAll(/new URL\(\s*["'](\.\.?\/[^"']+)["']\s*,\s*import\.meta\.url\s*\)/g),
    ].map((m) => m[1]!);
    for (const specifier of specifiers) {
      if (specifier.startsWith("node:")) continue;
      if (specifier.startsWith(".")) {
        const target = posix.normalize(posix.join(posix.dirname(path), specifier)).replace(/\.ts$/, ".js");
        if (target.endsWith(".js")) queue.push(target);
        continue;
      }
      const parts = specifier.split("/");
      packages.add(specifier.startsWith("@") ? parts.slice(0, 2).join("/") : parts[0]!);
    }
  }
  // The declarations name WebGPU's global types (GPUDevice): a consumer type-checks them with @webgpu/types.
  for (const [i, f] of files.entries()) {
    if (!f.path.endsWith(".d.ts") || !/\bGPU[A-Z]\w*/.test(f.contents)) continue;
    files[i] = { path: f.path, contents: `/// <reference types="@webgpu/types" />\n${f.contents}` };
    packages.add("@webgpu/types");
  }
  files.sort((a, b) => (a.path < b.path ? -1 : 1));
  return { files, packages, stale };
}

function isOlder(built: string, source: string): boolean {
  return existsSync(source) && statSync(built).mtimeMs < statSync(source).mtimeMs;
}

/** `npm run build` in the repository (tsc emits even while unrelated files have type errors). */
function build(stale: readonly string[]): void {
  const tsc = join(miloraRoot, "node_modules/.bin/tsc");
  if (!existsSync(tsc)) throw new RuntimeBuildError(`the runtime build is missing (${stale[0]}) and ${relative(process.cwd(), tsc)} is not installed: run npm install, then npm run build`);
  const run = spawnSync(tsc, ["-p", join(miloraRoot, "tsconfig.build.json")], { cwd: miloraRoot, encoding: "utf8" });
  if (run.error !== undefined) throw new RuntimeBuildError(`npm run build failed: ${run.error.message}`);
}
