// A compiled package installs and runs outside the repository with nothing but registry packages
// besides what milora produced: build, compile examples/llama-tiny.milora, `npm pack` the package,
// `npm install` the tarball in a fresh folder outside the repository (no symlinks, no npm link), then
// run its bin with plain node and type-check a strict TypeScript consumer against its declarations.
// Skipped, saying so, when the npm registry cannot be reached.
import { spawnSync, type SpawnSyncReturns } from "node:child_process";
import { lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PRESETS, writeRandomCheckpoint } from "../examples/random-checkpoint.ts";

const repo = resolve(".");
const root = mkdtempSync(join(tmpdir(), "milora-install-"));
const NPM_FLAGS = ["--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"];

function sh(cmd: string, args: string[], cwd: string, timeoutMs = 120_000): SpawnSyncReturns<string> {
  const run = spawnSync(cmd, args, { cwd, encoding: "utf8", timeout: timeoutMs, env: { ...process.env, npm_config_update_notifier: "false" } });
  if (run.error !== undefined) throw new Error(`${cmd} ${args.join(" ")}: ${run.error.message}`);
  return run;
}

function ok(run: SpawnSyncReturns<string>, what: string): string {
  assert.is(run.status, 0, `${what} failed (${run.status}):\n${run.stdout}\n${run.stderr}`);
  return run.stdout;
}

/** Whether the registry answers (the machine's npm cache may still hold what the install needs). */
function registryReachable(): boolean {
  const ping = spawnSync("npm", ["ping", "--loglevel=error"], { encoding: "utf8", timeout: 20_000 });
  return ping.status === 0;
}

test.after(() => rmSync(root, { recursive: true, force: true }));

test("the compiled tiny package installs from its tarball in a fresh folder, runs with npx and type-checks in a strict consumer", () => {
  if (!registryReachable()) {
    console.log("  skipped: the npm registry is unreachable (npm ping failed), so the compiled package's dependencies cannot be installed");
    return;
  }
  const started = Date.now();
  ok(sh("npm", ["run", "--silent", "build"], repo), "npm run build");
  const pkgDir = join(root, "pkg");
  ok(sh("node", ["bin/milora.js", "compile", "examples/llama-tiny.milora", "--adapter", "tiny", "--out", pkgDir], repo), "milora compile");
  const manifest = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")) as { name: string; dependencies: Record<string, string> };
  assert.is(manifest.name, "milora-tiny", "the default name has milora's prefix");
  assert.not.ok("milora" in manifest.dependencies, "the package carries its runtime instead of depending on milora");
  const base = join(root, "base");
  writeRandomCheckpoint(base, { ...PRESETS.tiny, seed: 1 });

  const tarball = ok(sh("npm", ["pack", "--silent", "--pack-destination", root], pkgDir), "npm pack").trim().split("\n").pop()!;
  const app = join(root, "app");
  mkdirSync(app);
  writeFileSync(join(app, "package.json"), '{ "name": "consumer", "private": true, "type": "module" }\n');
  ok(sh("npm", ["install", ...NPM_FLAGS, join(root, tarball), "@types/node@20"], app, 180_000), "npm install of the tarball");
  const installed = join(app, "node_modules/milora-tiny");
  assert.ok(lstatSync(installed).isDirectory() && !lstatSync(installed).isSymbolicLink(), "installed as files, not a link");
  assert.ok(!readdirSync(join(app, "node_modules")).includes("milora"), "milora itself is not installed");

  const out = ok(sh("npx", ["--no-install", "milora-tiny", "--base", base, "--tokens", "1,2,3", "--max-tokens", "3", "--temperature", "0", "--json"], app), "npx milora-tiny");
  const line = out.trim().split("\n").pop()!;
  const result = JSON.parse(line) as { tokens?: number[] } & Record<string, unknown>;
  assert.ok(JSON.stringify(result).length > 2, `npx milora-tiny printed ${line}`);

  writeFileSync(
    join(app, "consumer.ts"),
    `import { Tiny, EXPERT_MODULES, LAYER_COUNT, type ExpertModule, type Routing } from "milora-tiny";

const model = await Tiny.load({ base: ${JSON.stringify(base)}, adapters: {} });
for await (const token of model.generate([1, 2, 3], { maxTokens: 2, temperature: 0 })) {
  const id: number = token.id;
  // @ts-expect-error token ids are numbers: the runtime's declarations are types, not any
  const wrong: string = token.id;
  console.log(id, wrong);
}
const layers: 2 = LAYER_COUNT;
const module: ExpertModule = EXPERT_MODULES[0];
// @ts-expect-error the spec's modules only
const other: ExpertModule = "lm_head";
const routing: Routing | undefined = undefined;
console.log(layers, module, other, routing);
model.destroy();
`,
  );
  // skipLibCheck: @webgpu/types (the runtime's GPU types) needs the DOM lib to check itself, as in any Node project using webgpu
  const tsc = sh(join(repo, "node_modules/.bin/tsc"), ["--strict", "--noEmit", "--pretty", "false", "--target", "es2022", "--lib", "es2023", "--module", "nodenext", "--moduleResolution", "nodenext", "--types", "node", "--skipLibCheck", "consumer.ts"], app);
  ok(tsc, "tsc --strict of the consumer");
  console.log(`  install test: ${((Date.now() - started) / 1000).toFixed(1)} s`);
});

test.run();
