// The shape of the MiLoRA paper's Table 4 on this machine: decode tokens/s of one request at beam 1
// (greedy) and beam 3, for MiLoRA (routed once per prompt), the per-token baseline (`when token`, the
// MoE-LoRA style) and plain LoRA, all unmerged, on one spec: rank 8 on all 7 modules of every layer,
// the routers top_k of ROUTER_DEFAULTS. tokens/s counts one token of the returned sequence per decode
// step (a beam step decodes 3 rows), as the paper's beam-3 figures do.
//   node --import tsx bench/beam.ts [--hidden 512] [--decode 16] [--prompt 16] [--repeats 2] [--json FILE] [--svg FILE]
// --json writes the figures as data, --svg their bar chart (bench/chart.ts renders one from the other).
// The checkpoint is written once under .cache/bench/; rounds interleave the modes; best of rounds.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { ROUTER_DEFAULTS } from "../compiler/defaults.ts";
import { readHfConfig } from "../compiler/hf-config.ts";
import { EXPERT_MODULES, type Adapter, type RouterConfig } from "../compiler/model.ts";
import { peftSpec, randomAdapter } from "../examples/random-adapter.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { Engine } from "../runtime/engine/engine.ts";
import { plannedEngine } from "../bin/engine-plan.ts";
import { beamChart, type BeamResult } from "./chart.ts";

const { values } = parseArgs({ options: { hidden: { type: "string", default: "512" }, decode: { type: "string", default: "16" }, prompt: { type: "string", default: "16" }, repeats: { type: "string", default: "2" }, json: { type: "string" }, svg: { type: "string" } } });
const hidden = Number(values.hidden);
const DECODE = Number(values.decode);
const PROMPT = Number(values.prompt);
const REPEATS = Number(values.repeats);
const RANK = 8;
const BEAMS = [1, 3] as const;

const dir = join(".cache", "bench", `milora-${hidden}`);
writeRandomCheckpoint(dir, { hiddenSize: hidden, layers: 8, heads: 8, kvHeads: 4, intermediateSize: Math.round((hidden * 8) / 3 / 64) * 64, vocabSize: 4096, maxPositions: 256, seed: 3 });
const base = readHfConfig(dir);

const MODES: { readonly name: string; readonly label: string; readonly router?: Partial<RouterConfig> }[] = [
  { name: "MiLoRA (when prompt)", label: "MiLoRA", router: { when: "prompt" } },
  { name: "per-token (when token)", label: "per-token baseline", router: { when: "token" } },
  { name: "LoRA (unmerged)", label: "plain LoRA" },
];

function spec(router: Partial<RouterConfig> | undefined): Adapter {
  const lora = peftSpec({ base, modules: EXPERT_MODULES, rank: RANK, alpha: 2 * RANK, seed: 0, name: "bench" });
  return router ? { ...lora, router: { ...ROUTER_DEFAULTS, noise: false, ...router } } : lora;
}

const gpu = await acquireDevice();
const engine = await Engine.load(plannedEngine({ base, checkpointDir: dir, gpu, ctx: PROMPT + DECODE + 2, maxSequences: 3, maxAdapters: MODES.length, maxLoraRank: RANK }));
MODES.forEach((m, i) => engine.loadAdapter(m.name, randomAdapter({ spec: spec(m.router), seed: 100 + i, name: m.name })));
const selection = ROUTER_DEFAULTS.selection;
console.log(`device: ${adapterSummary(gpu.report)}`);
console.log(`model: hidden ${hidden}, 8 layers, intermediate ${base.intermediateSize}, vocab ${base.vocabSize}; adapters: rank ${RANK} on all 7 modules, routers ${selection.rule}${"k" in selection ? ` ${selection.k}` : ""} of 7`);
console.log(`one request: ${PROMPT}-token prompt, ${DECODE} decode steps, no stop token; best of ${REPEATS}`);
const prompt = Array.from({ length: PROMPT }, (_, i) => (i * 7919 + 13) % base.vocabSize);

async function tokensPerSecond(adapter: string, beams: number, maxTokens = DECODE + 1): Promise<number> {
  const t = (await engine.generate({ prompt, maxTokens, adapter, stop: [], ...(beams > 1 ? { beam: { beams } } : {}) })).timings;
  return (t.decodeSteps / t.decodeMs) * 1000;
}

for (const m of MODES) for (const beams of BEAMS) await tokensPerSecond(m.name, beams, 3); // first dispatch of every kernel
const best = new Map<string, number>();
for (let round = 0; round < REPEATS; round++) {
  for (const beams of BEAMS) {
    for (const m of MODES) {
      const key = `${m.name} ${beams}`;
      best.set(key, Math.max(best.get(key) ?? 0, await tokensPerSecond(m.name, beams)));
    }
  }
}
const get = (mode: string, beams: number) => best.get(`${mode} ${beams}`)!;
console.log("");
console.log(`mode                       ${BEAMS.map((b) => `beam ${b} tok/s`.padStart(14)).join("")}   beam 3 / beam 1`);
for (const m of MODES) console.log(`${m.name.padEnd(26)} ${BEAMS.map((b) => get(m.name, b).toFixed(1).padStart(14)).join("")} ${(get(m.name, 3) / get(m.name, 1)).toFixed(2).padStart(16)}`);
for (const beams of BEAMS) {
  const milora = get(MODES[0]!.name, beams);
  console.log(`beam ${beams}: MiLoRA ${(milora / get(MODES[1]!.name, beams)).toFixed(2)}x the per-token baseline's tokens/s, ${(milora / get(MODES[2]!.name, beams)).toFixed(2)}x plain LoRA's`);
}
console.log("paper (LLaMA-2 7B, A40): MiLoRA 43.7 / 33.5 tok/s, MOELoRA 35.9 / 28.4 (MiLoRA 1.22x / 1.18x); LoRA-family DoRA 36.5 / 29.6");
const result: BeamResult = {
  bench: "beam",
  device: adapterSummary(gpu.report),
  model: `hidden ${hidden}, 8 layers, vocab ${base.vocabSize}; rank ${RANK} on all 7 modules; ${PROMPT}-token prompt, ${DECODE} decode steps, best of ${REPEATS}`,
  results: MODES.flatMap((m) => BEAMS.map((beams) => ({ mode: m.name, label: m.label, beams, tokensPerSecond: get(m.name, beams) }))),
};
if (values.json) writeFileSync(values.json, JSON.stringify(result, null, 2) + "\n");
if (values.svg) writeFileSync(values.svg, beamChart(result));
engine.destroy();
gpu.destroy();
