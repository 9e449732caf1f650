import fc from "fast-check";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  CheckpointError,
  SafetensorsFile,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  isFloatDtype,
  writeSafetensors,
} from "../../../runtime/formats/safetensors.ts";

const dir = mkdtempSync(join(tmpdir(), "milora-safetensors-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

let fileCount = 0;
function tempPath(): string {
  return join(dir, `t${fileCount++}.safetensors`);
}

/** A file with the given header (object or raw text) and data bytes; `headerLength` overrides the prefix. */
function rawFile(header: unknown, data = new Uint8Array(0), headerLength?: bigint): string {
  const json = Buffer.from(typeof header === "string" ? header : JSON.stringify(header));
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(headerLength ?? BigInt(json.length));
  const path = tempPath();
  writeFileSync(path, Buffer.concat([prefix, json, data]));
  return path;
}

function openError(path: string): string {
  try {
    SafetensorsFile.open(path).close();
  } catch (e) {
    assert.instance(e, CheckpointError);
    return (e as Error).message;
  }
  throw new Error(`${path} opened without error`);
}

test("F32 tensors and metadata round trip exactly", () => {
  const path = tempPath();
  const values = [0, -0, 1, -2.5, 0.1, 1e-40, 3.4e38, Infinity, -Infinity, 65504];
  writeSafetensors(path, [
    { name: "a", dtype: "F32", shape: [2, 5], data: Float32Array.from(values) },
    { name: "empty", dtype: "F32", shape: [0, 3], data: new Float32Array(0) },
  ], { format: "pt" });
  const file = SafetensorsFile.open(path);
  assert.equal([...file.readF32("a")], values.map(Math.fround));
  assert.ok(Object.is(file.readF32("a")[1], -0));
  assert.equal(file.tensors.get("a")?.shape, [2, 5]);
  assert.is(file.readF32("empty").length, 0);
  assert.equal(file.metadata, { format: "pt" });
  file.close();
  // Data starts 8-byte aligned, as the reference writer makes it.
  assert.is(Number(readFileSync(path).readBigUInt64LE(0)) % 8, 0);
});

test("F16: exact values survive, others round to nearest even, overflow becomes infinity", () => {
  const cases: [number, number][] = [
    [1, 1],
    [-2.5, -2.5],
    [65504, 65504], // largest finite half
    [2 ** -14, 2 ** -14], // smallest normal
    [2 ** -24, 2 ** -24], // smallest subnormal
    [3 * 2 ** -24, 3 * 2 ** -24],
    [1 + 2 ** -11, 1], // halfway, ties to the even mantissa
    [1 + 3 * 2 ** -11, 1 + 2 ** -9],
    [2 ** -25, 0], // halfway to the smallest subnormal, ties to zero
    [1.5 * 2 ** -25, 2 ** -24],
    [65520, Infinity],
    [1e6, Infinity],
    [-Infinity, -Infinity],
  ];
  const path = tempPath();
  writeSafetensors(path, [{ name: "h", dtype: "F16", shape: [cases.length], data: Float32Array.from(cases.map((c) => c[0])) }]);
  const file = SafetensorsFile.open(path);
  assert.equal([...file.readF32("h")], cases.map((c) => c[1]));
  assert.is(file.readRaw("h").length, cases.length * 2);
  file.close();
});

test("F16 conversion is exact for every half value", () => {
  for (let h = 0; h < 0x10000; h++) {
    const x = f16BitsToF32(h);
    if (Number.isNaN(x)) assert.ok(Number.isNaN(f16BitsToF32(f32ToF16Bits(x))));
    else if (f32ToF16Bits(x) !== h) assert.unreachable(`half 0x${h.toString(16)} -> ${x} -> 0x${f32ToF16Bits(x).toString(16)}`);
  }
});

test("BF16: the top half of an f32, rounded to nearest even", () => {
  const cases: [number, number][] = [
    [1, 1],
    [-2.5, -2.5],
    [2 ** -133, 2 ** -133], // a subnormal
    [1 + 2 ** -8, 1], // halfway, ties to even
    [1 + 3 * 2 ** -8, 1 + 2 ** -6],
    [3.4e38, Infinity],
    [-Infinity, -Infinity],
  ];
  const path = tempPath();
  writeSafetensors(path, [{ name: "b", dtype: "BF16", shape: [cases.length], data: Float32Array.from(cases.map((c) => c[0])) }]);
  const file = SafetensorsFile.open(path);
  assert.equal([...file.readF32("b")], cases.map((c) => c[1]));
  file.close();
  assert.is(f32ToBf16Bits(NaN) & 0x7fc0, 0x7fc0);
});

test("a truncated file or a header length past the end is refused", () => {
  const short = tempPath();
  writeFileSync(short, Buffer.from([1, 2, 3]));
  assert.match(openError(short), "file is 3 bytes, too short for the 8-byte header length");
  assert.match(openError(rawFile({}, new Uint8Array(0), 4096n)), "header length 4096 extends past the end of the file (10 bytes)");
});

test("a header that is not a JSON object is refused", () => {
  assert.match(openError(rawFile("{not json")), "header is not valid JSON");
  assert.match(openError(rawFile([1, 2])), "header is not a JSON object");
  assert.match(openError(rawFile({ w: 3 })), 'tensor "w": entry is not an object');
});

test("bad dtype, shape or offsets name the tensor and the problem", () => {
  const data = new Uint8Array(16);
  const entry = (dtype: unknown, shape: unknown, offsets: unknown) => ({ "model.norm.weight": { dtype, shape, data_offsets: offsets } });
  assert.match(openError(rawFile(entry("F33", [4], [0, 16]), data)), 'tensor "model.norm.weight": unknown dtype "F33"');
  assert.match(openError(rawFile(entry("F32", [-4], [0, 16]), data)), "shape [-4] is not a list of non-negative integers");
  assert.match(openError(rawFile(entry("F32", [4], [16, 0]), data)), "data_offsets [16,0] is not a [begin, end] pair");
  assert.match(
    openError(rawFile(entry("F32", [3], [0, 16]), data)),
    "shape [3] of F32 needs 12 bytes but data_offsets [0, 16] hold 16",
  );
  assert.match(
    openError(rawFile(entry("F32", [8], [0, 32]), data)),
    /t\d+\.safetensors: tensor "model.norm.weight": data_offsets \[0, 32\] extend past the end of the file \(\d+ bytes\)/,
  );
});

test("overlapping tensors are refused", () => {
  const header = {
    a: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
    b: { dtype: "F32", shape: [2], data_offsets: [4, 12] },
  };
  assert.match(openError(rawFile(header, new Uint8Array(12))), 'tensor "b": data_offsets [4, 12] overlap tensor "a" at [0, 8]');
});

test("integer tensors are listed but refused as weights; an unknown name is refused", () => {
  const data = new Uint8Array(16);
  const file = SafetensorsFile.open(rawFile({ ids: { dtype: "I64", shape: [2], data_offsets: [0, 16] } }, data));
  assert.is(file.tensors.get("ids")?.dtype, "I64");
  assert.is(file.readRaw("ids").length, 16);
  assert.throws(() => file.readF32("ids"), (e: Error) => e instanceof CheckpointError && /dtype I64; weights must be F32, F16 or BF16/.test(e.message));
  assert.throws(() => file.readF32("nope"), (e: Error) => e instanceof CheckpointError && /no tensor "nope"/.test(e.message));
  file.close();
});

test("a missing file is a CheckpointError naming it", () => {
  assert.match(openError(join(dir, "absent.safetensors")), "absent.safetensors: cannot open (ENOENT)");
});

test("errors give the file's whole path, so the checkpoint or adapter directory is named too", () => {
  const adapterDir = join(dir, "adapters", "support");
  mkdirSync(adapterDir, { recursive: true });
  const path = join(adapterDir, "adapter_model.safetensors");
  writeFileSync(path, readFileSync(rawFile("{not json")));
  assert.match(openError(path), `${path}: header is not valid JSON`);
});

test("a weights path that is a directory is a CheckpointError, not EISDIR", () => {
  const path = join(dir, "model-dir.safetensors");
  mkdirSync(path);
  assert.is(openError(path), `${path}: is a directory; a safetensors weights file was expected here`);
});

test("a header that is not JSON is refused without quoting the file", () => {
  const path = rawFile("root:x:0:0:root:/root:/bin/bash");
  const message = openError(path);
  assert.match(message, "header is not valid JSON");
  assert.not.match(message, "root:x");
});

test("a file cut short after opening names the tensor, its dtype and shape", () => {
  const path = tempPath();
  writeSafetensors(path, [{ name: "model.norm.weight", dtype: "F32", shape: [2, 4], data: new Float32Array(8) }]);
  const file = SafetensorsFile.open(path);
  truncateSync(path, 16);
  assert.throws(
    () => file.readF32("model.norm.weight"),
    (e: Error) => e instanceof CheckpointError && e.message.startsWith(`${path}: tensor "model.norm.weight" (F32 [2, 4]): the file ended while reading its data`),
  );
  file.close();
});

test("fuzz: mutated files give a CheckpointError or valid tensors, nothing else", () => {
  const valid = tempPath();
  writeSafetensors(valid, [
    { name: "x", dtype: "F32", shape: [2, 3], data: Float32Array.from([1, 2, 3, 4, 5, 6]) },
    { name: "y", dtype: "F16", shape: [4], data: Float32Array.from([1, -1, 0.5, 2]) },
    { name: "z", dtype: "BF16", shape: [1, 2], data: Float32Array.from([3, 4]) },
  ]);
  const bytes = readFileSync(valid);
  const headerEnd = 8 + Number(bytes.readBigUInt64LE(0));
  const position = fc.oneof(fc.nat(7), fc.integer({ min: 8, max: headerEnd - 1 }), fc.nat(bytes.length - 1));
  const mutation = fc.record({
    edits: fc.array(fc.tuple(position, fc.oneof(fc.nat(255), fc.constantFrom(0x22, 0x2c, 0x5b, 0x5d, 0x7b, 0x7d, 0x30, 0x39))), { maxLength: 6 }),
    cut: fc.option(fc.nat(bytes.length), { nil: undefined }),
  });
  const path = tempPath();
  fc.assert(
    fc.property(mutation, ({ edits, cut }) => {
      const mutated = Buffer.from(bytes);
      for (const [at, value] of edits) mutated[at] = value;
      writeFileSync(path, cut === undefined ? mutated : mutated.subarray(0, cut));
      try {
        const file = SafetensorsFile.open(path);
        for (const [name, info] of file.tensors) {
          if (isFloatDtype(info.dtype)) file.readF32(name);
          else file.readRaw(name);
        }
        file.close();
      } catch (e) {
        if (!(e instanceof CheckpointError)) throw e;
      }
    }),
    { numRuns: 400, seed: 7 },
  );
});

test.run();
