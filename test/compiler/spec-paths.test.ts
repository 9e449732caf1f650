// What a spec may read besides itself: imports name .milora specs, `from` names a Hugging Face config
// (a .json file or a model directory). A path to anything else is named in one diagnostic and its
// contents never appear in what milora prints.
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { checkFiles, type CheckResult } from "../../compiler/check.ts";
import { renderDiagnostic } from "../../grammar/code-frame.ts";

const root = mkdtempSync(join(tmpdir(), "milora-spec-paths-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

const SECRET = "root:x:0:0:root:/root:/bin/bash\nalice:$6$hash-of-a-password:19000:0:99999:7:::\n";
const BASE = "base b: llama { hidden_size 64 layers 2 heads 4 intermediate_size 128 vocab_size 100 }\n";
const CONFIG = { model_type: "llama", hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 176, vocab_size: 512 };

let n = 0;
/** A fresh directory holding `files`, and the path of its `main.milora` holding `main`. */
function project(main: string, files: Record<string, string> = {}): { dir: string; spec: string } {
  const dir = join(root, `p${n++}`);
  for (const [name, text] of Object.entries({ ...files, "main.milora": main })) {
    mkdirSync(join(dir, name, ".."), { recursive: true });
    writeFileSync(join(dir, name), text);
  }
  return { dir, spec: join(dir, "main.milora") };
}

/** Everything `milora check` would print for the result: every diagnostic with its code frame. */
function printed(result: CheckResult): string {
  return result.diagnostics.map((d) => renderDiagnostic(d, result.sources.get(d.span.file))).join("\n");
}

test("an import of a file that is not a .milora spec is one diagnostic naming it, never its text", () => {
  const { dir, spec } = project('import "../private/passwd"\n' + BASE, { "../private/passwd": SECRET });
  const result = checkFiles([spec]);
  assert.equal(
    result.diagnostics.map((d) => [d.code, d.message]),
    [["MIL301", `${join(dir, "../private/passwd")} is not a .milora spec: an import must name a .milora file`]],
  );
  assert.not.match(printed(result), "root:x");
  assert.not.match(printed(result), "alice");
  assert.equal([...result.sources.keys()], [spec], "only the spec itself was read");
});

test("a .milora name that links to another file, a directory, or binary data is not a spec either", () => {
  const { dir, spec } = project('import "lib.milora"\nimport "folder.milora"\nimport "blob.milora"\n' + BASE, {
    "secret.txt": SECRET,
    "folder.milora/x": "",
    "blob.milora": "base \u0000\u0001\u0002 " + SECRET,
  });
  symlinkSync(join(dir, "secret.txt"), join(dir, "lib.milora"));
  const result = checkFiles([spec]);
  assert.equal(
    result.diagnostics.map((d) => [d.code, d.message]),
    [
      ["MIL301", `${join(dir, "lib.milora")} is a link to ${join(dir, "secret.txt")}, which is not a .milora spec`],
      ["MIL301", `${join(dir, "folder.milora")} is a directory, not a .milora spec`],
      ["MIL301", `${join(dir, "blob.milora")} is not a .milora spec: it holds binary data, not text`],
    ],
  );
  assert.not.match(printed(result), "root:x");
});

test("an absolute import is used as it is", () => {
  const lib = project(BASE).spec; // a spec elsewhere, named by its absolute path
  const { spec } = project(`import "${lib}"\nadapter a on b { experts q_proj { rank 4 } router off }\n`);
  const result = checkFiles([spec]);
  assert.equal(result.diagnostics, []);
  assert.equal(result.program.adapters.map((a) => a.base.name), ["b"]);
  assert.ok(result.sources.has(lib));
});

test("a spec with syntax errors that is imported by name still shows its errors in place", () => {
  const { dir, spec } = project('import "lib.milora"\n', { "lib.milora": "base b: llama { layers }\n" });
  const result = checkFiles([spec]);
  assert.ok(result.diagnostics.length > 0);
  assert.ok(result.diagnostics.every((d) => d.span.file === join(dir, "lib.milora")));
  assert.match(printed(result), "layers }", "a .milora file is a spec: its code frames are shown");
});

test("`from` names a .json config or a model directory holding config.json, and nothing else", () => {
  const { dir, spec } = project('base x from "../etc/shadow"\nbase y from "model"\nbase z from "model/config.json"\n', {
    "../etc/shadow": SECRET,
    "model/config.json": JSON.stringify(CONFIG),
  });
  const result = checkFiles([spec]);
  assert.equal(
    result.diagnostics.map((d) => [d.code, d.message]),
    [["MIL303", `${join(dir, "../etc/shadow")} is not a Hugging Face config: \`from\` names a .json file or a model directory holding config.json`]],
  );
  assert.not.match(printed(result), "root:x");
  assert.equal(result.program.bases.map((b) => [b.name, b.configPath]), [
    ["y", join(dir, "model/config.json")],
    ["z", join(dir, "model/config.json")],
  ]);
});

test("a config that is not JSON is refused with a place, never with its text", () => {
  const { spec } = project('base x from "leak/config.json"\nbase y from "dir-without"\n', {
    "leak/config.json": SECRET,
    "dir-without/README.md": "no config here",
  });
  const result = checkFiles([spec]);
  const messages = result.diagnostics.map((d) => [d.code, d.message.replace(root, "ROOT")]);
  assert.equal(messages, [
    ["MIL304", `config ${join(root, `p${n - 1}`, "leak/config.json").replace(root, "ROOT")} is not valid JSON: an unexpected character where a JSON value should be`],
    ["MIL303", `cannot read config ${join(root, `p${n - 1}`, "dir-without/config.json").replace(root, "ROOT")}: no such file`],
  ]);
  assert.not.match(printed(result), "root:x");
});

test.run();
