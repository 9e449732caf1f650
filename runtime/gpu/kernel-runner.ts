// Dispatching generated kernels: a pipeline cache keyed by KernelSource.key, and a step encoder that
// records a whole step (many dispatches and copies), then encodes it into one command encoder with as
// few compute passes as the copies allow, writes every dispatch's params into one uniform arena with a
// single writeBuffer, and submits once.
import { workgroups, type KernelSource } from "./kernel.ts";

/** A whole buffer, or a byte range of one (offset a multiple of 256, the storage offset alignment). */
export type BufferArg = GPUBuffer | { readonly buffer: GPUBuffer; readonly offset: number; readonly size: number };

/** WebGPU's minimum alignment of uniform and storage binding offsets. */
const BINDING_ALIGNMENT = 256;

interface CachedPipeline {
  readonly pipeline: GPUComputePipeline;
  readonly layout: GPUBindGroupLayout;
}

/**
 * Compiled pipelines by kernel key. Layouts are explicit (from `KernelSource.bindings`), so a binding
 * the WGSL happens not to use still binds, and the params uniform takes a dynamic offset into the arena.
 */
export class PipelineCache {
  readonly #device: GPUDevice;
  readonly #pipelines = new Map<string, CachedPipeline>();

  constructor(device: GPUDevice) {
    this.#device = device;
  }

  /** The pipeline of `k`, compiled on first use. */
  get(k: KernelSource): GPUComputePipeline {
    return this.entry(k).pipeline;
  }

  /** The pipeline and its bind group layout (what StepEncoder binds against). */
  entry(k: KernelSource): CachedPipeline {
    const cached = this.#pipelines.get(k.key);
    if (cached) return cached;
    const label = k.key;
    const layout = this.#device.createBindGroupLayout({
      label,
      entries: k.bindings.map((b, binding) => ({
        binding,
        visibility: GPUShaderStage.COMPUTE,
        buffer:
          b.access === "uniform"
            ? { type: "uniform" as const, hasDynamicOffset: true }
            : { type: b.access === "read" ? ("read-only-storage" as const) : ("storage" as const) },
      })),
    });
    const pipeline = this.#device.createComputePipeline({
      label,
      layout: this.#device.createPipelineLayout({ label, bindGroupLayouts: [layout] }),
      compute: { module: this.#device.createShaderModule({ label, code: k.wgsl }), entryPoint: k.entryPoint },
    });
    const entry = { pipeline, layout };
    this.#pipelines.set(k.key, entry);
    return entry;
  }

  get size(): number {
    return this.#pipelines.size;
  }
}

type Command =
  | {
      readonly kind: "dispatch";
      readonly kernel: KernelSource;
      readonly buffers: readonly BufferArg[];
      readonly paramOffset: number;
      readonly groups: readonly [number, number, number];
    }
  | {
      readonly kind: "copy";
      readonly src: GPUBuffer;
      readonly srcOffset: number;
      readonly dst: GPUBuffer;
      readonly dstOffset: number;
      readonly size: number;
    };

// Bind groups are looked up by the buffers they hold; past this many we start over rather than grow.
const BIND_GROUP_CACHE_LIMIT = 4096;

/**
 * Records one step of work and submits it as one command buffer. Reusable: after `submit()` it is
 * empty and records the next step, keeping its uniform arena and bind group cache.
 *
 * Invariants: buffers named in `dispatch` must stay alive until the step has run; `submit()` must
 * be called before reading back anything the step writes.
 */
export class StepEncoder {
  readonly #device: GPUDevice;
  readonly #cache: PipelineCache;
  #commands: Command[] = [];
  #arenaBytes = new Uint8Array(BINDING_ALIGNMENT * 16);
  #arenaUsed = 0;
  #arena: GPUBuffer | undefined;
  #bindGroups = new Map<string, GPUBindGroup>();
  readonly #bufferIds = new WeakMap<GPUBuffer, number>();
  #nextBufferId = 0;

  constructor(device: GPUDevice, cache: PipelineCache) {
    this.#device = device;
    this.#cache = cache;
  }

  /**
   * Records a dispatch of `k`. `buffers` names every storage binding of `k`; `params` gives every
   * field of its Params struct. Throws on a missing or unknown name, or a non-integer u32.
   */
  dispatch<B extends string>(k: KernelSource<B>, buffers: Readonly<Partial<Record<Exclude<B, "params">, BufferArg>>>, params: Readonly<Record<string, number>> = {}): void {
    const storage = k.bindings.filter((b) => b.access !== "uniform");
    const args = storage.map((b) => {
      const arg = (buffers as Readonly<Record<string, BufferArg | undefined>>)[b.name];
      if (arg === undefined) throw new Error(`${k.key}: no buffer for binding "${b.name}"`);
      if (isRange(arg) && arg.offset % BINDING_ALIGNMENT !== 0)
        throw new Error(`${k.key}: binding "${b.name}" offset ${arg.offset} is not a multiple of ${BINDING_ALIGNMENT}`);
      return arg;
    });
    for (const name of Object.keys(buffers))
      if (!storage.some((b) => b.name === name)) throw new Error(`${k.key}: kernel has no binding "${name}"`);
    for (const name of Object.keys(params))
      if (!k.params.some((p) => p.name === name)) throw new Error(`${k.key}: kernel has no param "${name}"`);
    const paramOffset = k.params.length > 0 ? this.#writeParams(k, params) : 0;
    const groups = workgroups(k, params);
    this.#commands.push({ kind: "dispatch", kernel: k, buffers: args, paramOffset, groups });
  }

  /** Records a buffer-to-buffer copy (offsets and size multiples of 4); it splits the compute pass. */
  copy(src: GPUBuffer, srcOffset: number, dst: GPUBuffer, dstOffset: number, size: number): void {
    if (srcOffset % 4 || dstOffset % 4 || size % 4) throw new Error(`copy offsets and size must be multiples of 4`);
    this.#commands.push({ kind: "copy", src, srcOffset, dst, dstOffset, size });
  }

  /** Encodes and submits everything recorded since the last submit; the encoder is then empty. */
  submit(): void {
    const queue = this.#device.queue;
    if (this.#arenaUsed > 0) queue.writeBuffer(this.#arenaBuffer(), 0, this.#arenaBytes, 0, this.#arenaUsed);
    const encoder = this.#device.createCommandEncoder({ label: "milora step" });
    let pass: GPUComputePassEncoder | undefined;
    for (const c of this.#commands) {
      if (c.kind === "copy") {
        pass?.end();
        pass = undefined;
        encoder.copyBufferToBuffer(c.src, c.srcOffset, c.dst, c.dstOffset, c.size);
        continue;
      }
      if (c.groups[0] * c.groups[1] * c.groups[2] === 0) continue;
      pass ??= encoder.beginComputePass();
      const { pipeline, layout } = this.#cache.entry(c.kernel);
      pass.setPipeline(pipeline);
      const hasParams = c.kernel.params.length > 0;
      pass.setBindGroup(0, this.#bindGroup(c.kernel, layout, c.buffers), hasParams ? [c.paramOffset] : []);
      pass.dispatchWorkgroups(...c.groups);
    }
    pass?.end();
    queue.submit([encoder.finish()]);
    this.#commands = [];
    this.#arenaUsed = 0;
  }

  /** Releases the uniform arena (pipelines belong to the cache). */
  destroy(): void {
    this.#arena?.destroy();
    this.#arena = undefined;
    this.#bindGroups.clear();
  }

  #writeParams(k: KernelSource, params: Readonly<Record<string, number>>): number {
    const offset = this.#arenaUsed;
    const size = paramBlockSize(k);
    this.#arenaUsed += Math.ceil(size / BINDING_ALIGNMENT) * BINDING_ALIGNMENT;
    if (this.#arenaUsed > this.#arenaBytes.length) {
      const grown = new Uint8Array(Math.max(this.#arenaUsed, this.#arenaBytes.length * 2));
      grown.set(this.#arenaBytes);
      this.#arenaBytes = grown;
    }
    const view = new DataView(this.#arenaBytes.buffer, offset, size);
    k.params.forEach((p, i) => {
      const value = params[p.name];
      if (value === undefined) throw new Error(`${k.key}: no value for param "${p.name}"`);
      if (p.type === "f32") return view.setFloat32(i * 4, value, true);
      if (!Number.isInteger(value)) throw new Error(`${k.key}: param "${p.name}" must be an integer, got ${value}`);
      if (p.type === "u32") {
        if (value < 0 || value > 0xffffffff) throw new Error(`${k.key}: param "${p.name}" out of u32 range: ${value}`);
        view.setUint32(i * 4, value, true);
      } else view.setInt32(i * 4, value, true);
    });
    return offset;
  }

  /** The arena buffer, reallocated (and bind groups dropped) when a step needs more than it holds. */
  #arenaBuffer(): GPUBuffer {
    if (!this.#arena || this.#arena.size < this.#arenaBytes.length) {
      this.#arena?.destroy();
      this.#arena = this.#device.createBuffer({
        label: "milora uniform arena",
        size: this.#arenaBytes.length,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      });
      this.#bindGroups.clear();
    }
    return this.#arena;
  }

  #bufferId(buffer: GPUBuffer): number {
    let id = this.#bufferIds.get(buffer);
    if (id === undefined) {
      id = this.#nextBufferId++;
      this.#bufferIds.set(buffer, id);
    }
    return id;
  }

  #bindGroup(k: KernelSource, layout: GPUBindGroupLayout, buffers: readonly BufferArg[]): GPUBindGroup {
    const key =
      k.key +
      buffers
        .map((b) => (isRange(b) ? `|${this.#bufferId(b.buffer)}@${b.offset}+${b.size}` : `|${this.#bufferId(b)}`))
        .join("");
    const cached = this.#bindGroups.get(key);
    if (cached) return cached;
    const entries: GPUBindGroupEntry[] = buffers.map((b, binding) => ({
      binding,
      resource: isRange(b) ? { buffer: b.buffer, offset: b.offset, size: b.size } : { buffer: b },
    }));
    if (k.params.length > 0)
      entries.push({ binding: buffers.length, resource: { buffer: this.#arenaBuffer(), offset: 0, size: paramBlockSize(k) } });
    const group = this.#device.createBindGroup({ label: k.key, layout, entries });
    if (this.#bindGroups.size >= BIND_GROUP_CACHE_LIMIT) this.#bindGroups.clear();
    this.#bindGroups.set(key, group);
    return group;
  }
}

function isRange(arg: BufferArg): arg is Exclude<BufferArg, GPUBuffer> {
  return "buffer" in arg;
}

/** Bytes of a kernel's Params struct as bound: 4 per field, rounded up to 16. */
function paramBlockSize(k: KernelSource): number {
  return Math.ceil((k.params.length * 4) / 16) * 16;
}

/** A storage buffer (STORAGE | COPY_SRC | COPY_DST) holding `data`, or zeroed with `byteSize` bytes. */
export function createStorage(device: GPUDevice, data: ArrayBufferView | number, label: string): GPUBuffer {
  const byteLength = typeof data === "number" ? data : data.byteLength;
  const buffer = device.createBuffer({
    label,
    size: Math.max(4, Math.ceil(byteLength / 4) * 4),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    mappedAtCreation: typeof data !== "number",
  });
  if (typeof data !== "number") {
    new Uint8Array(buffer.getMappedRange()).set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    buffer.unmap();
  }
  return buffer;
}

async function readBytes(device: GPUDevice, buffer: GPUBuffer, byteOffset: number, byteLength: number): Promise<ArrayBuffer> {
  const staging = device.createBuffer({ size: byteLength, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const encoder = device.createCommandEncoder({ label: "milora readback" });
  encoder.copyBufferToBuffer(buffer, byteOffset, staging, 0, byteLength);
  device.queue.submit([encoder.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const bytes = staging.getMappedRange().slice(0);
  staging.unmap();
  staging.destroy();
  return bytes;
}

/** Copies `byteLength` bytes of `buffer` (COPY_SRC) from `byteOffset` back as f32 values, after all submitted work. */
export async function readBuffer(
  device: GPUDevice,
  buffer: GPUBuffer,
  byteOffset = 0,
  byteLength = buffer.size - byteOffset,
): Promise<Float32Array> {
  return new Float32Array(await readBytes(device, buffer, byteOffset, byteLength));
}
