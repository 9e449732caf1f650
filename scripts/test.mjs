// The test runner behind `npm test` and `npm run test:drivers`: every uvu suite (test/**/*.test.ts), run
// by a few worker processes at once instead of one file after another in one process.
//
//   node scripts/test.mjs [--jobs N] [--driver-width] [FILE_OR_DIR ...]     (default: test/)
//
// Why: on llvmpipe (Mesa's software GPU) the suites' time is mostly the driver compiling kernels, one
// kernel at a time on one core per process; two processes use both cores of a 2-core machine. Each
// worker (scripts/test-worker.mjs) runs whole files as uvu's CLI does (uvu's own exec(), same output,
// same FORCE_COLOR=1); files are handed out longest first, by the durations of the last run
// (.cache/test-times.json, else the committed scripts/test-times.json), so the workers finish together.
// (Those files map each test file to its seconds; only the order matters. After a full run on Mesa 25,
// `cp .cache/test-times.json scripts/test-times.json` refreshes the committed one.) Each file's output
// is printed as one block when it ends, with its time; the run ends with uvu's totals, the slowest files
// and tests and the failed files, and exits 1 if any file failed.
//
// The environment, set here before any worker starts (uvu imports the suites before running them):
// - LP_NATIVE_VECTOR_WIDTH=128 unless it is set or --driver-width is given: llvmpipe's 128-bit vectors
//   instead of the host's 256 (AVX2), which halves Mesa 25's kernel compile time (docs/drivers.md). It
//   only concerns llvmpipe. `npm run test:drivers` keeps the driver's default width (--driver-width),
//   so CI runs both widths.
// - XDG_CACHE_HOME: an empty folder per worker, so no run reads the user's ~/.cache/milora (a device's
//   calibration) and concurrent workers never share one; MESA_SHADER_CACHE_DIR is pinned to where Mesa
//   would have kept its shader cache (unless set), so that cache still carries over between runs.
// - MILORA_TEST_JOBS=N does what --jobs does; the default is the machine's cores, at most 4.
// dist/ is built once (scripts/build.sh, which swaps the build in whole) before the workers start: a
// compiled package copies its runtime from dist/, and tests rebuild it while others read it.
import { fork, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { availableParallelism, homedir, tmpdir } from "node:os";
import { join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repo = resolve(fileURLToPath(import.meta.url), "../..");
process.chdir(repo);
const LOCAL_TIMES = ".cache/test-times.json";
const SEED_TIMES = "scripts/test-times.json";
const PATTERN = /\.test\.ts$/;

// --- arguments ---
let jobs = Number(process.env.MILORA_TEST_JOBS ?? 0) || Math.min(availableParallelism(), 4);
let driverWidth = false;
const roots = [];
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === "--jobs" || a === "-j") jobs = Number(process.argv[++i]);
  else if (a.startsWith("--jobs=")) jobs = Number(a.slice(7));
  else if (a === "--driver-width") driverWidth = true;
  else if (a === "--help" || a === "-h") {
    console.log("usage: node scripts/test.mjs [--jobs N] [--driver-width] [FILE_OR_DIR ...]");
    process.exit(0);
  } else roots.push(a);
}
if (!Number.isInteger(jobs) || jobs < 1) {
  console.error("test: --jobs takes a whole number of workers, at least 1");
  process.exit(2);
}

function collect(path, out) {
  const s = statSync(path);
  if (s.isFile()) out.push(relative(repo, resolve(path)));
  else for (const name of readdirSync(path).sort()) {
    if (name === "node_modules" || name.startsWith(".")) continue;
    const child = join(path, name);
    if (statSync(child).isDirectory() || PATTERN.test(name)) collect(child, out);
  }
  return out;
}
const files = [...new Set((roots.length > 0 ? roots : ["test"]).flatMap((r) => collect(r, [])))];
if (files.length === 0) {
  console.error(`test: no test files under ${roots.join(" ")}`);
  process.exit(1);
}

// --- expected durations: longest first ---
function readTimes(path) {
  try { return JSON.parse(readFileSync(path, "utf8")); } catch { return {}; }
}
const times = { ...readTimes(SEED_TIMES), ...readTimes(LOCAL_TIMES) };
const known = files.map((f) => times[f]).filter((t) => typeof t === "number").sort((a, b) => a - b);
const guess = known.length > 0 ? known[Math.floor(known.length / 2)] : 10;
const expected = (f) => (typeof times[f] === "number" ? times[f] : guess);
const queue = [...files].sort((a, b) => expected(b) - expected(a) || (a < b ? -1 : 1));
jobs = Math.min(jobs, files.length);

// --- environment ---
const env = { ...process.env, FORCE_COLOR: "1" };
if (env.LP_NATIVE_VECTOR_WIDTH === undefined && !driverWidth) env.LP_NATIVE_VECTOR_WIDTH = "128";
if (env.MESA_SHADER_CACHE_DIR === undefined && env.MESA_GLSL_CACHE_DIR === undefined) {
  env.MESA_SHADER_CACHE_DIR = env.XDG_CACHE_HOME ? env.XDG_CACHE_HOME : join(homedir(), ".cache");
}
const runDir = mkdtempSync(join(tmpdir(), "milora-test-"));

const width = env.LP_NATIVE_VECTOR_WIDTH ?? "driver default";
console.log(`test: ${files.length} files, ${jobs} worker${jobs === 1 ? "" : "s"}, LP_NATIVE_VECTOR_WIDTH=${width}`);

// --- dist/ before anything reads it ---
{
  const t = performance.now();
  const build = spawnSync("bash", ["scripts/build.sh"], { encoding: "utf8", env: process.env });
  const took = ((performance.now() - t) / 1000).toFixed(1);
  if (build.status === 0) console.log(`test: dist/ built (${took} s)`);
  else console.log(`test: npm run build exited ${build.status} (${took} s); the tests that use dist/ will say more\n${build.stdout}${build.stderr}`);
}

// --- workers ---
const dim = (s) => (process.stdout.isTTY ? `\x1b[2m${s}\x1b[22m` : s);
const results = [];
const started = performance.now();
let live = 0;
let nextId = 1;
let finish;
const allDone = new Promise((r) => { finish = r; });

function print(text) {
  process.stdout.write(text.endsWith("\n") ? text : `${text}\n`);
}

/** A file's block: its name and time, then what uvu printed for it, less exec()'s totals (the run's come at the end). */
function block(file, output, note) {
  const bold = (t) => (process.stdout.isTTY || env.FORCE_COLOR === "1" ? `\x1b[1m\x1b[4m${t}\x1b[24m\x1b[22m` : t);
  const cut = output.search(/\n[^\n]*Total:\s/);
  let body = cut >= 0 ? output.slice(0, cut) : output;
  const lines = body.split("\n");
  if (lines.length > 0 && lines[0].replace(/\x1b\[[0-9;]*m/g, "").trim() === file) lines.shift(); // uvu's own file line
  body = lines.join("\n").replace(/^\n+/, "").replace(/\s+$/, "").replace(/\n((?:\x1b\[[0-9;]*m)+)$/, "$1");
  return `${bold(file)}  ${note}${body ? `\n${body}` : ""}`;
}

function startWorker() {
  const id = nextId++;
  const cache = join(runDir, `worker-${id}`, "cache");
  mkdirSync(cache, { recursive: true });
  const child = fork(join(repo, "scripts/test-worker.mjs"), [], {
    execArgv: ["--import", "tsx"],
    env: { ...env, XDG_CACHE_HOME: cache },
    stdio: ["ignore", "pipe", "pipe", "ipc"],
  });
  live++;
  let current = null;
  let output = "";
  let fileStart = 0;
  const raw = (chunk) => {
    // Written straight to the process's descriptors (native code, child processes with inherited stdio).
    if (current !== null) output += chunk.toString();
    else process.stdout.write(chunk.toString().replace(/^(?=.)/gm, `[${id}] `));
  };
  child.stdout.on("data", raw);
  child.stderr.on("data", raw);
  const next = () => {
    const file = queue.shift();
    if (file === undefined) { current = null; child.send({ type: "exit" }); return; }
    current = file;
    output = "";
    fileStart = performance.now();
    child.send({ type: "run", file });
  };
  child.on("message", (m) => {
    if (m.type === "ready") next();
    else if (m.type === "out" && m.file === current) output += m.text;
    else if (m.type === "done") {
      const seconds = m.ms / 1000;
      results.push({ ...m, seconds, worker: id });
      const status = m.failed ? "FAILED" : "";
      print(block(m.file, output + (m.crashed ? `\n${m.crashed}\n` : ""), dim(`${seconds.toFixed(1)} s, worker ${id}`) + (status ? `  ${status}` : "")));
      next();
    }
  });
  child.on("exit", (code, signal) => {
    live--;
    if (current !== null) {
      const seconds = (performance.now() - fileStart) / 1000;
      results.push({ file: current, seconds, total: 0, passed: 0, skipped: 0, failed: true, worker: id });
      print(block(current, output, `FAILED: worker ${id} exited (${signal ?? `code ${code}`}) while running this file, after ${seconds.toFixed(1)} s`));
      current = null;
      if (queue.length > 0) startWorker();
    }
    if (live === 0) finish();
  });
}

const stop = (signal) => () => { rmSync(runDir, { recursive: true, force: true }); process.exit(signal === "SIGINT" ? 130 : 143); };
process.on("SIGINT", stop("SIGINT"));
process.on("SIGTERM", stop("SIGTERM"));

for (let i = 0; i < jobs; i++) startWorker();
await allDone;
rmSync(runDir, { recursive: true, force: true });

// --- totals ---
const wall = (performance.now() - started) / 1000;
const sum = (k) => results.reduce((s, r) => s + (r[k] ?? 0), 0);
const failed = results.filter((r) => r.failed);
const missing = files.filter((f) => !results.some((r) => r.file === f));
const busy = new Map();
for (const r of results) busy.set(r.worker, (busy.get(r.worker) ?? 0) + r.seconds);

if (failed.length === 0 && missing.length === 0) {
  // Durations for the next run's order: this run's, over the last ones (files not run keep theirs).
  const next = { ...readTimes(LOCAL_TIMES) };
  for (const r of results) next[r.file] = Math.round(r.seconds * 10) / 10;
  const sorted = Object.fromEntries(Object.keys(next).sort().map((k) => [k, next[k]]));
  mkdirSync(".cache", { recursive: true });
  writeFileSync(LOCAL_TIMES, `${JSON.stringify(sorted, null, 1)}\n`);
}

const slowest = [...results].sort((a, b) => b.seconds - a.seconds).slice(0, 10);
print(`\nSlowest files:\n${slowest.map((r) => `  ${r.seconds.toFixed(1).padStart(7)} s  ${r.file}`).join("\n")}`);
const slowTests = results.flatMap((r) => (r.tests ?? []).map((t) => ({ ...t, file: r.file }))).sort((a, b) => b.ms - a.ms).slice(0, 10);
if (slowTests.length > 0) print(`Slowest tests:\n${slowTests.map((t) => `  ${(t.ms / 1000).toFixed(1).padStart(7)} s  ${t.file}: ${t.name}`).join("\n")}`);
print(
  [
    "",
    `  Files:     ${results.length}${failed.length ? ` (${failed.length} failed)` : ""}`,
    `  Total:     ${sum("total")}`,
    `  Passed:    ${sum("passed")}`,
    `  Skipped:   ${sum("skipped")}`,
    `  Duration:  ${wall.toFixed(1)} s (${jobs} worker${jobs === 1 ? "" : "s"}, busy ${[...busy.values()].map((s) => `${s.toFixed(0)} s`).join(" + ")}; LP_NATIVE_VECTOR_WIDTH=${width})`,
    "",
  ].join("\n"),
);
if (failed.length > 0 || missing.length > 0) {
  for (const r of failed) print(`FAILED  ${r.file}`);
  for (const f of missing) print(`NOT RUN ${f}`);
  process.exitCode = 1;
}
