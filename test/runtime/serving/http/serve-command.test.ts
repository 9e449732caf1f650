// `milora serve` as a process: settings that would weaken it are refused at start, SIGTERM drains and
// exits, and a second signal exits at once even while requests are still running.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PRESETS, writeRandomCheckpoint } from "../../../../examples/random-checkpoint.ts";

const milora = new URL("../../../../bin/milora.js", import.meta.url).pathname;
const root = mkdtempSync(join(tmpdir(), "milora-serve-cmd-"));
const model = join(root, "tiny");
writeRandomCheckpoint(model, { ...PRESETS.tiny, seed: 11, tokenizer: true });
test.after(() => rmSync(root, { recursive: true, force: true }));

interface Run {
  readonly child: ChildProcess;
  readonly stderr: () => string;
  readonly exited: Promise<number | null>;
}

function serve(args: readonly string[], env: NodeJS.ProcessEnv = {}): Run {
  const child = spawn(process.execPath, [milora, "serve", "--base", model, "--port", "0", ...args], { env: { ...process.env, ...env }, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (d) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code, signal) => resolve(code ?? (signal ? -1 : null))));
  const killer = setTimeout(() => child.kill("SIGKILL"), 120_000);
  void exited.then(() => clearTimeout(killer));
  return { child, stderr: () => stderr, exited };
}

/** The server's base URL once it is listening. */
async function listening(run: Run): Promise<string> {
  const until = Date.now() + 90_000;
  for (;;) {
    const url = /milora serve: (http:\/\/[^\s]+)\/v1/.exec(run.stderr())?.[1];
    if (url) return url;
    if (Date.now() > until || run.child.exitCode !== null) throw new Error(`the server did not start:\n${run.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test("an empty API key is refused at start, from the flag or the environment", async () => {
  const flag = serve(["--api-key", ""]);
  assert.is(await flag.exited, 2);
  assert.match(flag.stderr(), "--api-key is empty");
  const env = serve([], { MILORA_API_KEY: "" });
  assert.is(await env.exited, 2);
  assert.match(env.stderr(), "MILORA_API_KEY is empty");
});

test("run-time adapter loading needs an adapter root", async () => {
  const run = serve(["--allow-adapter-loading"]);
  assert.is(await run.exited, 2);
  assert.match(run.stderr(), "--allow-adapter-loading needs --adapter-root DIR");
});

test("SIGTERM drains and exits 0; a second signal while requests run exits at once", async () => {
  const quiet = serve([]);
  await listening(quiet);
  quiet.child.kill("SIGTERM");
  assert.is(await quiet.exited, 0, quiet.stderr());

  const busy = serve(["--max-sequences", "1"]);
  const url = await listening(busy);
  const body = JSON.stringify({ model: "tiny", prompt: "hello", max_tokens: 100, temperature: 0, ignore_eos: true, stream: true });
  const streams = Array.from({ length: 4 }, () => fetch(`${url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body }).catch(() => undefined));
  const first = await streams[0];
  await first?.body?.getReader().read(); // generation is under way
  busy.child.kill("SIGTERM");
  await new Promise((r) => setTimeout(r, 200));
  const second = Date.now();
  busy.child.kill("SIGTERM");
  assert.is(await busy.exited, 143, busy.stderr());
  assert.ok(Date.now() - second < 3000);
  assert.match(busy.stderr(), "SIGTERM again, exiting now");
  await Promise.all(streams);
});

test.run();
