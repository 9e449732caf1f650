// One worker process of scripts/test.mjs, started with `node --import tsx` and an IPC channel. It runs
// uvu test files one at a time the way uvu's own CLI runs them (deferred mode: the file is imported, its
// suites queue themselves, uvu's exec() runs them and prints what uvu prints), and reports each file to
// the runner: what it wrote through process.stdout/stderr (uvu's marks and failures, console.*), its
// import and run times, and uvu's counts. The runner prints each file's output as one block.
globalThis.UVU_DEFER = 1; // set before uvu loads: suites then wait for exec() instead of running themselves
const uvu = await import("uvu");
const { pathToFileURL } = await import("node:url");
const { resolve } = await import("node:path");

const send = (message) => new Promise((done) => process.send(message, done));

// While a file runs, what is written through the streams goes to the runner, in order.
let current = null;
let captured = "";
for (const stream of [process.stdout, process.stderr]) {
  const write = stream.write.bind(stream);
  stream.write = (chunk, encoding, callback) => {
    if (current === null || !process.connected) return write(chunk, encoding, callback);
    const text = typeof chunk === "string" ? chunk : Buffer.from(chunk).toString(typeof encoding === "string" ? encoding : "utf8");
    captured += text;
    process.send({ type: "out", file: current, text });
    const done = typeof encoding === "function" ? encoding : callback;
    if (typeof done === "function") queueMicrotask(done);
    return true;
  };
}

const plain = (s) => s.replace(/\x1b\[[0-9;]*m/g, "");

// Each test's time, for the runner's list of the slowest: hooks on uvu's default suite, registered before
// each file adds its tests, so they run before the file's own before.each hooks. Only the current file's
// pair acts (a file that never runs the default suite leaves its pair behind). Tests of suites a file
// makes with suite() are timed with their file only.
let tests = [];
let generation = 0;
function timeTests() {
  const mine = ++generation;
  let start = 0;
  uvu.test.before.each(() => { start = performance.now(); });
  uvu.test.after.each((state) => { if (mine === generation) tests.push({ name: state.__test__, ms: performance.now() - start }); });
}

async function runFile(file) {
  current = file;
  captured = "";
  tests = [];
  timeTests();
  const started = performance.now();
  let importMs = null;
  let crashed = null;
  process.exitCode = 0;
  globalThis.UVU_QUEUE = [[file]];
  globalThis.UVU_INDEX = 0;
  try {
    await import(pathToFileURL(resolve(file)).href);
    importMs = performance.now() - started;
    await uvu.exec(false); // sets process.exitCode to 1 when a test failed
  } catch (error) {
    crashed = error?.stack ?? String(error);
    importMs ??= performance.now() - started;
  }
  const text = plain(captured);
  const count = (label) => Number(new RegExp(`${label}:\\s+(\\d+)`).exec(text)?.[1] ?? 0);
  const failed = crashed !== null || (process.exitCode ?? 0) !== 0;
  process.exitCode = 0;
  current = null;
  await send({ type: "done", file, ms: performance.now() - started, importMs, total: count("Total"), passed: count("Passed"), skipped: count("Skipped"), failed, crashed, tests });
}

process.on("message", (m) => {
  if (m.type === "run") void runFile(m.file);
  // Exit even if a file left a handle open (a server, a timer): every file has finished and reported.
  else if (m.type === "exit") process.exit(0);
});
await send({ type: "ready" });
