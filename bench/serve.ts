// Serving speed over HTTP: generated tokens/s and time to first token / time per output token
// (p50, p99) for 1, 4 and 16 concurrent streaming clients over 8 tenants with distinct, uniform and
// skewed adapter popularity (Punica's workloads), against the same load served one request at a time
// (one KV slot), and the base model alone under the same load.
// Tenants are plain LoRA on all seven modules (`--tenants lora`, every module on, gate 1) or MiLoRA
// adapters with a top-2-of-7 prompt router per layer (`--tenants milora`), at the same rank.
//   node --import tsx bench/serve.ts [--model tiny|small] [--tenants lora|milora] [--requests N] [--tokens N] [--json FILE] [--svg FILE]
// --json writes the table as data, --svg the throughput-against-clients chart (bench/chart.ts renders one from the other).
import { writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { checkSource } from "../compiler/check.ts";
import { readHfConfig } from "../compiler/hf-config.ts";
import { mulberry32, writeRandomCheckpoint, type RandomCheckpointOptions } from "../examples/random-checkpoint.ts";
import { writeRandomAdapter, writeRandomPeftAdapter } from "../examples/random-adapter.ts";
import { acquireDevice, adapterSummary } from "../runtime/gpu/device.ts";
import { startServing } from "../runtime/serving/http/start.ts";
import { servingPlan } from "../bin/engine-plan.ts";
import { serveChart, type ServeResult, type ServeRow } from "./chart.ts";

const MODELS: Record<string, RandomCheckpointOptions> = {
  tiny: { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 512, maxPositions: 256, seed: 1, tokenizer: true },
  small: { hiddenSize: 512, layers: 4, heads: 8, kvHeads: 4, intermediateSize: 1408, vocabSize: 512, maxPositions: 256, seed: 3, tokenizer: true },
};
const TENANTS = 8;
const ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const;
const PROMPTS = ["hello world, how are you", "the model reads a short text", "thank you, I am fine today", "hello there"];

type Popularity = "distinct" | "uniform" | "skewed" | "base";

/** Which tenant each request goes to: its client's own, any at random, or Zipf(1) over the tenants. */
function tenantOf(popularity: Popularity, client: number, random: () => number): string | undefined {
  if (popularity === "base") return undefined;
  if (popularity === "distinct") return `t${client % TENANTS}`;
  if (popularity === "uniform") return `t${Math.floor(random() * TENANTS)}`;
  const weights = Array.from({ length: TENANTS }, (_, i) => 1 / (i + 1));
  let x = random() * weights.reduce((a, b) => a + b, 0);
  for (let i = 0; i < TENANTS; i++) if ((x -= weights[i]!) <= 0) return `t${i}`;
  return `t${TENANTS - 1}`;
}

interface Sample {
  ttftMs: number;
  tpotMs: number;
  tokens: number;
}

/** One streamed completion, timed from the request to the first and the last chunk. */
async function timedRequest(url: string, model: string, prompt: string, maxTokens: number): Promise<Sample> {
  const started = performance.now();
  const res = await fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model, prompt, max_tokens: maxTokens, temperature: 0, stream: true, ignore_eos: true }),
  });
  if (!res.ok || !res.body) throw new Error(`request failed: ${res.status} ${await res.text()}`);
  let first: number | undefined;
  let tokens = 0;
  let buffered = "";
  const decoder = new TextDecoder();
  for await (const bytes of res.body) {
    buffered += decoder.decode(bytes as Uint8Array, { stream: true });
    const events = buffered.split("\n\n");
    buffered = events.pop()!;
    for (const e of events) {
      if (!e.startsWith("data: {")) continue;
      const ids = (JSON.parse(e.slice(6)) as { milora: { token_ids: number[] } }).milora.token_ids.length;
      if (ids > 0) first ??= performance.now();
      tokens += ids;
    }
  }
  const end = performance.now();
  return { ttftMs: first! - started, tpotMs: tokens > 1 ? (end - first!) / (tokens - 1) : 0, tokens };
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { model: { type: "string", default: "tiny" }, tenants: { type: "string", default: "lora" }, requests: { type: "string", default: "48" }, tokens: { type: "string", default: "24" }, json: { type: "string" }, svg: { type: "string" } } });
  const options = MODELS[values.model!];
  if (!options) throw new Error(`--model must be one of ${Object.keys(MODELS).join(", ")}`);
  const requests = Number(values.requests);
  const maxTokens = Number(values.tokens);
  const root = join(".cache", "bench", "serve");
  const dir = join(root, values.model!);
  writeRandomCheckpoint(dir, options);
  const base = readHfConfig(dir);
  if (values.tenants !== "lora" && values.tenants !== "milora") throw new Error("--tenants must be lora or milora");
  // A MiLoRA spec over this checkpoint, checked like any user's spec: rank 8 on all 7 modules, top-2 prompt router.
  const spec = `base bench from "${resolve(dir, "config.json")}"\nadapter bench_milora on bench {\n  experts all { rank 8 alpha 16 }\n  router { select top_k 2 when prompt }\n}\n`;
  const miloraSpec = checkSource(spec, resolve(root, "bench.milora")).program.adapters[0];
  if (values.tenants === "milora" && !miloraSpec) throw new Error("the bench's MiLoRA spec did not check");
  const adapters = Array.from({ length: TENANTS }, (_, i) => {
    const at = join(root, `${values.model}-${values.tenants}-adapters`, `t${i}`);
    if (values.tenants === "milora") writeRandomAdapter(at, { spec: miloraSpec!, seed: 40 + i, name: `t${i}` });
    else writeRandomPeftAdapter(at, { base, modules: [...ALL_MODULES], rank: 8, alpha: 16, seed: 40 + i, name: `t${i}` });
    return [`t${i}`, at] as const;
  });
  const gpu = await acquireDevice();
  process.stdout.write(`device: ${adapterSummary(gpu.report)}\nmodel: ${values.model}, ${requests} requests of ${maxTokens} tokens each, ${TENANTS} ${values.tenants} tenants (rank 8, all 7 modules${values.tenants === "milora" ? ", top-2 prompt routing" : ""})\n\n`);
  process.stdout.write("| load | clients | popularity | tokens/s | vs one at a time | TTFT p50 / p99 ms | TPOT p50 / p99 ms |\n| --- | ---: | --- | ---: | ---: | ---: | ---: |\n");

  const sequential = new Map<Popularity, number>();
  const rows: ServeRow[] = [];
  for (const slots of [1, 16]) {
    const serving = await startServing({ base, checkpointDir: dir, slots, maxQueue: 256, maxResidentAdapters: TENANTS, adapters, port: 0, gpu, engine: servingPlan({ base, ctx: 128, maxResidentAdapters: TENANTS, adapters }) });
    try {
      for (const clients of slots === 1 ? [16] : [1, 4, 16]) {
        for (const popularity of ["distinct", "uniform", "skewed", "base"] as const) {
          const random = mulberry32(clients * 31 + popularity.length);
          const samples: Sample[] = [];
          let next = 0;
          const started = performance.now();
          await Promise.all(
            Array.from({ length: clients }, async (_, client) => {
              for (let i = next++; i < requests; i = next++) {
                const model = tenantOf(popularity, client, random) ?? base.name;
                samples.push(await timedRequest(serving.server.url, model, PROMPTS[i % PROMPTS.length]!, maxTokens));
              }
            }),
          );
          const seconds = (performance.now() - started) / 1000;
          const rate = samples.reduce((n, s) => n + s.tokens, 0) / seconds;
          if (slots === 1) sequential.set(popularity, rate);
          const ratio = slots === 1 ? "1.00x" : `${(rate / sequential.get(popularity)!).toFixed(2)}x`;
          const t = (key: "ttftMs" | "tpotMs") => `${percentile(samples.map((s) => s[key]), 50).toFixed(1)} / ${percentile(samples.map((s) => s[key]), 99).toFixed(1)}`;
          const load = slots === 1 ? "one at a time" : "batched";
          const p = (key: "ttftMs" | "tpotMs") => ({ p50: percentile(samples.map((s) => s[key]), 50), p99: percentile(samples.map((s) => s[key]), 99) });
          rows.push({ load, clients, popularity, tokensPerSecond: rate, ttftMs: p("ttftMs"), tpotMs: p("tpotMs") });
          process.stdout.write(`| ${load} | ${clients} | ${popularity} | ${rate.toFixed(0)} | ${ratio} | ${t("ttftMs")} | ${t("tpotMs")} |\n`);
        }
      }
    } finally {
      await serving.close();
    }
  }
  const result: ServeResult = {
    bench: "serve",
    device: adapterSummary(gpu.report),
    model: `${values.model} (hidden ${base.hiddenSize}, ${base.layers} layers), ${TENANTS} tenants, rank 8 on all 7 modules`,
    tenants: values.tenants,
    requests,
    tokens: maxTokens,
    rows,
  };
  if (values.json) writeFileSync(values.json, JSON.stringify(result, null, 2) + "\n");
  if (values.svg) writeFileSync(values.svg, serveChart(result));
  gpu.destroy();
}

await main();
