// `milora compile` as a user runs it: the package lands in --out, a non-empty --out is refused unless
// --force, and a spec with errors prints them and writes nothing.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";

const dir = mkdtempSync(join(tmpdir(), "milora-compile-cli-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

function milora(...args: string[]) {
  const run = spawnSync(process.execPath, ["bin/milora.js", "compile", ...args], { encoding: "utf8" });
  return { code: run.status, stdout: run.stdout, stderr: run.stderr };
}

test("writes the package, refuses to overwrite it, and replaces it with --force", () => {
  const out = join(dir, "tiny");
  const first = milora("examples/llama-tiny.milora", "--adapter", "tiny", "--out", out);
  assert.is(first.code, 0, first.stderr);
  assert.match(first.stdout, `wrote ${out}: adapter tiny, 25 kernels`); // 23 base and LoRA kernels + the router's pool and gate
  const manifest = readFileSync(join(out, "manifest.json"), "utf8");

  const again = milora("examples/llama-tiny.milora", "--adapter", "tiny", "--out", out);
  assert.is(again.code, 1);
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

test.run();
