// What routing costs: decode ms/step and prefill tokens/s of one base model alone, with a merged LoRA,
// with unmerged LoRA and unmerged DoRA on all 7 modules, with MiLoRA (prompt routing, top_k 2 and 3 of
// 7) and with the per-token baseline (the same router run on every token), for 1 and for 8 concurrent
// sequences of different tenants. Every adapter has rank 8 on all 7 modules of every layer (the same
// tunable budget; DoRA adds its magnitude vectors). `milora bench` measures the same, on any model and
// at every format; this script is its f32 run with the top_k 3 router added and the goals printed.
//   node --import tsx bench/milora.ts [--hidden 512] [--decode 16] [--prompt 16] [--repeats 3]
// The checkpoint is written once under .cache/bench/; ratios are against the base in the same run.
import { join } from "node:path";
import { parseArgs } from "node:util";
import { readHfConfig } from "../compiler/hf-config.ts";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { defaultBenchAdapter, runComparison, standardModes, type BenchMode } from "../bin/measure/comparison.ts";
import { RANDOM_SIZES } from "../bin/measure/random-model.ts";

const { values } = parseArgs({ options: { hidden: { type: "string", default: "512" }, decode: { type: "string", default: "16" }, prompt: { type: "string", default: "16" }, repeats: { type: "string", default: "3" } } });
const hidden = Number(values.hidden);
const TENANTS = 8;

const dir = join(".cache", "bench", `milora-${hidden}`);
writeRandomCheckpoint(dir, { ...RANDOM_SIZES.small, hiddenSize: hidden, intermediateSize: Math.round((hidden * 8) / 3 / 64) * 64 });
const base = readHfConfig(dir);

const adapter = defaultBenchAdapter(base);
const router = { ...adapter.router!, balance: 0.01 };
const [merged, lora, dora, milora, perToken] = standardModes({ ...adapter, router }, ["merged", "lora", "dora", "milora", "token"]);
const MODES: BenchMode[] = [
  { name: "base", label: "base alone" },
  { ...merged!, label: "merged LoRA (1 tenant)" },
  { ...lora!, label: "unmerged LoRA, 7 modules" },
  { ...dora!, label: "unmerged DoRA, 7 modules" },
  { ...milora!, label: "MiLoRA top_k 2 of 7" },
  { name: "milora3", label: "MiLoRA top_k 3 of 7", spec: { ...milora!.spec!, router: { ...router, selection: { rule: "top_k", k: 3, renormalize: false } } } },
  { ...perToken!, label: "per-token top_k 2 of 7" },
];

const gpu = await acquireDevice();
console.log(`device: ${adapterSummary(gpu.report)}`);
console.log(`model: hidden ${hidden}, 8 layers, intermediate ${base.intermediateSize}, vocab ${base.vocabSize}; adapters: rank 8 on all 7 modules`);
console.log(`prefill: ${values.prompt}-token prompts; decode: ${values.decode} steps; greedy; best of ${values.repeats}`);
const rows = await runComparison({
  base,
  checkpointDir: dir,
  gpu,
  modes: MODES,
  formats: ["f32"],
  tenants: [1, TENANTS],
  beams: [1],
  prompt: Number(values.prompt),
  decode: Number(values.decode),
  repeats: Number(values.repeats),
});
gpu.destroy();

// Loading a DoRA adapter computes its factors on the CPU (runtime/engine/dora.ts): that time, against a LoRA's load.
const one = (mode: string, tenants: number) => rows.find((r) => r.mode === mode && r.tenants === tenants)!;
console.log(`load LoRA adapter: ${one("lora", 1).adapterLoadMs.toFixed(0)} ms; load DoRA adapter: ${one("dora", 1).adapterLoadMs.toFixed(0)} ms`);
for (const sequences of [1, TENANTS]) {
  console.log("");
  console.log(`${sequences} concurrent sequence${sequences > 1 ? "s (different tenants; merged: one tenant)" : ""}`);
  console.log("mode                          prefill tok/s  time vs base   decode ms/step  time vs base");
  const get = (mode: string) => one(mode, sequences);
  const baseline = get("base");
  for (const mode of MODES) {
    const r = get(mode.name);
    console.log(
      `${mode.label.padEnd(28)} ${r.prefillTokensPerS.toFixed(1).padStart(14)} ${(baseline.prefillTokensPerS / r.prefillTokensPerS).toFixed(2).padStart(12)}x ` +
        `${r.decodeMsPerToken.toFixed(2).padStart(15)} ${(r.decodeMsPerToken / baseline.decodeMsPerToken).toFixed(2).padStart(12)}x`,
    );
  }
  const routed = get("milora").decodeMsPerToken;
  console.log(`goals: MiLoRA decode ${(routed / baseline.decodeMsPerToken).toFixed(2)}x base (<= 1.10); per-token ${(get("token").decodeMsPerToken / routed).toFixed(2)}x MiLoRA (>= 1.3)`);
  const doraMs = get("dora").decodeMsPerToken;
  console.log(`DoRA decode ${(doraMs / get("lora").decodeMsPerToken).toFixed(2)}x unmerged LoRA; MiLoRA top_k 2 ${(doraMs / routed).toFixed(2)}x faster than DoRA (the paper, Table 4: 1.20x)`);
}
