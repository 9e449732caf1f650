import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { readHfConfig } from "../../compiler/hf-config.ts";
import { mulberry32, seededNormal, writeRandomCheckpoint, type RandomCheckpointOptions } from "../../examples/random-checkpoint.ts";

const root = mkdtempSync(join(tmpdir(), "milora-random-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

const small: RandomCheckpointOptions = { hiddenSize: 16, layers: 1, heads: 2, kvHeads: 1, intermediateSize: 24, vocabSize: 300, seed: 5, tokenizer: true };

function filesOf(dir: string): Record<string, Buffer> {
  return Object.fromEntries(readdirSync(dir).sort().map((f) => [f, readFileSync(join(dir, f))]));
}

test("seeded generators repeat for a seed and differ between seeds", () => {
  const take = (next: () => number) => Array.from({ length: 5 }, next);
  assert.equal(take(mulberry32(9)), take(mulberry32(9)));
  assert.not.equal(take(mulberry32(9)), take(mulberry32(10)));
  const normals = Array.from({ length: 20000 }, seededNormal(4));
  const mean = normals.reduce((a, b) => a + b, 0) / normals.length;
  const variance = normals.reduce((a, b) => a + (b - mean) ** 2, 0) / normals.length;
  assert.ok(Math.abs(mean) < 0.03 && Math.abs(variance - 1) < 0.05, `mean ${mean}, variance ${variance}`);
});

test("the same options write the same bytes; another seed writes other weights", () => {
  writeRandomCheckpoint(join(root, "a"), small);
  writeRandomCheckpoint(join(root, "b"), small);
  writeRandomCheckpoint(join(root, "c"), { ...small, seed: 6 });
  const a = filesOf(join(root, "a"));
  assert.equal(Object.keys(a), ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
  assert.equal(filesOf(join(root, "b")), a);
  const c = filesOf(join(root, "c"));
  assert.ok(c["config.json"]!.equals(a["config.json"]!));
  assert.not.ok(c["model.safetensors"]!.equals(a["model.safetensors"]!));
});

test("config.json is a LlamaConfig the compiler reads back as the same base", () => {
  const dir = join(root, "config");
  writeRandomCheckpoint(dir, { ...small, headDim: 16, tieEmbeddings: true, ropeTheta: 500000, dtype: "BF16" });
  const config = JSON.parse(readFileSync(join(dir, "config.json"), "utf8")) as Record<string, unknown>;
  assert.equal(config.architectures, ["LlamaForCausalLM"]);
  assert.is(config.torch_dtype, "bfloat16");
  const base = readHfConfig(dir);
  assert.equal(
    [base.hiddenSize, base.layers, base.heads, base.kvHeads, base.headDim, base.intermediateSize, base.vocabSize, base.ropeTheta, base.tieEmbeddings],
    [16, 1, 2, 1, 16, 24, 300, 500000, true],
  );
});

test("an existing checkpoint with the same options is kept; other options replace it; a foreign directory is refused", () => {
  const dir = join(root, "kept");
  writeRandomCheckpoint(dir, small);
  const before = statSync(join(dir, "model.safetensors")).mtimeMs;
  writeRandomCheckpoint(dir, small);
  assert.is(statSync(join(dir, "model.safetensors")).mtimeMs, before);
  writeRandomCheckpoint(dir, { ...small, shards: 2 });
  assert.equal(readdirSync(dir).filter((f) => f.endsWith(".safetensors")).length, 2);

  const foreign = join(root, "foreign");
  mkdirSync(foreign);
  writeFileSync(join(foreign, "notes.txt"), "mine");
  assert.throws(() => writeRandomCheckpoint(foreign, small), /was not written by .*refusing to replace it/);
  assert.is(readFileSync(join(foreign, "notes.txt"), "utf8"), "mine");
});

test("impossible options are refused with the reason", () => {
  assert.throws(() => writeRandomCheckpoint(join(root, "bad1"), { ...small, kvHeads: 3 }), /heads 2 is not a multiple of kvHeads 3/);
  assert.throws(() => writeRandomCheckpoint(join(root, "bad2"), { ...small, vocabSize: 100 }), /tokenizer needs vocabSize >= 259/);
  assert.equal(readdirSync(root).filter((f) => f.startsWith("bad")), []);
});

test("the command line writes the tiny preset once", () => {
  const dir = join(root, "cli");
  const run = () => spawnSync(process.execPath, ["--import", "tsx", "examples/random-checkpoint.ts", dir, "--preset", "tiny"], { encoding: "utf8" });
  const first = run();
  assert.is(first.status, 0, first.stderr);
  const base = readHfConfig(dir);
  assert.equal([base.hiddenSize, base.layers, base.heads, base.kvHeads, base.intermediateSize, base.vocabSize, base.maxPositions], [64, 2, 4, 2, 176, 512, 256]);
  assert.ok(readdirSync(dir).includes("tokenizer.json"));
  const bad = spawnSync(process.execPath, ["--import", "tsx", "examples/random-checkpoint.ts", dir, "--preset", "huge"], { encoding: "utf8" });
  assert.is(bad.status, 2);
  assert.match(bad.stderr, "unknown preset huge (known: tiny)");
});

test.run();
