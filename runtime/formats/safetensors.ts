// The safetensors format: an 8-byte little-endian header length, a JSON header naming every tensor's
// dtype, shape and byte range, then the raw data. The reader trusts nothing in the file: every
// field is checked before use, and every problem is a CheckpointError naming the file (its path, so
// the checkpoint or adapter directory too) and, where one is at fault, the tensor and its shape.
import { closeSync, fstatSync, openSync, readSync, renameSync, rmSync, writeSync } from "node:fs";
import { jsonSyntaxReason } from "../../compiler/json-syntax.ts";
import { MiloraError } from "../errors.ts";

/** A problem with a checkpoint file a user supplied; the message is meant for them. */
export class CheckpointError extends MiloraError {
  override name = "CheckpointError";
  readonly kind = "checkpoint";
}

/** Bytes per element of every dtype the format defines. */
export const DTYPE_BYTES = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  U16: 2,
  I16: 2,
  F16: 2,
  BF16: 2,
  U32: 4,
  I32: 4,
  F32: 4,
  U64: 8,
  I64: 8,
  F64: 8,
} as const;

export type Dtype = keyof typeof DTYPE_BYTES;
/** The dtypes milora reads as weights (converted to f32) and writes. */
export type FloatDtype = "F32" | "F16" | "BF16";

export function isFloatDtype(dtype: Dtype): dtype is FloatDtype {
  return dtype === "F32" || dtype === "F16" || dtype === "BF16";
}

export interface TensorInfo {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  /** Absolute offset of the first byte in the file. */
  readonly byteOffset: number;
  readonly byteLength: number;
}

/** A tensor to write: values in f32, stored on disk as `dtype`. */
export interface TensorToWrite {
  readonly name: string;
  readonly dtype: FloatDtype;
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

const MAX_HEADER_BYTES = 100 * 1024 * 1024;
// Large tensors are read in slices so a progress callback can report within one tensor.
const READ_SLICE_BYTES = 64 * 1024 * 1024;

export function elementCount(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** An open safetensors file; tensor bytes are read on demand with positioned reads. */
export class SafetensorsFile {
  private fd: number | undefined;

  private constructor(
    readonly path: string,
    fd: number,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    readonly metadata: Readonly<Record<string, string>>,
  ) {
    this.fd = fd;
  }

  /** Opens and validates `path`; throws CheckpointError if the file is not a sound safetensors file. */
  static open(path: string): SafetensorsFile {
    const label = path;
    let fd: number;
    try {
      fd = openSync(path, "r");
    } catch (e) {
      throw new CheckpointError(`${path}: cannot open (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
    }
    try {
      const stat = fstatSync(fd);
      if (!stat.isFile()) {
        throw new CheckpointError(`${path}: is ${stat.isDirectory() ? "a directory" : "not a regular file"}; a safetensors weights file was expected here`);
      }
      const { tensors, metadata } = parseHeader(fd, label, stat.size);
      return new SafetensorsFile(path, fd, tensors, metadata);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  private info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (!info) throw new CheckpointError(`${this.path}: no tensor "${name}"`);
    return info;
  }

  /** The tensor's bytes exactly as stored. */
  readRaw(name: string, onBytes?: (n: number) => void): Uint8Array {
    const info = this.info(name);
    const out = new Uint8Array(info.byteLength);
    this.readInto(info, out, onBytes);
    return out;
  }

  /** The tensor's values as f32, converting from F16 or BF16; other dtypes are refused. */
  readF32(name: string, onBytes?: (n: number) => void): Float32Array {
    const info = this.info(name);
    if (!isFloatDtype(info.dtype)) {
      throw new CheckpointError(
        `${this.path}: tensor "${name}" [${info.shape.join(", ")}] has dtype ${info.dtype}; weights must be F32, F16 or BF16`,
      );
    }
    const out = new Float32Array(elementCount(info.shape));
    if (info.dtype === "F32") {
      this.readInto(info, new Uint8Array(out.buffer), onBytes);
      return out;
    }
    const halves = new Uint16Array(out.length);
    this.readInto(info, new Uint8Array(halves.buffer), onBytes);
    if (info.dtype === "F16") {
      for (let i = 0; i < halves.length; i++) out[i] = f16BitsToF32(halves[i]!);
    } else {
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < halves.length; i++) bits[i] = halves[i]! << 16;
    }
    return out;
  }

  private readInto(info: TensorInfo, out: Uint8Array, onBytes?: (n: number) => void): void {
    if (this.fd === undefined) throw new Error(`${this.path} is closed`);
    for (let done = 0; done < out.length; ) {
      const want = Math.min(READ_SLICE_BYTES, out.length - done);
      const got = readSync(this.fd, out, done, want, info.byteOffset + done);
      if (got === 0) {
        throw new CheckpointError(
          `${this.path}: tensor "${info.name}" (${info.dtype} [${info.shape.join(", ")}]): the file ended while reading its data (it was cut short after opening)`,
        );
      }
      done += got;
      onBytes?.(got);
    }
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}

function readExactly(fd: number, length: number, position: number): Buffer {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const got = readSync(fd, buf, done, length - done, position + done);
    if (got === 0) break;
    done += got;
  }
  return buf.subarray(0, done);
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isCount(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

function parseHeader(
  fd: number,
  label: string,
  fileSize: number,
): { tensors: Map<string, TensorInfo>; metadata: Record<string, string> } {
  if (fileSize < 8) {
    throw new CheckpointError(`${label}: file is ${fileSize} bytes, too short for the 8-byte header length`);
  }
  const headerLength = readExactly(fd, 8, 0).readBigUInt64LE(0);
  if (headerLength > BigInt(fileSize - 8)) {
    throw new CheckpointError(`${label}: header length ${headerLength} extends past the end of the file (${fileSize} bytes)`);
  }
  if (headerLength > BigInt(MAX_HEADER_BYTES)) {
    throw new CheckpointError(`${label}: header length ${headerLength} is over the ${MAX_HEADER_BYTES}-byte limit`);
  }
  const dataStart = 8 + Number(headerLength);
  let header: unknown;
  try {
    header = JSON.parse(readExactly(fd, dataStart - 8, 8).toString("utf8"));
  } catch (e) {
    throw new CheckpointError(`${label}: header is not valid JSON (${jsonSyntaxReason(e)}); is this a safetensors file?`);
  }
  if (!isPlainObject(header)) throw new CheckpointError(`${label}: header is not a JSON object`);

  const dataSize = fileSize - dataStart;
  const tensors = new Map<string, TensorInfo>();
  let metadata: Record<string, string> = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = parseMetadata(label, entry);
      continue;
    }
    const where = `${label}: tensor ${JSON.stringify(name)}`;
    if (!isPlainObject(entry)) throw new CheckpointError(`${where}: entry is not an object`);
    const { dtype, shape, data_offsets: offsets } = entry;
    if (typeof dtype !== "string" || !Object.hasOwn(DTYPE_BYTES, dtype)) {
      throw new CheckpointError(`${where}: unknown dtype ${JSON.stringify(dtype)}`);
    }
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      throw new CheckpointError(`${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
    }
    const [begin, end] = Array.isArray(offsets) && offsets.length === 2 ? offsets : [];
    if (!isCount(begin) || !isCount(end) || begin > end) {
      throw new CheckpointError(`${where}: data_offsets ${JSON.stringify(offsets)} is not a [begin, end] pair`);
    }
    const expected = elementCount(shape) * DTYPE_BYTES[dtype as Dtype];
    if (expected !== end - begin) {
      throw new CheckpointError(
        `${where}: shape [${shape.join(", ")}] of ${dtype} needs ${expected} bytes but data_offsets [${begin}, ${end}] hold ${end - begin}`,
      );
    }
    if (end > dataSize) {
      throw new CheckpointError(`${where}: data_offsets [${begin}, ${end}] extend past the end of the file (${fileSize} bytes)`);
    }
    tensors.set(name, { name, dtype: dtype as Dtype, shape, byteOffset: dataStart + begin, byteLength: end - begin });
  }
  checkNoOverlap(label, dataStart, [...tensors.values()]);
  return { tensors, metadata };
}

function parseMetadata(label: string, entry: unknown): Record<string, string> {
  if (!isPlainObject(entry) || !Object.values(entry).every((v) => typeof v === "string")) {
    throw new CheckpointError(`${label}: __metadata__ must be an object of strings`);
  }
  return entry as Record<string, string>;
}

function checkNoOverlap(label: string, dataStart: number, infos: TensorInfo[]): void {
  const sorted = infos.filter((t) => t.byteLength > 0).sort((a, b) => a.byteOffset - b.byteOffset);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!;
    const cur = sorted[i]!;
    if (cur.byteOffset < prev.byteOffset + prev.byteLength) {
      const range = (t: TensorInfo) => `[${t.byteOffset - dataStart}, ${t.byteOffset - dataStart + t.byteLength}]`;
      throw new CheckpointError(
        `${label}: tensor "${cur.name}": data_offsets ${range(cur)} overlap tensor "${prev.name}" at ${range(prev)}`,
      );
    }
  }
}

/** Writes a safetensors file atomically (temp file, then rename), converting f32 data to each tensor's dtype. */
export function writeSafetensors(
  path: string,
  tensors: readonly TensorToWrite[],
  metadata?: Readonly<Record<string, string>>,
): void {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  const blobs: Uint8Array[] = [];
  let offset = 0;
  for (const t of tensors) {
    if (t.data.length !== elementCount(t.shape)) {
      throw new CheckpointError(`tensor "${t.name}": ${t.data.length} values do not fill shape [${t.shape.join(", ")}]`);
    }
    const blob = encodeFloats(t.data, t.dtype);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + blob.length] };
    blobs.push(blob);
    offset += blob.length;
  }
  let json = JSON.stringify(header);
  // Pad with spaces so the data starts 8-byte aligned, as the reference implementation does.
  json += " ".repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
  const headerBytes = Buffer.from(json, "utf8");
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(headerBytes.length));

  const temp = `${path}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  const fd = openSync(temp, "w");
  try {
    for (const part of [prefix, headerBytes, ...blobs]) {
      for (let done = 0; done < part.length; ) done += writeSync(fd, part, done);
    }
    closeSync(fd);
    renameSync(temp, path);
  } catch (e) {
    try {
      closeSync(fd);
    } catch {
      // already closed
    }
    rmSync(temp, { force: true });
    throw e;
  }
}

function encodeFloats(data: Float32Array, dtype: FloatDtype): Uint8Array {
  if (dtype === "F32") return new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength));
  const out = new Uint16Array(data.length);
  const convert = dtype === "F16" ? f32ToF16Bits : f32ToBf16Bits;
  for (let i = 0; i < data.length; i++) out[i] = convert(data[i]!);
  return new Uint8Array(out.buffer);
}

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** IEEE binary16 bits to a number (exact). */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** A number rounded to the nearest binary16 (ties to even), as bits; overflow gives infinity. */
export function f32ToF16Bits(x: number): number {
  scratchF32[0] = x;
  const bits = scratchU32[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 255) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    // Subnormal: shift the full 24-bit significand down to the 2^-24 grid.
    const m = mant | 0x800000;
    const shift = 14 - e;
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++; // a carry into the exponent is still correct
  return sign | half;
}

/** A number rounded to the nearest bfloat16 (ties to even), as bits. */
export function f32ToBf16Bits(x: number): number {
  scratchF32[0] = x;
  const bits = scratchU32[0]!;
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) return (bits >>> 16) | 0x40;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}
