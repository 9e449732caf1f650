// The kernels a training step dispatches, named as requests (a family and the constants it is
// specialised by). The runtime never generates WGSL: the caller hands the trainer a resolver (the CLI's
// is compiler/train-kernels.ts), the same rule the engine follows for inference.
import type { AttentionTrainConstants } from "../../compiler/kernels/attention-train.ts";
import type { KernelSource } from "../../compiler/kernels/kernel.ts";
import type { LoraBackwardConstants, LoraBackwardInputConstants } from "../../compiler/kernels/lora-backward.ts";
import type { LoraConstants } from "../../compiler/kernels/lora.ts";
import type { MatmulBackwardConstants } from "../../compiler/kernels/matmul-backward.ts";
import type { MatmulConstants } from "../../compiler/kernels/matmul.ts";
import type { RmsNormConstants } from "../../compiler/kernels/rmsnorm.ts";
import type { RopeConstants } from "../../compiler/kernels/rope.ts";
import type { RouterTrainBackwardConstants } from "../../compiler/kernels/router-train-backward.ts";
import type { RouterTrainConstants } from "../../compiler/kernels/router-train.ts";

export type TrainKernelRequest =
  | { readonly family: "matmul"; readonly constants: MatmulConstants }
  | { readonly family: "matmul_input_grad"; readonly constants: MatmulBackwardConstants }
  | { readonly family: "rmsnorm"; readonly constants: RmsNormConstants }
  | { readonly family: "rmsnorm_backward"; readonly constants: RmsNormConstants & { readonly accumulate: boolean } }
  | { readonly family: "rope" | "rope_backward"; readonly constants: RopeConstants }
  | {
      readonly family: "attention_train" | "attention_backward_stats" | "attention_backward_query" | "attention_backward_kv";
      readonly constants: AttentionTrainConstants;
    }
  | {
      readonly family: "swiglu" | "swiglu_backward" | "swiglu_backward_sum" | "adamw" | "sgd" | "grad_squares" | "grad_clip" | "dropout" | "dropout_grad";
      readonly constants: Record<string, never>;
    }
  | { readonly family: "lora_shrink" | "lora_expand"; readonly constants: LoraConstants }
  | { readonly family: "lora_backward_input"; readonly constants: LoraBackwardInputConstants }
  | { readonly family: "lora_rank_gate"; readonly constants: { readonly rank: number; readonly experts: number } }
  | { readonly family: "moe_balance_sums" | "moe_balance" | "moe_balance_grad" | "moe_ffn_pass"; readonly constants: { readonly experts: number } }
  | { readonly family: "moe_ffn_mix" | "moe_ffn_scale"; readonly constants: { readonly width: number } }
  | { readonly family: "moe_ffn_gate_grad"; readonly constants: { readonly width: number; readonly experts: number; readonly lora: boolean } }
  | { readonly family: "lora_grad_a" | "lora_grad_b"; readonly constants: LoraBackwardConstants }
  | { readonly family: "cross_entropy"; readonly constants: { readonly vocab: number } }
  | { readonly family: "router_train_forward" | "router_train_backward"; readonly constants: RouterTrainConstants }
  | { readonly family: "router_train_grad"; readonly constants: RouterTrainBackwardConstants }
  | { readonly family: "router_balance"; readonly constants: { readonly experts: number } };

export type TrainKernelResolver = (request: TrainKernelRequest) => KernelSource;
