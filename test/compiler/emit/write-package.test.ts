// Writing a package directory: all or nothing, never over someone's files unless forced.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { OutputError, writePackage, type PackageFile } from "../../../compiler/emit/write-package.ts";

const root = mkdtempSync(join(tmpdir(), "milora-write-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

const files: PackageFile[] = [
  { path: "package.json", contents: "{}\n" },
  { path: "kernels/a.wgsl", contents: "// a\n" },
  { path: "cli.js", contents: "#!/usr/bin/env node\n", executable: true },
];

function refuses(out: string, list: readonly PackageFile[], message: string, force = false) {
  try {
    writePackage(out, list, { force });
    assert.unreachable("written");
  } catch (e) {
    assert.instance(e, OutputError);
    assert.match((e as Error).message, message);
  }
}

test("writes every file, creating parent folders, with bin scripts executable", () => {
  const out = join(root, "deep", "pkg");
  writePackage(out, files);
  assert.is(readFileSync(join(out, "kernels/a.wgsl"), "utf8"), "// a\n");
  assert.is(statSync(join(out, "cli.js")).mode & 0o111, 0o111);
  assert.is(statSync(join(out, "package.json")).mode & 0o111, 0);
  assert.equal(readdirSync(join(root, "deep")), ["pkg"], "no temporary directory is left beside it");
});

test("an empty existing directory is fine; one holding files is refused unless forced", () => {
  const out = join(root, "existing");
  mkdirSync(out);
  writePackage(out, files);
  refuses(out, files, "existing is not empty (cli.js, kernels, package.json): choose another --out, or pass --force");
  writeFileSync(join(out, "stale.txt"), "old");
  writePackage(out, [{ path: "package.json", contents: "{ }\n" }], { force: true });
  assert.equal(readdirSync(out), ["package.json"], "--force replaces the directory whole");
});

test("a path that is a file is refused", () => {
  const out = join(root, "a-file");
  writeFileSync(out, "x");
  refuses(out, files, "exists and is not a directory", true);
});

test("a failed write leaves neither a half package nor a temporary directory", () => {
  const out = join(root, "broken");
  // `x` as a file and as a folder cannot both be written
  const clash: PackageFile[] = [
    { path: "x", contents: "file" },
    { path: "x/y", contents: "nested" },
  ];
  assert.throws(() => writePackage(out, clash));
  assert.not.ok(existsSync(out));
  assert.equal(readdirSync(root).filter((n) => n.includes("broken")), []);
});

test.run();
