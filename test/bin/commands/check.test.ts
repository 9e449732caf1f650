// `milora check` end to end: the real command in a child process, as a user runs it.
import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "uvu";
import * as assert from "uvu/assert";

const root = fileURLToPath(new URL("../../../", import.meta.url));

function milora(...args: string[]) {
  const run = spawnSync(process.execPath, [join(root, "bin/milora.js"), ...args], { cwd: root, encoding: "utf8" });
  return { code: run.status, stdout: run.stdout, stderr: run.stderr };
}

const dir = mkdtempSync(join(tmpdir(), "milora-cli-"));
const broken = join(dir, "broken.milora");
writeFileSync(broken, "base b: llama { layers 2 }\nadapter a on b { experts all { rank 0 } }\n");

test("a good spec: exit 0, no diagnostics, a budget per adapter", () => {
  const { code, stdout } = milora("check", "--json", "examples/llama-tiny.milora");
  assert.is(code, 0);
  const report = JSON.parse(stdout);
  assert.equal(report.files, ["examples/llama-tiny.milora"]);
  assert.equal(report.diagnostics, []);
  assert.equal(
    report.adapters.map((a: { name: string; base: string }) => [a.name, a.base]),
    [
      ["tiny", "llama_tiny"],
      ["tiny_token", "llama_tiny"],
      ["tiny_lora", "llama_tiny"],
    ],
  );
  assert.is(report.adapters[0].budget.loraParams, 2 * (4 * (64 + 64) * 2 + 4 * (64 + 32) * 2 + 4 * (64 + 176) * 3));
});

test("a broken spec: exit 1 and each diagnostic with its place", () => {
  const { code, stdout } = milora("check", "--json", broken);
  assert.is(code, 1);
  const report = JSON.parse(stdout);
  assert.equal(report.diagnostics, [
    {
      file: broken,
      line: 2,
      column: 37,
      endLine: 2,
      endColumn: 38,
      code: "MIL202",
      severity: "error",
      message: "rank must be a positive integer, got 0",
      hint: null,
    },
  ]);
  assert.equal(report.adapters, []);
});

test("a missing file: exit 2 and a message on stderr", () => {
  const { code, stderr, stdout } = milora("check", "--json", join(dir, "nope.milora"));
  assert.is(code, 2);
  assert.match(stderr, /cannot read .*nope\.milora: no such file/);
  assert.is(stdout, "");
});

test("text output: code frame, summary line, then the budget table", () => {
  const bad = milora("check", "--no-color", broken);
  assert.is(bad.code, 1);
  assert.match(bad.stdout, /MIL202/);
  assert.match(bad.stdout, /1 error, 0 warnings in 1 file/);
  const good = milora("check", "--no-color", "examples/llama2-7b.milora");
  assert.is(good.code, 0);
  assert.match(good.stdout, /no problems in 1 file/);
  assert.match(good.stdout, /adapter llama2_milora on llama2_7b/);
  // 79,953,920 LoRA (rank 32) + 1,966,464 router parameters (test/compiler/examples.test.ts shows the sums).
  assert.match(good.stdout, /total trainable\s+81,920,384/);
  assert.match(good.stdout, /6,738,415,616/);
});

test.run();
