// The KV cache: a pool of fixed slots, one per live sequence. Each layer holds a K and a V buffer laid
// out [slots, ctx, kvHeads, headDim] (the layout the kv_write and attention kernels address), so a
// sequence is one slot index and its position, and a batch mixes slots freely. Beam search forks a
// sequence by copying positions of one slot into another on the device (copyPositions).
import { createStorage } from "../gpu/kernel-runner.ts";

export interface KvCacheShape {
  readonly layers: number;
  /** kvHeads * headDim: floats per cached position. */
  readonly kvWidth: number;
  /** Positions per slot. */
  readonly ctx: number;
  readonly slots: number;
}

/** Bytes of one layer's K (or V) buffer: the size one storage binding must hold. */
export function kvLayerBytes(shape: KvCacheShape): number {
  return shape.slots * shape.ctx * shape.kvWidth * 4;
}

/** Positions [start, end) of slot `from`, copied to the same positions of slot `to`. */
export interface KvCopy {
  readonly from: number;
  readonly to: number;
  readonly start: number;
  readonly end: number;
}

export class KvCache {
  /** Per layer: K and V buffers, [slots, ctx, kvWidth] f32. */
  readonly keys: readonly GPUBuffer[];
  readonly values: readonly GPUBuffer[];
  readonly #free: number[];
  readonly #device: GPUDevice;
  /** One slot's worth of one layer's K or V: copies within a buffer go through it (see copyPositions). */
  #scratch: GPUBuffer | undefined;

  constructor(
    device: GPUDevice,
    readonly shape: KvCacheShape,
  ) {
    this.#device = device;
    const bytes = kvLayerBytes(shape);
    this.keys = Array.from({ length: shape.layers }, (_, l) => createStorage(device, bytes, `kv cache K layer ${l}`));
    this.values = Array.from({ length: shape.layers }, (_, l) => createStorage(device, bytes, `kv cache V layer ${l}`));
    // Popped from the end, so slot 0 is handed out first.
    this.#free = Array.from({ length: shape.slots }, (_, i) => shape.slots - 1 - i);
  }

  /** A free slot, or undefined when every slot belongs to a live sequence. */
  acquire(): number | undefined {
    return this.#free.pop();
  }

  /** Returns a slot to the pool; its stale contents are never read, since attention stops at a row's position. */
  release(slot: number): void {
    if (slot < 0 || slot >= this.shape.slots || this.#free.includes(slot)) throw new Error(`kv cache: slot ${slot} is not in use`);
    this.#free.push(slot);
  }

  /**
   * Copies the cached keys and values of positions [start, end) of slot `from` into slot `to`, every
   * layer, for each copy in order, on the device (one submit; later submits see it). WebGPU refuses a
   * buffer-to-buffer copy whose source and destination are one buffer, so each range goes through a
   * scratch buffer. A copy's destination must not be a later copy's source.
   */
  copyPositions(copies: readonly KvCopy[]): void {
    const { ctx, kvWidth, slots } = this.shape;
    const work = copies.filter((c) => c.from !== c.to && c.end > c.start);
    if (work.length === 0) return;
    const rowBytes = kvWidth * 4;
    this.#scratch ??= createStorage(this.#device, ctx * rowBytes, "kv cache copy scratch");
    const encoder = this.#device.createCommandEncoder({ label: "kv cache copy" });
    for (const { from, to, start, end } of work) {
      if (from < 0 || from >= slots || to < 0 || to >= slots || start < 0 || end > ctx) {
        throw new Error(`kv cache: cannot copy positions ${start}..${end} of slot ${from} to slot ${to}`);
      }
      const size = (end - start) * rowBytes;
      const at = (slot: number) => (slot * ctx + start) * rowBytes;
      for (const buffer of [...this.keys, ...this.values]) {
        encoder.copyBufferToBuffer(buffer, at(from), this.#scratch, 0, size);
        encoder.copyBufferToBuffer(this.#scratch, 0, buffer, at(to), size);
      }
    }
    this.#device.queue.submit([encoder.finish()]);
  }

  get freeSlots(): number {
    return this.#free.length;
  }

  destroy(): void {
    for (const b of [...this.keys, ...this.values]) b.destroy();
    this.#scratch?.destroy();
  }
}
