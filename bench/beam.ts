// The shape of the MiLoRA paper's Table 4 on this machine: decode tokens/s of one request at beam 1
// (greedy) and beam 3, for MiLoRA (routed once per prompt), the per-token baseline (`when token`, the
// MoE-LoRA style) and plain LoRA, all unmerged, on one spec: rank 8 on all 7 modules of every layer,
// the routers top_k of ROUTER_DEFAULTS. tokens/s counts one token of the returned sequence per decode
// step (a beam step decodes 3 rows), as the paper's beam-3 figures do.
//   node --import tsx bench/beam.ts [--hidden 512] [--decode 16] [--prompt 16] [--repeats 2] [--json FILE] [--svg FILE]
// --json writes the figures as data, --svg their bar chart (bench/chart.ts renders one from the other).
// The checkpoint is written once under .cache/bench/; rounds interleave the modes; best of rounds. The
// measuring is `milora bench`'s (bin/measure/comparison.ts): its beam 1 and 3 rows for one tenant.
// bench/table4.ts runs the fuller comparison: the paper's MOELoRA-style and MixLoRA-style baselines and
// DoRA too, at rank 32, with eight tenants beside one sequence, peak memory and a profile of each step.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { readHfConfig } from "../compiler/hf-config.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { defaultBenchAdapter, runComparison, standardModes } from "../bin/measure/comparison.ts";
import { RANDOM_SIZES } from "../bin/measure/random-model.ts";
import { beamChart, type BeamResult } from "./chart.ts";

const { values } = parseArgs({ options: { hidden: { type: "string", default: "512" }, decode: { type: "string", default: "16" }, prompt: { type: "string", default: "16" }, repeats: { type: "string", default: "2" }, json: { type: "string" }, svg: { type: "string" } } });
const hidden = Number(values.hidden);
const DECODE = Number(values.decode);
const PROMPT = Number(values.prompt);
const REPEATS = Number(values.repeats);
const RANK = 8;
const BEAMS = [1, 3] as const;

const dir = join(".cache", "bench", `milora-${hidden}`);
writeRandomCheckpoint(dir, { ...RANDOM_SIZES.small, hiddenSize: hidden, intermediateSize: Math.round((hidden * 8) / 3 / 64) * 64 });
const base = readHfConfig(dir);

const adapter = defaultBenchAdapter(base);
const LABELS: Record<string, { readonly name: string; readonly label: string }> = {
  milora: { name: "MiLoRA (when prompt)", label: "MiLoRA" },
  token: { name: "per-token (when token)", label: "per-token baseline" },
  lora: { name: "LoRA (unmerged)", label: "plain LoRA" },
};
const MODES = standardModes(adapter, ["milora", "token", "lora"]);

const gpu = await acquireDevice();
const selection = adapter.router!.selection;
console.log(`device: ${adapterSummary(gpu.report)}`);
console.log(`model: hidden ${hidden}, 8 layers, intermediate ${base.intermediateSize}, vocab ${base.vocabSize}; adapters: rank ${RANK} on all 7 modules, routers ${selection.rule}${"k" in selection ? ` ${selection.k}` : ""} of 7`);
console.log(`one request: ${PROMPT}-token prompt, ${DECODE} decode steps, no stop token; best of ${REPEATS}`);
const rows = await runComparison({ base, checkpointDir: dir, gpu, modes: MODES, formats: ["f32"], tenants: [1], beams: BEAMS, prompt: PROMPT, decode: DECODE, repeats: REPEATS });
const get = (mode: string, beams: number) => rows.find((r) => r.mode === mode && r.beams === beams)!.tokensPerS;
console.log("");
console.log(`mode                       ${BEAMS.map((b) => `beam ${b} tok/s`.padStart(14)).join("")}   beam 3 / beam 1`);
for (const m of MODES) console.log(`${LABELS[m.name]!.name.padEnd(26)} ${BEAMS.map((b) => get(m.name, b).toFixed(1).padStart(14)).join("")} ${(get(m.name, 3) / get(m.name, 1)).toFixed(2).padStart(16)}`);
for (const beams of BEAMS) {
  const milora = get("milora", beams);
  console.log(`beam ${beams}: MiLoRA ${(milora / get("token", beams)).toFixed(2)}x the per-token baseline's tokens/s, ${(milora / get("lora", beams)).toFixed(2)}x plain LoRA's`);
}
console.log("paper (LLaMA-2 7B, A40): MiLoRA 43.7 / 33.5 tok/s, MOELoRA 35.9 / 28.4 (MiLoRA 1.22x / 1.18x); LoRA-family DoRA 36.5 / 29.6");
const result: BeamResult = {
  bench: "beam",
  device: adapterSummary(gpu.report),
  model: `hidden ${hidden}, 8 layers, vocab ${base.vocabSize}; rank ${RANK} on all 7 modules; ${PROMPT}-token prompt, ${DECODE} decode steps, best of ${REPEATS}`,
  results: MODES.flatMap((m) => BEAMS.map((beams) => ({ mode: LABELS[m.name]!.name, label: LABELS[m.name]!.label, beams, tokensPerSecond: get(m.name, beams) }))),
};
if (values.json) writeFileSync(values.json, JSON.stringify(result, null, 2) + "\n");
if (values.svg) writeFileSync(values.svg, beamChart(result));
gpu.destroy();
