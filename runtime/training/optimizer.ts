// The optimizer step on the device: the global gradient norm over every trainable tensor (clipped as
// torch's clip_grad_norm_ does, the factor left on the device), then AdamW (torch's meaning: decoupled
// weight decay) or SGD on each tensor, then the gradients cleared for the next accumulation. One submit;
// the norm comes back for the metrics log.
import { NORM_PARTIALS_PER_BUFFER } from "../../compiler/kernels/grad-norm.ts";
import { adamwParams } from "../../compiler/kernels/optimizer.ts";
import { StepEncoder, createStorage, type PipelineCache } from "../gpu/kernel-runner.ts";
import type { TrainKernelResolver } from "./kernels.ts";
import type { TrainTensor } from "./params.ts";

export interface OptimizerSettings {
  readonly kind: "adamw" | "sgd";
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** Global norm to clip to; 0 turns clipping off. */
  readonly maxGradNorm: number;
}

export const OPTIMIZER_DEFAULTS: OptimizerSettings = { kind: "adamw", beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 };

export class Optimizer {
  readonly #device: GPUDevice;
  readonly #kernel: TrainKernelResolver;
  readonly #step: StepEncoder;
  readonly #partials: GPUBuffer;
  readonly #clip: GPUBuffer;
  readonly #readback: GPUBuffer;
  readonly #zeros: Float32Array;

  constructor(
    device: GPUDevice,
    pipelines: PipelineCache,
    kernel: TrainKernelResolver,
    readonly tensors: readonly TrainTensor[],
    readonly settings: OptimizerSettings,
  ) {
    this.#device = device;
    this.#kernel = kernel;
    this.#step = new StepEncoder(device, pipelines);
    this.#partials = createStorage(device, Math.max(1, tensors.length) * NORM_PARTIALS_PER_BUFFER * 4, "gradient norm partials");
    this.#clip = createStorage(device, Float32Array.of(1, 0), "clip factor and norm");
    this.#readback = device.createBuffer({ label: "gradient norm readback", size: 8, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    this.#zeros = new Float32Array(Math.max(0, ...tensors.map((t) => t.count)));
  }

  /**
   * Updates every tensor of `group` (all, or only the architecture parameters, or only the others) with
   * learning rate `lr` at optimizer step `t` (from 1), its gradients multiplied by `gradScale` first;
   * clears their gradients. Returns the gradient norm before clipping.
   */
  async update(t: number, lr: number, gradScale: number, group: (x: TrainTensor) => boolean = () => true): Promise<{ gradNorm: number }> {
    const tensors = this.tensors.filter(group);
    const step = this.#step;
    const squares = this.#kernel({ family: "grad_squares", constants: {} });
    tensors.forEach((x, slot) => step.dispatch(squares, { grad: x.grad, partials: this.#partials }, { count: x.count, slot }));
    step.dispatch(
      this.#kernel({ family: "grad_clip", constants: {} }),
      { partials: this.#partials, clip: this.#clip },
      { partialCount: tensors.length * NORM_PARTIALS_PER_BUFFER, maxNorm: this.settings.maxGradNorm, gradScale },
    );
    const s = this.settings;
    for (const x of tensors) {
      if (s.kind === "adamw") {
        step.dispatch(
          this.#kernel({ family: "adamw", constants: {} }),
          { param: x.value, grad: x.grad, m: x.m, v: x.v, scale: this.#clip },
          adamwParams({ lr, beta1: s.beta1, beta2: s.beta2, eps: s.eps, weightDecay: s.weightDecay }, t, x.count, gradScale),
        );
      } else {
        step.dispatch(this.#kernel({ family: "sgd", constants: {} }), { param: x.value, grad: x.grad, scale: this.#clip }, { count: x.count, lr, gradScale });
      }
    }
    step.copy(this.#clip, 0, this.#readback, 0, 8);
    step.submit();
    this.clear(tensors);
    await this.#readback.mapAsync(GPUMapMode.READ);
    const [, norm] = new Float32Array(this.#readback.getMappedRange().slice(0));
    this.#readback.unmap();
    return { gradNorm: norm! };
  }

  /** Zeroes the gradients of `tensors` (queued after any work already submitted). */
  clear(tensors: readonly TrainTensor[] = this.tensors): void {
    for (const x of tensors) this.#device.queue.writeBuffer(x.grad, 0, this.#zeros, 0, x.count);
  }

  destroy(): void {
    this.#step.destroy();
    for (const b of [this.#partials, this.#clip, this.#readback]) b.destroy();
  }
}
