// Bytes of GPU buffers a device holds, as `milora bench` reports them: every buffer made through
// `device.createBuffer` while the meter is on counts from its creation to its destroy(). WebGPU reports
// no memory use, so this is what the engine asked for (weights, KV cache, activations, adapter stacks,
// readbacks), not what the driver reserves around it.

export interface MemoryMeter {
  /** Bytes of the buffers made since the meter started and not yet destroyed. */
  readonly liveBytes: number;
  /** The most `liveBytes` has been since the meter started or since the last resetPeak(). */
  readonly peakBytes: number;
  /** Starts a new peak from what is live now. */
  resetPeak(): void;
  /** Puts the device's createBuffer back; buffers made meanwhile stop counting. */
  stop(): void;
}

/** Counts `device`'s buffer allocations from now on (one meter per device at a time). */
export function meterBuffers(device: GPUDevice): MemoryMeter {
  if (Object.hasOwn(device, "createBuffer")) throw new Error("meterBuffers: this device is already metered");
  let live = 0;
  let peak = 0;
  let on = true;
  const create = device.createBuffer.bind(device);
  Object.defineProperty(device, "createBuffer", {
    configurable: true,
    writable: true,
    value: (descriptor: GPUBufferDescriptor): GPUBuffer => {
      const buffer = create(descriptor);
      const size = buffer.size;
      live += size;
      peak = Math.max(peak, live);
      const destroy = buffer.destroy.bind(buffer);
      let counted = true;
      Object.defineProperty(buffer, "destroy", {
        configurable: true,
        value: () => {
          // destroy() may be called twice; a buffer counts off once, and not after the meter stopped
          if (counted && on) live -= size;
          counted = false;
          destroy();
        },
      });
      return buffer;
    },
  });
  return {
    get liveBytes() {
      return live;
    },
    get peakBytes() {
      return peak;
    },
    resetPeak: () => void (peak = live),
    stop: () => {
      on = false;
      delete (device as { createBuffer?: unknown }).createBuffer;
    },
  };
}
