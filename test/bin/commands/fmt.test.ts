import { chmodSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { fmtCommand } from "../../../bin/commands/fmt.ts";

const MESSY = "base m: llama { layers 2\n heads 4 }\n";
const TIDY = "base m: llama {\n  layers 2\n  heads 4\n}\n";

/** Runs the command with stdout and stderr captured (so not a terminal: no colour). */
async function run(files: string[], opts: { write?: boolean; check?: boolean } = {}) {
  let stdout = "";
  let stderr = "";
  const out = process.stdout.write;
  const err = process.stderr.write;
  const tty = process.stderr.isTTY;
  process.stderr.isTTY = false;
  process.stdout.write = ((chunk: string) => ((stdout += chunk), true)) as typeof process.stdout.write;
  process.stderr.write = ((chunk: string) => ((stderr += chunk), true)) as typeof process.stderr.write;
  try {
    const code = await fmtCommand(files, opts);
    return { code, stdout, stderr };
  } finally {
    process.stdout.write = out;
    process.stderr.write = err;
    process.stderr.isTTY = tty;
  }
}

let dir = "";
test.before.each(() => {
  dir = mkdtempSync(join(tmpdir(), "milora-fmt-"));
});
test.after.each(() => rmSync(dir, { recursive: true, force: true }));

function file(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

test("prints the formatted text of one file", async () => {
  assert.equal(await run([file("a.milora", MESSY)]), { code: 0, stdout: TIDY, stderr: "" });
});

test("--write rewrites files that change, leaves no temp files behind", async () => {
  const messy = file("a.milora", MESSY);
  const tidy = file("b.milora", TIDY);
  const result = await run([messy, tidy], { write: true });
  assert.equal(result, { code: 0, stdout: `formatted ${messy}\n`, stderr: "" });
  assert.is(readFileSync(messy, "utf8"), TIDY);
  assert.equal(readdirSync(dir).sort(), ["a.milora", "b.milora"]);
});

test("--check lists unformatted files and exits 1", async () => {
  const messy = file("a.milora", MESSY);
  const result = await run([messy, file("b.milora", TIDY)], { check: true });
  assert.is(result.code, 1);
  assert.is(result.stdout, `${messy}\n`);
  assert.is(readFileSync(messy, "utf8"), MESSY);
  assert.equal(await run([file("c.milora", TIDY)], { check: true }), { code: 0, stdout: "", stderr: "" });
});

test("a file with syntax errors is refused with its diagnostics", async () => {
  const broken = file("bad.milora", "base m: llama {\n  layers\n}\n");
  const result = await run([broken], { write: true });
  assert.is(result.code, 1);
  assert.is(result.stdout, "");
  assert.is(
    result.stderr,
    [
      `${broken}:3:1: error MIL002: expected a value (a number, a string, true, false or a name) after "layers", found "}"`,
      " 3 | }",
      "   | ^",
      `milora fmt: ${broken} has syntax errors; not formatted`,
      "",
    ].join("\n"),
  );
  assert.is(readFileSync(broken, "utf8"), "base m: llama {\n  layers\n}\n");
});

test("a missing file is a clear message and exit 2", async () => {
  const missing = join(dir, "nope.milora");
  assert.equal(await run([missing]), { code: 2, stdout: "", stderr: `milora fmt: cannot read ${missing}: no such file\n` });
});

test("several files need --write or --check", async () => {
  const result = await run([file("a.milora", TIDY), file("b.milora", TIDY)]);
  assert.is(result.code, 2);
  assert.match(result.stderr, "give one file to print");
});

test("--write through a symbolic link formats the target and keeps the link", async () => {
  mkdirSync(join(dir, "shared"));
  const target = file("shared/common.milora", MESSY);
  const link = join(dir, "common.milora");
  symlinkSync("shared/common.milora", link);
  const { code, stdout } = await run([link], { write: true });
  assert.is(code, 0);
  assert.is(stdout, `formatted ${link}\n`);
  assert.ok(lstatSync(link).isSymbolicLink(), "the link is still a link");
  assert.is(readlinkSync(link), "shared/common.milora");
  assert.is(readFileSync(target, "utf8"), TIDY);
  assert.equal(readdirSync(join(dir, "shared")), ["common.milora"], "the temp file went beside the target and is gone");
  assert.equal(readdirSync(dir).sort(), ["common.milora", "shared"]);
});

test("--write keeps the file's mode", async () => {
  const path = file("exec.milora", MESSY);
  chmodSync(path, 0o640);
  await run([path], { write: true });
  assert.is(statSync(path).mode & 0o777, 0o640);
});

test.run();
