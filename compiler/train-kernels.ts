// The training kernels by request: the resolver `milora train` hands the trainer (runtime/training/),
// mapping each family to its generator, with one KernelSource per distinct request.
import { attentionBackwardKeyValueKernel, attentionBackwardQueryKernel, attentionBackwardStatsKernel } from "./kernels/attention-backward.ts";
import { attentionTrainKernel } from "./kernels/attention-train.ts";
import { crossEntropyKernel } from "./kernels/cross-entropy.ts";
import { dropoutGradKernel, dropoutKernel } from "./kernels/dropout.ts";
import { swigluBackwardKernel, swigluBackwardSumKernel } from "./kernels/elementwise-backward.ts";
import { swigluKernel } from "./kernels/elementwise.ts";
import { gradClipKernel, gradSquaresKernel } from "./kernels/grad-norm.ts";
import type { KernelSource } from "./kernels/kernel.ts";
import { loraBackwardInputKernel, loraGradAKernel, loraGradBKernel } from "./kernels/lora-backward.ts";
import { loraExpandKernel, loraShrinkKernel } from "./kernels/lora.ts";
import { matmulInputGradKernel } from "./kernels/matmul-backward.ts";
import {
  loraRankGateKernel,
  moeBalanceGradKernel,
  moeBalanceKernel,
  moeBalanceSumsKernel,
  moeFfnGateGradKernel,
  moeFfnMixKernel,
  moeFfnPassKernel,
  moeFfnScaleKernel,
} from "./kernels/moe-train.ts";
import { matmulKernel } from "./kernels/matmul.ts";
import { adamwKernel, sgdKernel } from "./kernels/optimizer.ts";
import { rmsNormInputGradKernel } from "./kernels/rmsnorm-backward.ts";
import { rmsNormKernel } from "./kernels/rmsnorm.ts";
import { ropeBackwardKernel } from "./kernels/rope-backward.ts";
import { ropeKernel } from "./kernels/rope.ts";
import { routerTrainBackwardKernel, routerTrainGradKernel } from "./kernels/router-train-backward.ts";
import { routerBalanceKernel, routerTrainForwardKernel } from "./kernels/router-train.ts";
import type { TrainKernelRequest, TrainKernelResolver } from "../runtime/training/kernels.ts";

function generate(r: TrainKernelRequest): KernelSource {
  switch (r.family) {
    case "matmul":
      return matmulKernel(r.constants);
    case "matmul_input_grad":
      return matmulInputGradKernel(r.constants);
    case "rmsnorm":
      return rmsNormKernel(r.constants);
    case "rmsnorm_backward":
      return rmsNormInputGradKernel(r.constants);
    case "rope":
      return ropeKernel(r.constants);
    case "rope_backward":
      return ropeBackwardKernel(r.constants);
    case "attention_train":
      return attentionTrainKernel(r.constants);
    case "attention_backward_stats":
      return attentionBackwardStatsKernel(r.constants);
    case "attention_backward_query":
      return attentionBackwardQueryKernel(r.constants);
    case "attention_backward_kv":
      return attentionBackwardKeyValueKernel(r.constants);
    case "swiglu":
      return swigluKernel();
    case "swiglu_backward":
      return swigluBackwardKernel({ inPlace: false });
    case "swiglu_backward_sum":
      return swigluBackwardSumKernel();
    case "lora_shrink":
      return loraShrinkKernel(r.constants);
    case "lora_expand":
      return loraExpandKernel(r.constants);
    case "lora_backward_input":
      return loraBackwardInputKernel(r.constants);
    case "lora_grad_a":
      return loraGradAKernel(r.constants);
    case "lora_grad_b":
      return loraGradBKernel(r.constants);
    case "cross_entropy":
      return crossEntropyKernel(r.constants);
    case "adamw":
      return adamwKernel();
    case "sgd":
      return sgdKernel();
    case "grad_squares":
      return gradSquaresKernel();
    case "grad_clip":
      return gradClipKernel();
    case "dropout":
      return dropoutKernel();
    case "dropout_grad":
      return dropoutGradKernel();
    case "router_train_forward":
      return routerTrainForwardKernel(r.constants);
    case "router_train_backward":
      return routerTrainBackwardKernel(r.constants);
    case "router_train_grad":
      return routerTrainGradKernel(r.constants);
    case "router_balance":
      return routerBalanceKernel(r.constants);
    case "lora_rank_gate":
      return loraRankGateKernel(r.constants);
    case "moe_balance_sums":
      return moeBalanceSumsKernel(r.constants);
    case "moe_balance":
      return moeBalanceKernel(r.constants);
    case "moe_balance_grad":
      return moeBalanceGradKernel(r.constants);
    case "moe_ffn_pass":
      return moeFfnPassKernel(r.constants);
    case "moe_ffn_mix":
      return moeFfnMixKernel(r.constants);
    case "moe_ffn_scale":
      return moeFfnScaleKernel(r.constants);
    case "moe_ffn_gate_grad":
      return moeFfnGateGradKernel(r.constants);
  }
}

/** A resolver that generates each distinct request once. */
export function trainKernelResolver(): TrainKernelResolver {
  const made = new Map<string, KernelSource>();
  return (request) => {
    const id = JSON.stringify(request);
    let k = made.get(id);
    if (!k) made.set(id, (k = generate(request)));
    return k;
  };
}
