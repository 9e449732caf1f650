// Writing a package directory: all or nothing, never over someone's files unless forced, and never
// over the current directory, its ancestors or the spec whatever the flags.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { OutputError, PACKAGE_MARKER, writePackage, type PackageFile, type WriteOptions } from "../../../compiler/emit/write-package.ts";

const root = mkdtempSync(join(tmpdir(), "milora-write-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

const files: PackageFile[] = [
  { path: "package.json", contents: "{}\n" },
  { path: "kernels/a.wgsl", contents: "// a\n" },
  { path: "cli.js", contents: "#!/usr/bin/env node\n", executable: true },
];

function refuses(out: string, list: readonly PackageFile[], message: string, force: boolean | WriteOptions = false) {
  try {
    writePackage(out, list, typeof force === "boolean" ? { force } : force);
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
  refuses(out, files, `existing is not empty (${PACKAGE_MARKER}, cli.js, kernels, ...): choose another --out, or pass --force`);
  writeFileSync(join(out, "stale.txt"), "old");
  writePackage(out, [{ path: "package.json", contents: "{ }\n" }], { force: true });
  assert.equal(readdirSync(out), [PACKAGE_MARKER, "package.json"], "--force replaces the directory whole");
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

test("every package holds the marker that lets --force replace it later", () => {
  const out = join(root, "marked");
  writePackage(out, files);
  assert.match(readFileSync(join(out, PACKAGE_MARKER), "utf8"), "written by `milora compile`");
});

test("a directory milora did not write is replaced only with forceAny, and the refusal says what would go", () => {
  const out = join(root, "theirs");
  mkdirSync(out);
  writeFileSync(join(out, "thesis.tex"), "years of work");
  writeFileSync(join(out, "notes.md"), "more");
  refuses(out, files, "theirs is not empty (notes.md, thesis.tex) and was not written by milora compile (no .milora-package): choose another --out, or pass --force-any");
  refuses(out, files, "refusing to replace " + out + ": it was not written by milora compile (no .milora-package), and --force would delete its 2 entries (notes.md, thesis.tex); choose another --out, or pass --force-any", true);
  assert.is(readFileSync(join(out, "thesis.tex"), "utf8"), "years of work");
  writePackage(out, files, { forceAny: true });
  assert.not.ok(existsSync(join(out, "thesis.tex")));
  assert.ok(existsSync(join(out, PACKAGE_MARKER)));
});

test("the current directory and its ancestors are never replaced, whatever the flags", () => {
  const work = join(root, "cwd", "project");
  mkdirSync(work, { recursive: true });
  writeFileSync(join(work, "spec.milora"), "spec");
  writeFileSync(join(work, PACKAGE_MARKER), "a package, even"); // the marker does not make it fair game
  const before = process.cwd();
  process.chdir(work);
  try {
    for (const out of [".", "..", work, join(root, "cwd")]) {
      refuses(out, files, "no flag overrides this", { force: true, forceAny: true });
    }
    refuses(".", files, "refusing to write .: it is the current directory, and replacing it would delete everything in it", { forceAny: true });
    refuses("..", files, `refusing to write ..: it is an ancestor of the current directory (${work})`, { forceAny: true });
  } finally {
    process.chdir(before);
  }
  assert.is(readFileSync(join(work, "spec.milora"), "utf8"), "spec");
});

test("a directory holding a file to keep (the spec) is never replaced, even through a link", () => {
  const out = join(root, "holds-spec");
  writePackage(out, files);
  const spec = join(out, "src", "my.milora");
  mkdirSync(dirname(spec));
  writeFileSync(spec, "spec");
  refuses(out, files, `refusing to write ${out}: it holds ${spec}, which this compile reads`, { force: true, forceAny: true, keep: [spec] });
  const link = join(root, "holds-spec-link");
  symlinkSync(out, link);
  refuses(link, files, "which this compile reads", { forceAny: true, keep: [spec] });
  assert.is(readFileSync(spec, "utf8"), "spec");
  writePackage(out, files, { force: true, keep: [join(root, "elsewhere.milora")] }); // a spec outside is no obstacle
  assert.not.ok(existsSync(spec));
});

test("a place that cannot hold a directory gives a clear OutputError", () => {
  const file = join(root, "plain-file");
  writeFileSync(file, "x");
  refuses(join(file, "sub", "pkg"), files, `cannot write ${join(file, "sub", "pkg")}: ${file} is a file, not a directory`);
  refuses("/proc/milora-test/pkg", files, "cannot write /proc/milora-test/pkg: cannot create the directory /proc/milora-test");
  refuses("/proc/milora-test", files, "cannot write /proc/milora-test: cannot create a directory in /proc");
});

test("temporary directories of killed compiles are removed by the next one; those of live ones are kept", () => {
  const out = join(root, "after-crash");
  writePackage(out, files);
  const dead = spawnSync(process.execPath, ["-e", ""]).pid!; // exited and reaped: its pid is free
  const stale = join(root, `.after-crash.${dead}-abc123.tmp`);
  const staleOld = join(root, `.after-crash.${dead}-abc123.old.tmp`);
  const live = join(root, `.after-crash.${process.ppid}-abc123.tmp`);
  const unrelated = join(root, `.after-crash.notes`);
  for (const d of [stale, staleOld, live]) mkdirSync(join(d, "kernels"), { recursive: true });
  writeFileSync(unrelated, "keep");
  writePackage(out, files, { force: true });
  assert.not.ok(existsSync(stale));
  assert.not.ok(existsSync(staleOld));
  assert.ok(existsSync(live), "a compile still running keeps its directory");
  assert.ok(existsSync(unrelated), "only milora's temporary names are touched");
  rmSync(live, { recursive: true });
});

test("an interrupted compile finishes its write, leaves no temporary directory, then ends as signalled", () => {
  const out = join(root, "interrupted", "pkg");
  const script = join(root, "interrupt.mts");
  writeFileSync(script, `
    import { withSignalsDeferred } from ${JSON.stringify(new URL("../../../bin/signals.ts", import.meta.url).pathname)};
    import { writePackage } from ${JSON.stringify(new URL("../../../compiler/emit/write-package.ts", import.meta.url).pathname)};
    await withSignalsDeferred(() => {
      process.kill(process.pid, "SIGTERM"); // arrives in the middle of the work
      writePackage(${JSON.stringify(out)}, ${JSON.stringify(files)});
    });
    console.log("not reached: the signal ends the process");`);
  const run = spawnSync(process.execPath, ["--import", "tsx", script], { encoding: "utf8", timeout: 60_000 });
  // Ended as interrupted: by the re-raised signal, or (when it has not landed in 2 s, as under heavy load)
  // by the fallback exit with the shell's status for it.
  assert.ok(run.signal === "SIGTERM" || run.status === 143, `signal ${run.signal}, status ${run.status}: ${run.stderr}`);
  assert.not.match(run.stdout, "not reached");
  assert.equal(readdirSync(dirname(out)), ["pkg"], "the package is whole and nothing temporary is left");
  assert.ok(existsSync(join(out, "cli.js")));
});

test.run();
