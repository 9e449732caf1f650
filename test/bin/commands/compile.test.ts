// `milora compile` as a user runs it: the package lands in --out, a non-empty --out is refused unless
// --force, and a spec with errors prints them and writes nothing.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";

const dir = mkdtempSync(join(tmpdir(), "milora-compile-cli-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

const MILORA = new URL("../../../bin/milora.js", import.meta.url).pathname;
const TINY = new URL("../../../examples/llama-tiny.milora", import.meta.url).pathname;

function milora(...args: string[]) {
  return miloraIn(process.cwd(), ...args);
}

function miloraIn(cwd: string, ...args: string[]) {
  const run = spawnSync(process.execPath, [MILORA, "compile", ...args], { encoding: "utf8", cwd, timeout: 60_000 });
  return { code: run.status, stdout: run.stdout, stderr: run.stderr };
}

/** An error a user can act on: one line naming the problem, no stack trace. */
function oneLine(stderr: string): string {
  assert.not.match(stderr, /\n\s+at /, "no stack trace");
  assert.is(stderr.trimEnd().split("\n").length, 1, stderr);
  return stderr;
}

test("writes the package, refuses to overwrite it, and replaces it with --force", () => {
  const out = join(dir, "tiny");
  const first = milora("examples/llama-tiny.milora", "--adapter", "tiny", "--out", out);
  assert.is(first.code, 0, first.stderr);
  assert.match(first.stdout, `wrote ${out}: adapter tiny, 37 kernels`); // 26 base and LoRA kernels (the DoRA-capable expand of q_proj/o_proj width twice: o_proj reads the residual back; four shrinks: q/k/v as one and gate/up as one, both in 64, beside o_proj's in 64 and down_proj's in 176) + 5 matvecs with the LoRA epilogue (one per module shape and residual) + the router's score (attention pooling), pool and gate + beam top-k + logit processing and the chosen logprob
  const manifest = readFileSync(join(out, "manifest.json"), "utf8");

  const again = milora("examples/llama-tiny.milora", "--adapter", "tiny", "--out", out);
  assert.is(again.code, 3, "an --out that cannot be written as asked");
  assert.match(again.stderr, `milora compile: ${out} is not empty`);
  assert.match(again.stderr, "pass --force to replace it");

  writeFileSync(join(out, "notes.txt"), "mine");
  const forced = milora("examples/llama-tiny.milora", "--adapter", "tiny", "--out", out, "--force");
  assert.is(forced.code, 0, forced.stderr);
  assert.not.ok(existsSync(join(out, "notes.txt")));
  assert.is(readFileSync(join(out, "manifest.json"), "utf8"), manifest, "the same spec compiles to the same bytes");
});

test("a spec with errors prints each with its place and writes nothing", () => {
  const spec = join(dir, "broken.milora");
  writeFileSync(spec, "base b: llama { layers 2 }\nadapter a on b { experts all { rank 0 } }\n");
  const out = join(dir, "broken-out");
  const { code, stderr } = milora(spec, "--out", out);
  assert.is(code, 1);
  assert.match(stderr, "broken.milora:2:");
  assert.match(stderr, "nothing written");
  assert.not.ok(existsSync(out));
});

test("--out . --force never deletes the working directory or the spec in it", () => {
  const work = join(dir, "work");
  mkdirSync(work);
  writeFileSync(join(work, "tiny.milora"), readFileSync(TINY, "utf8"));
  for (const flag of ["--force", "--force-any"]) {
    const { code, stderr } = miloraIn(work, "tiny.milora", "--adapter", "tiny", "--out", ".", flag);
    assert.is(code, 3);
    assert.match(oneLine(stderr), "milora compile: refusing to write .: it is the current directory, and replacing it would delete everything in it");
  }
  const up = miloraIn(work, "tiny.milora", "--adapter", "tiny", "--out", "..", "--force-any");
  assert.match(oneLine(up.stderr), `it is an ancestor of the current directory (${work})`);
  assert.equal(readdirSync(work), ["tiny.milora"]);
});

test("--force replaces only what milora compile wrote; --force-any is the flag for anything else, never for the spec", () => {
  const theirs = join(dir, "theirs");
  mkdirSync(theirs);
  writeFileSync(join(theirs, "data.csv"), "1,2,3");
  const forced = milora(TINY, "--adapter", "tiny", "--out", theirs, "--force");
  assert.is(forced.code, 3);
  assert.match(oneLine(forced.stderr), "--force would delete its 1 entry (data.csv); choose another --out, or pass --force-any to replace it anyway");
  assert.ok(existsSync(join(theirs, "data.csv")));

  writeFileSync(join(theirs, "spec.milora"), readFileSync(TINY, "utf8"));
  const spec = milora(join(theirs, "spec.milora"), "--adapter", "tiny", "--out", theirs, "--force-any");
  assert.match(oneLine(spec.stderr), `it holds ${join(theirs, "spec.milora")}, which this compile reads`);
  rmSync(join(theirs, "spec.milora"));

  const any = milora(TINY, "--adapter", "tiny", "--out", theirs, "--force-any");
  assert.is(any.code, 0, any.stderr);
  assert.not.ok(existsSync(join(theirs, "data.csv")));
  assert.ok(existsSync(join(theirs, ".milora-package")));
});

test("an --out that cannot be a directory is a one-line error, not a stack trace or a hang", () => {
  const file = join(dir, "afile");
  writeFileSync(file, "");
  const cases: [string, string][] = [
    [join(file, "sub"), `cannot write ${join(file, "sub")}: ${file} is a file, not a directory`],
    ["/proc/milora-x", "cannot write /proc/milora-x: cannot create a directory in /proc"],
    ["/proc/milora-x/y", "cannot write /proc/milora-x/y: cannot create the directory /proc/milora-x"],
    [file, `${file} exists and is not a directory`],
  ];
  for (const [out, message] of cases) {
    const { code, stderr } = milora(TINY, "--adapter", "tiny", "--out", out);
    assert.is(code, 3, `${out}: ${stderr}`);
    assert.match(oneLine(stderr), `milora compile: ${message}`);
  }
});

test.run();
