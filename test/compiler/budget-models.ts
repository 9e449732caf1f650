// Shared by the budget tests (budget.test.ts, budget-moe.test.ts): the published bases they count on
// and the adapter they count, one expert per (layer, module) with its rank and alpha.
import type { Span } from "../../grammar/ast.ts";
import { moduleShape } from "../../compiler/families.ts";
import type { Adapter, BaseModel, ExpertModule } from "../../compiler/model.ts";

const at = { offset: 0, line: 1, column: 1 };
export const span: Span = { file: "test.milora", start: at, end: at };

export const llama2_7b: BaseModel = {
  name: "llama2_7b",
  family: "llama",
  hiddenSize: 4096,
  layers: 32,
  heads: 32,
  kvHeads: 32,
  headDim: 128,
  intermediateSize: 11008,
  vocabSize: 32000,
  ropeTheta: 10000,
  rmsNormEps: 1e-5,
  maxPositions: 4096,
  tieEmbeddings: false,
  span,
};

export const llama32_1b: BaseModel = {
  ...llama2_7b,
  name: "llama32_1b",
  hiddenSize: 2048,
  layers: 16,
  heads: 32,
  kvHeads: 8,
  headDim: 64,
  intermediateSize: 8192,
  vocabSize: 128256,
  tieEmbeddings: true,
};

/**
 * Adapter "a" on `base`: `modules` in each of `layers` at `rankOf(module)` with alpha `alphaOf(rank)`
 * (scaling alpha / rank, no dropout or rsLoRA), routed as `routing` says (a MiLoRA router, a per-token
 * baseline, or neither).
 */
export function countedAdapter(
  base: BaseModel,
  modules: readonly ExpertModule[],
  rankOf: (module: ExpertModule) => number,
  alphaOf: (rank: number) => number,
  layers: readonly number[],
  routing: Pick<Adapter, "router" | "moe"> = {},
): Adapter {
  const experts = layers.flatMap((layer) =>
    modules.map((module) => {
      const rank = rankOf(module);
      const alpha = alphaOf(rank);
      return { layer, module, rank, alpha, dropout: 0, rslora: false, scaling: alpha / rank, ...moduleShape(base, module) };
    }),
  );
  return { name: "a", base, layers, experts, ...routing, span };
}
