// The KV cache: a pool of fixed slots, one per live sequence. Each layer holds a K and a V buffer laid
// out [slots, ctx, kvHeads, headDim] (the layout the kv_write and attention kernels address), so a
// sequence is one slot index and its position, and a batch mixes slots freely.
import { createStorage } from "./kernel-runner.ts";

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

export class KvCache {
  /** Per layer: K and V buffers, [slots, ctx, kvWidth] f32. */
  readonly keys: readonly GPUBuffer[];
  readonly values: readonly GPUBuffer[];
  readonly #free: number[];

  constructor(
    device: GPUDevice,
    readonly shape: KvCacheShape,
  ) {
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

  get freeSlots(): number {
    return this.#free.length;
  }

  destroy(): void {
    for (const b of [...this.keys, ...this.values]) b.destroy();
  }
}
