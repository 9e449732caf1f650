// One error hierarchy: every user-facing error class is a MiloraError of a fixed kind, printed by the
// one printer of every CLI as a line without a stack and its kind's exit status; anything else is an
// internal error printed with its stack. Ends with the milora command doing so as a child process.
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { CompileError } from "../../compiler/emit/compile-package.ts";
import { RuntimeBuildError } from "../../compiler/emit/runtime-files.ts";
import { OutputError } from "../../compiler/emit/write-package.ts";
import { PlanError } from "../../compiler/plan.ts";
import { DeviceSelfTestError } from "../../bin/commands/self-test.ts";
import { EngineError } from "../../runtime/engine/engine-error.ts";
import { SequenceError } from "../../runtime/engine/sequence.ts";
import { AdapterStoreError } from "../../runtime/engine/tenants.ts";
import { ERROR_KINDS, INTERNAL_EXIT, MiloraError, reportError, userError } from "../../runtime/errors.ts";
import { CheckpointError } from "../../runtime/formats/safetensors.ts";
import { NoAdapterError } from "../../runtime/gpu/device.ts";
import { PackageError } from "../../runtime/package/format.ts";
import { UnsupportedError } from "../../runtime/package/loader.ts";
import { AdapterReadTimeoutError, UnknownAdapterError } from "../../runtime/serving/adapter-pool.ts";
import { DrainingError, QueueFullError, RequestError } from "../../runtime/serving/scheduler.ts";
import { DataError } from "../../runtime/training/data.ts";

/** What reportError wrote, and the status it returned. */
function printed(e: unknown, options: { program?: string; usageHint?: string } = {}): { text: string; status: number } {
  let text = "";
  const status = reportError(e, { ...options, write: (t) => void (text += t) });
  return { text, status };
}

test("every user-facing error class is a MiloraError of its kind, written out by hand", () => {
  const kinds: [Error, string][] = [
    [new CompileError("x"), "spec"],
    [new OutputError("x"), "file"],
    [new CheckpointError("x"), "checkpoint"],
    [new AdapterReadTimeoutError("a", 1000), "checkpoint"],
    [new AdapterStoreError("x"), "adapter"],
    [new UnknownAdapterError("x"), "adapter"],
    [new PackageError("x"), "package"],
    [new RuntimeBuildError("x"), "package"],
    [new DataError("x"), "data"],
    [new NoAdapterError("x"), "device"],
    [new DeviceSelfTestError("x"), "device"],
    [new EngineError("x"), "capacity"],
    [new QueueFullError(3), "capacity"],
    [new DrainingError("x"), "capacity"],
    [new SequenceError("x"), "request"],
    [new RequestError("x"), "request"],
    [new PlanError("x"), "unsupported"],
    [new UnsupportedError("x"), "unsupported"],
  ];
  for (const [e, kind] of kinds) {
    assert.instance(e, MiloraError, e.name);
    assert.is((e as MiloraError).kind, kind, e.name);
  }
  // The class names survive (messages and logs show them), and instanceof of the old class still holds.
  assert.is(new CheckpointError("x").name, "CheckpointError");
  assert.instance(new AdapterReadTimeoutError("a", 1000), CheckpointError);
});

test("a user error prints one line, PROGRAM: message, no stack, and its kind's exit status", () => {
  assert.equal(printed(new CheckpointError("model/config.json: not valid JSON"), { program: "milora run" }), {
    text: "milora run: model/config.json: not valid JSON\n",
    status: 4,
  });
  assert.equal(printed(userError("usage", "--tokens must be comma-separated token ids, got \"x\""), { usageHint: "run with --help for usage" }), {
    text: '--tokens must be comma-separated token ids, got "x" (run with --help for usage)\n',
    status: 2,
  });
  // The hint is for usage errors only.
  assert.equal(printed(new PackageError("pkg/manifest.json: field plan.kernels must be an array (it is missing)"), { usageHint: "run with --help" }), {
    text: "pkg/manifest.json: field plan.kernels must be an array (it is missing)\n",
    status: 6,
  });
  assert.equal(printed(new EngineError("all 4 sequence slots are in use")).status, 9);
});

test("a file the OS refused, naming its path, is the user's: kind file, one line", () => {
  const eacces = Object.assign(new Error("EACCES: permission denied, open '/root/x'"), { code: "EACCES", syscall: "open", path: "/root/x", errno: -13 });
  assert.equal(printed(eacces, { program: "milora compile" }), {
    text: "milora compile: cannot open /root/x (EACCES); check the path and its permissions\n",
    status: 3,
  });
});

test("anything else is an internal error, printed with its stack, exit 70", () => {
  const bug = new TypeError("Cannot read properties of undefined (reading 'kernels')");
  const { text, status } = printed(bug, { program: "milora run" });
  assert.is(status, INTERNAL_EXIT);
  assert.is(status, 70);
  const lines = text.split("\n");
  assert.is(lines[0], "milora run: internal error (a bug in milora: please report it with this output)");
  assert.is(lines[1], "TypeError: Cannot read properties of undefined (reading 'kernels')");
  assert.match(lines[2]!, /^\s+at .*errors\.test\.ts/);
  assert.match(printed("thrown text").text, /^internal error .*\nthrown text\n$/);
});

test("the exit statuses are distinct, and docs/architecture.md lists each kind with its own", () => {
  const exits = Object.values(ERROR_KINDS).map((k) => k.exit);
  assert.equal(exits, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
  const doc = readFileSync(new URL("../../docs/architecture.md", import.meta.url), "utf8");
  for (const [kind, { exit, about }] of Object.entries(ERROR_KINDS)) assert.ok(doc.includes(`| ${exit} | \`${kind}\` | ${about} |`), `docs/architecture.md: ${kind}`);
});

const milora = new URL("../../bin/milora.js", import.meta.url).pathname;
const cli = (...args: string[]) => spawnSync(process.execPath, [milora, ...args], { encoding: "utf8", timeout: 60_000 });

test("the milora command: a user error is one line and its exit status; --help lists the statuses", () => {
  const root = mkdtempSync(join(tmpdir(), "milora-errors-"));
  try {
    const missing = cli("report", join(root, "nowhere"));
    assert.is(missing.status, 2);
    assert.equal(missing.stderr.trimEnd().split("\n"), [`milora report: no ${join(root, "nowhere", "metrics.jsonl")}: give the --out directory of a milora train run (or its metrics.jsonl)`]);
    mkdirSync(join(root, "run"));
    writeFileSync(join(root, "run", "metrics.jsonl"), '{"step":1,"loss":2}\n{oops\n');
    const bad = cli("report", join(root, "run"));
    assert.is(bad.status, 7, bad.stderr);
    assert.match(bad.stderr, new RegExp(`^milora report: ${join(root, "run", "metrics.jsonl")}:2: not JSON: [^\n]*\n$`));
    const help = cli("--help");
    assert.is(help.status, 0);
    assert.match(help.stdout, /Exit status:\n {3}0 {2}success\n {3}1 {2}a \.milora spec/);
    assert.match(help.stdout, /\n {2}70 {2}an internal error \(a bug in milora\), printed with its stack\n/);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test.run();
