import { type BeamOptions, type GenerateOptions, type LoadOptions, type Prompt, type ScoredSequence, type Token } from "#milora-runtime";
/** The LoRA modules this spec enables in at least one layer: MiLoRA's experts. */
export declare const EXPERT_MODULES: readonly ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
export type ExpertModule = (typeof EXPERT_MODULES)[number];
/** The layers that carry experts (and, when routed, a router), ascending. */
export declare const LAYERS: readonly [0, 1];
export type Layer = (typeof LAYERS)[number];
/** How many layers carry experts. */
export declare const LAYER_COUNT = 2;
/** The base model this package runs on: the checkpoint given to `load` must match it. */
export declare const BASE: {
    readonly name: "llama_tiny";
    readonly family: "llama";
    readonly hiddenSize: 64;
    readonly layers: 2;
    readonly heads: 4;
    readonly intermediateSize: 176;
    readonly vocabSize: 512;
    readonly ropeTheta: 10000;
    readonly rmsNormEps: 0.000001;
    readonly maxPositions: 256;
    readonly tieEmbeddings: false;
    readonly kvHeads: 2;
    readonly headDim: 16;
};
/** Each layer's experts and their LoRA options. */
export declare const EXPERTS: {
    readonly 0: {
        readonly q_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly k_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly v_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly o_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly gate_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly up_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly down_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
    };
    readonly 1: {
        readonly q_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly k_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly v_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly o_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly gate_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly up_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
        readonly down_proj: {
            readonly rank: 4;
            readonly alpha: 8;
            readonly scaling: 2;
            readonly dropout: 0.05;
            readonly rslora: false;
        };
    };
};
/** The router in front of each layer: it reads the prompt once and its gates are reused for every generated token. */
export declare const ROUTER: {
    readonly placement: "per_layer";
    readonly input: "layer_input";
    readonly pooling: "attention";
    readonly selection: {
        readonly rule: "top_k";
        readonly k: 2;
        readonly renormalize: false;
    };
    readonly activation: "none";
    readonly when: "prompt";
    readonly noise: true;
    readonly balance: 0.01;
};
/** No per-token Mixture-of-LoRA routing. */
export declare const MOE: null;
/** What the adapter costs (`milora check` prints the same numbers). */
export declare const BUDGET: {
    readonly loraParams: 9344;
    readonly routerParams: 1920;
    readonly trainableParams: 11264;
    readonly baseParams: 158016;
    readonly shareOfBasePercent: 7.128392061563386;
    readonly flopsPerToken: {
        readonly allEnabled: 18688;
        readonly expected: 5339.428571428572;
    };
    readonly bytes: {
        readonly f32: 45056;
        readonly f16: 22528;
    };
};
/** One layer's routing decision. */
export interface LayerRoute<L extends Layer, M extends ExpertModule> {
    readonly layer: L;
    /** The gate of each module enabled in this layer: 0 where the router switched it off (no LoRA work there); `select top_k 2` (the paper's eq. 3): each chosen module's softmax probability over all of the layer's modules, so the chosen gates sum to at most 1. */
    readonly gates: {
        readonly [K in M]: number;
    };
}
/** The routing decision for one prompt: one entry per layer of LAYERS, in order. */
export type Routing = readonly [LayerRoute<0, ExpertModule>, LayerRoute<1, ExpertModule>];
/**
 * MiLoRA (routed once per prompt) adapter `tiny` on base `llama_tiny`, compiled from llama-tiny.milora.
 * Experts: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in 2 layers.
 *
 * Budget:
 * ```text
 * adapter tiny on llama_tiny
 *   MiLoRA router per layer: top_k 2, pooling attention, routed once per prompt
 *   module           layers  rank  params   share
 *   q_proj                2     4   1,024    9.1%
 *   k_proj                2     4     768    6.8%
 *   v_proj                2     4     768    6.8%
 *   o_proj                2     4   1,024    9.1%
 *   gate_proj             2     4   1,920   17.0%
 *   up_proj               2     4   1,920   17.0%
 *   down_proj             2     4   1,920   17.0%
 *   router                2         1,920   17.0%
 *   total trainable                11,264  100.0%
 *   base parameters   158,016 (adapter = 7.128% of base)
 *   LoRA FLOPs/token  18,688 with all enabled modules
 *                     5,339 expected under routing
 *   adapter memory    44.0 KiB f32, 22.0 KiB f16
 * ```
 *
 * Spec:
 * ```milora
 * // llama-tiny.milora
 *  2 | base llama_tiny: llama {
 *  3 |   hidden_size 64
 *  4 |   layers 2
 *  5 |   heads 4
 *  6 |   kv_heads 2              // grouped-query attention: two query heads share each kv head
 *  7 |   intermediate_size 176
 *  8 |   vocab_size 512
 *  9 |   max_positions 256
 * 10 | }
 *
 * 13 | adapter tiny on llama_tiny {
 * 14 |   experts all { rank 4 alpha 8 dropout 0.05 }
 * 15 |   router {
 * 16 |     pooling attention     // the paper's self-attention pooler: one learned vector w_sa per layer
 * 17 |     select top_k 2        // gates: the two best experts' softmax probabilities over all seven (eq. 3)
 * 18 |     when prompt
 * 19 |     balance 0.01          // lambda_lb of the paper's runs
 * 20 |   }
 * 21 | }
 * ```
 */
export declare class Tiny<Tenant extends string = string> {
    #private;
    private constructor();
    /**
     * Loads the base checkpoint (a Hugging Face directory) and each tenant's adapter directory onto a device.
     * Tenant names are the keys of `adapters`. Throws when the checkpoint or an adapter does not match this package's spec.
     */
    static load<const Tenant extends string>(options: LoadOptions<Tenant>): Promise<Tiny<Tenant>>;
    /** The tokens generated after `prompt` (text needs the base directory's tokenizer.json), with their text when a tokenizer is present. */
    generate(prompt: Prompt, options?: GenerateOptions<Tenant>): AsyncIterable<Token>;
    /**
     * Beam search of width `options.beams` (Hugging Face's semantics): the best `numReturnSequences` hypotheses (default all), best first, with scores.
     * The prompt and the tenant's routing decision are computed once and shared by every beam; `generate(prompt, { beams })` yields the best one's tokens.
     */
    generateBeams(prompt: Prompt, options: BeamOptions<Tenant>): Promise<ScoredSequence[]>;
    /** The routing decision a tenant's routers make for `prompt`: a gate per enabled module in every layer of LAYERS. */
    route(prompt: Prompt, options: {
        readonly tenant: Tenant;
    }): Promise<Routing>;
    /** Frees the GPU memory (and the device, when `load` acquired it). */
    destroy(): void;
}
