// A compiled package's command line (runtime/package/cli.ts) prints its failures as milora's own
// commands do: one line, no stack, the kind's exit status; --help lists the statuses. No device needed.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { runPackageCli } from "../../../runtime/package/cli.ts";

const root = mkdtempSync(join(tmpdir(), "milora-package-cli-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

/** Runs the CLI with stdout and stderr captured. */
async function cli(...argv: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  let stdout = "";
  let stderr = "";
  const out = process.stdout.write;
  const err = process.stderr.write;
  process.stdout.write = ((chunk: string) => ((stdout += chunk), true)) as typeof process.stdout.write;
  process.stderr.write = ((chunk: string) => ((stderr += chunk), true)) as typeof process.stderr.write;
  try {
    return { status: await runPackageCli(root, argv), stdout, stderr };
  } finally {
    process.stdout.write = out;
    process.stderr.write = err;
  }
}

test("a usage error: one line with the hint, exit 2", async () => {
  assert.equal(await cli("--tokens", "1,2"), { status: 2, stdout: "", stderr: "--base DIR is required (run with --help for usage)\n" });
  assert.equal((await cli("--base", root, "--tokens", "1,x")).stderr, '--tokens must be an integer >= 0, got "x" (run with --help for usage)\n');
  assert.is((await cli("--bogus")).status, 2);
});

test("a folder that is not a package: a package error, one line, exit 6", async () => {
  const run = await cli("--base", root, "--tokens", "1");
  assert.equal(run, { status: 6, stdout: "", stderr: `${root} is not a compiled milora package: it has no manifest.json\n` });
});

test("--help lists every exit status", async () => {
  const help = await cli("--help");
  assert.is(help.status, 0);
  assert.match(help.stdout, /Exit status:\n {3}0 {2}success\n {3}1 {2}/);
  assert.match(help.stdout, / {3}6 {2}a compiled package that is damaged/);
  assert.match(help.stdout, / {2}70 {2}an internal error/);
});

test.run();
