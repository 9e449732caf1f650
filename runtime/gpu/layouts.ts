// Host-side layouts of the buffers kernels read and write: how the runtime packs sampling settings and
// LoRA slots, and reads beam candidates. The generators (compiler/kernels/*) write WGSL that reads
// these layouts and import them from here, so the runtime needs no generator to fill a buffer.

/** How one sequence picks its next token. */
export interface SamplingSettings {
  /** 0 selects greedy argmax. */
  readonly temperature: number;
  /** Keep the k most likely tokens; 0 for no limit. */
  readonly topK: number;
  /** Keep the smallest most-likely set with this much probability; 1 for no limit. */
  readonly topP: number;
  readonly seed: number;
  /** The sequence's own token counter: (seed, step) fixes the draw whatever row the sequence lands on. */
  readonly step: number;
}

/** u32 words per row of the settings buffer: seed, step, temperature (f32), topK, topP (f32). */
export const SAMPLING_WORDS = 5;

/** Packs per-row settings into the layout the sampling kernel reads. */
export function packSamplingSettings(rows: readonly SamplingSettings[]): Uint32Array {
  const words = new Uint32Array(rows.length * SAMPLING_WORDS);
  const floats = new Float32Array(words.buffer);
  rows.forEach((s, r) => {
    const at = r * SAMPLING_WORDS;
    words[at] = s.seed >>> 0;
    words[at + 1] = s.step >>> 0;
    floats[at + 2] = s.temperature;
    words[at + 3] = s.topK;
    floats[at + 4] = s.topP;
  });
  return words;
}

/** `rowAdapter` value of a row that uses no adapter. */
export const NO_ADAPTER = 0xffffffff;

/** Rank and scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) of one resident adapter slot. */
export interface LoraSlotInfo {
  readonly rank: number;
  readonly scaling: number;
}

/** The `slots` buffer's bytes: per slot a u32 rank then an f32 scaling, little-endian. */
export function packLoraSlots(slots: readonly LoraSlotInfo[]): Uint8Array {
  const bytes = new Uint8Array(slots.length * 8);
  const view = new DataView(bytes.buffer);
  slots.forEach((s, i) => {
    view.setUint32(i * 8, s.rank, true);
    view.setFloat32(i * 8 + 4, s.scaling, true);
  });
  return bytes;
}

/** Most candidates one row may ask for (the workgroup keeps none of them, this only bounds the loop). */
export const MAX_BEAM_CANDIDATES = 256;

/** u32 words per candidate in the output buffer: token id, then the f32 log-probability. */
export const BEAM_CANDIDATE_WORDS = 2;


/** Logit processing (penalties, bias, min_p): u32 words per row of `info`: start, count, minP (f32), temperature (f32). */
export const ADJUST_ROW_WORDS = 4;
/** u32 words per entry: token, mulPos (f32), mulNeg (f32), add (f32); the transform is x' = (x > 0 ? x * mulPos : x * mulNeg) + add. */
export const ADJUST_ENTRY_WORDS = 4;

/** Bytes of one per_ffn expert choice { expert: u32, weight: f32 } (compiler/kernels/moe.ts). */
export const CHOICE_BYTES = 8;

/** Words of a row's LoRA info after its values in the engine's t: slot (u32 bits), gate, scaling, rank (u32 bits). */
export const ROW_INFO_WORDS = 4;

/**
 * Columns of one row of the LoRA shrink's output t (compiler/kernels/lora.ts): maxRank, or with the
 * row info (the engine's) the values padded to a multiple of 4, then the info.
 */
export function loraRowColumns(maxRank: number, rowInfo: boolean): number {
  return rowInfo ? 4 * Math.ceil(maxRank / 4) + ROW_INFO_WORDS : maxRank;
}

/**
 * Bytes every module's region of a LoRA group's buffers is padded to: WebGPU's default
 * minStorageBufferOffsetAlignment, so a per-module kernel binds its module's region as a buffer range.
 * A group is the modules reading one input whose LoRA shrink is one dispatch (compiler/kernels/lora.ts
 * `modules`); its buffers are module-major, one region per module in the group's order:
 *   A      [module][aRows, in] f32: the module's [slots, R, in], then padding rows (loraARows)
 *   slots  [module][slotStride] LoraSlot, 8 bytes each (loraSlotStride)
 *   t      [module][tWords] u32: the module's [rows, loraRowColumns(R, true)], then padding (loraTWords)
 */
export const LORA_REGION_BYTES = 256;

/** Rows of one module's region of a group's A: slots * R rounded up to whole 256-byte blocks of `in`-wide f32 rows. */
export function loraARows(slots: number, maxRank: number, inFeatures: number): number {
  const words = LORA_REGION_BYTES / 4;
  return roundUp(Math.max(1, slots * maxRank), words / gcd(words, inFeatures));
}

/** LoraSlots in one module's region of a group's slots buffer. */
export function loraSlotStride(slots: number): number {
  return roundUp(Math.max(1, slots), LORA_REGION_BYTES / 8);
}

/** u32 words of one module's region of the engine's t: `rows` rows of loraRowColumns(maxRank, true), padded. */
export function loraTWords(rows: number, maxRank: number): number {
  return roundUp(Math.max(1, rows * loraRowColumns(Math.max(1, maxRank), true)), LORA_REGION_BYTES / 4);
}

function roundUp(n: number, m: number): number {
  return Math.ceil(n / m) * m;
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}
