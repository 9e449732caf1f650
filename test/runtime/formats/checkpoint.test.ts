import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { randomCheckpointBase, writeRandomCheckpoint, type RandomCheckpointOptions } from "../../../examples/random-checkpoint.ts";
import { INDEX_FILE, openCheckpoint } from "../../../runtime/formats/checkpoint.ts";
import { checkpointTensors } from "../../../compiler/families.ts";
import { CheckpointError, f16BitsToF32, f32ToF16Bits } from "../../../runtime/formats/safetensors.ts";

const root = mkdtempSync(join(tmpdir(), "milora-checkpoint-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

const small: RandomCheckpointOptions = { hiddenSize: 16, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 24, vocabSize: 40, seed: 3 };
const single = join(root, "single");
const sharded = join(root, "sharded");
writeRandomCheckpoint(single, small);
writeRandomCheckpoint(sharded, { ...small, shards: 3 });

function checkpointError(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    assert.instance(e, CheckpointError);
    return (e as Error).message;
  }
  throw new Error("expected a CheckpointError");
}

test("checkpointTensors lists every LLaMA tensor with [out, in] linear shapes", () => {
  const base = randomCheckpointBase(small);
  const names = checkpointTensors(base);
  assert.is(names.length, 1 + 9 * 2 + 2);
  const shape = (n: string) => names.find((t) => t.name === n)?.shape;
  assert.equal(shape("model.embed_tokens.weight"), [40, 16]);
  assert.equal(shape("model.layers.1.self_attn.q_proj.weight"), [16, 16]);
  assert.equal(shape("model.layers.1.self_attn.k_proj.weight"), [8, 16]); // 2 kv heads of 4
  assert.equal(shape("model.layers.0.mlp.down_proj.weight"), [16, 24]);
  assert.equal(shape("lm_head.weight"), [40, 16]);
  assert.not.ok(checkpointTensors({ ...base, tieEmbeddings: true }).some((t) => t.name === "lm_head.weight"));
});

test("a sharded checkpoint holds the same weights as the single file", () => {
  const a = openCheckpoint(single);
  const b = openCheckpoint(sharded);
  const files = new Set(b.names().map((n) => b.tensorInfo(n)!.file));
  assert.equal([...files].sort(), ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]);
  assert.equal(b.names().sort(), a.names().sort());
  for (const { name, shape } of checkpointTensors(randomCheckpointBase(small))) {
    assert.equal(b.readF32(name, shape), a.readF32(name, shape), name);
  }
  assert.is(a.config.hidden_size, 16);
  a.close();
  b.close();
});

test("F16 checkpoints hold the F32 weights rounded to half precision", () => {
  const dir = join(root, "f16");
  writeRandomCheckpoint(dir, { ...small, dtype: "F16" });
  const full = openCheckpoint(single);
  const half = openCheckpoint(dir);
  assert.is(half.tensorInfo("model.norm.weight")?.dtype, "F16");
  const rounded = full.readF32("model.layers.0.mlp.up_proj.weight", [24, 16]).map((x) => f16BitsToF32(f32ToF16Bits(x)));
  assert.equal(half.readF32("model.layers.0.mlp.up_proj.weight", [24, 16]), rounded);
  full.close();
  half.close();
});

test("reading reports progress up to the checkpoint's total bytes", () => {
  const seen: [number, number][] = [];
  const ckpt = openCheckpoint(sharded, { onProgress: (done, total) => seen.push([done, total]) });
  for (const { name, shape } of checkpointTensors(randomCheckpointBase(small))) ckpt.readF32(name, shape);
  ckpt.close();
  const total = ckpt.totalBytes;
  assert.is(total, ckpt.names().reduce((n, name) => n + ckpt.tensorInfo(name)!.byteLength, 0));
  assert.ok(seen.every(([, t], i) => t === total && (i === 0 || seen[i - 1]![0] < seen[i]![0])));
  assert.equal(seen.at(-1), [total, total]);
});

test("a missing tensor or a wrong shape is refused with names and shapes", () => {
  const ckpt = openCheckpoint(single);
  assert.match(
    checkpointError(() => ckpt.readF32("model.layers.7.mlp.up_proj.weight", [24, 16])),
    `missing tensor "model.layers.7.mlp.up_proj.weight" in ${single} (looked in model.safetensors)`,
  );
  assert.match(
    checkpointError(() => ckpt.readF32("model.norm.weight", [32])),
    'model.safetensors: tensor "model.norm.weight" has shape [16], expected [32]',
  );
  ckpt.close();
});

test("validate reports every mismatch with a model at once", () => {
  const ckpt = openCheckpoint(single);
  const wider = randomCheckpointBase({ ...small, intermediateSize: 32, layers: 3 });
  assert.equal(ckpt.mismatches(checkpointTensors(randomCheckpointBase(small))), []);
  const problems = ckpt.mismatches(checkpointTensors(wider));
  assert.ok(problems.includes('tensor "model.layers.0.mlp.gate_proj.weight" has shape [24, 16], expected [32, 16]'));
  assert.ok(problems.includes('tensor "model.layers.1.mlp.down_proj.weight" has shape [16, 24], expected [16, 32]'));
  assert.ok(problems.includes('missing tensor "model.layers.2.self_attn.q_proj.weight"'));
  assert.is(problems.length, 2 * 3 + 9);
  assert.match(checkpointError(() => ckpt.validate(checkpointTensors(wider))), `${single} does not fit the model (15 problems)`);
  ckpt.close();
});

test("an index pointing at a missing shard, or at a shard without the tensor, is refused", () => {
  const noShard = join(root, "no-shard");
  cpSync(sharded, noShard, { recursive: true });
  rmSync(join(noShard, "model-00002-of-00003.safetensors"));
  assert.match(checkpointError(() => openCheckpoint(noShard)), "maps to shard model-00002-of-00003.safetensors, which is missing");

  const misplaced = join(root, "misplaced");
  cpSync(sharded, misplaced, { recursive: true });
  const index = JSON.parse(readFileSync(join(misplaced, INDEX_FILE), "utf8")) as { weight_map: Record<string, string> };
  index.weight_map["model.norm.weight"] = "model-00001-of-00003.safetensors";
  writeFileSync(join(misplaced, INDEX_FILE), JSON.stringify(index));
  assert.match(checkpointError(() => openCheckpoint(misplaced)), 'tensor "model.norm.weight" is mapped to model-00001-of-00003.safetensors, which does not hold it');

  index.weight_map["model.norm.weight"] = "../single/model.safetensors";
  writeFileSync(join(misplaced, INDEX_FILE), JSON.stringify(index));
  assert.match(checkpointError(() => openCheckpoint(misplaced)), "not a shard file name");
});

test("a directory without config.json or weights is refused", () => {
  const empty = join(root, "empty");
  mkdirSync(empty);
  assert.match(checkpointError(() => openCheckpoint(empty)), `${empty}: no config.json`);
  writeFileSync(join(empty, "config.json"), "{}");
  assert.match(checkpointError(() => openCheckpoint(empty)), "no weights (looked for model.safetensors and model.safetensors.index.json)");
  writeFileSync(join(empty, "config.json"), "[");
  assert.match(checkpointError(() => openCheckpoint(empty)), "config.json: not valid JSON");
});

test("weights or configs that are directories are refused naming the checkpoint and the file", () => {
  const odd = join(root, "odd");
  mkdirSync(odd);
  writeFileSync(join(odd, "config.json"), readFileSync(join(single, "config.json")));
  mkdirSync(join(odd, "model.safetensors"));
  assert.is(checkpointError(() => openCheckpoint(odd)), `${join(odd, "model.safetensors")}: is a directory; a safetensors weights file was expected here`);

  const shardDir = join(root, "shard-dir");
  cpSync(sharded, shardDir, { recursive: true });
  rmSync(join(shardDir, "model-00002-of-00003.safetensors"));
  mkdirSync(join(shardDir, "model-00002-of-00003.safetensors"));
  assert.match(checkpointError(() => openCheckpoint(shardDir)), `${join(shardDir, "model-00002-of-00003.safetensors")}: is a directory`);

  const configDir = join(root, "config-dir");
  mkdirSync(join(configDir, "config.json"), { recursive: true });
  assert.is(checkpointError(() => openCheckpoint(configDir)), `${join(configDir, "config.json")}: is a directory, not a JSON file`);
});

test("a config.json that is not JSON is refused with a place, never its text", () => {
  const dir = join(root, "not-json");
  mkdirSync(dir);
  writeFileSync(join(dir, "config.json"), "root:x:0:0:root:/root:/bin/bash\n");
  const message = checkpointError(() => openCheckpoint(dir));
  assert.match(message, `${join(dir, "config.json")}: not valid JSON`);
  assert.not.match(message, "root:x");
  writeFileSync(join(dir, "config.json"), '{\n  "hidden_size": 16,\n  "secret" 1\n}');
  assert.match(checkpointError(() => openCheckpoint(dir)), "not valid JSON (unexpected number at line 3, column 12)");
});

test.run();
