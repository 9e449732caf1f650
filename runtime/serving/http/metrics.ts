// GET /metrics in Prometheus' text format, through prom-client: per-request latency histograms (time
// to first token, time per output token, end to end, queue time) and token counters under vLLM's
// names (vllm:...), so that dashboards made for vLLM read them; the scheduler's and the adapter pool's
// gauges and counters under milora_* names, per tenant where it matters.
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { AdapterPoolStats } from "../adapter-pool.ts";
import type { GenerationResult, SchedulerStats } from "../scheduler.ts";

export const METRICS_CONTENT_TYPE = Registry.PROMETHEUS_CONTENT_TYPE;

// vLLM's buckets for these histograms (seconds).
const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560];
const TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
const LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680];

interface Sources {
  readonly model: string;
  scheduler(): SchedulerStats;
  adapters(): AdapterPoolStats;
}

export class ServerMetrics {
  readonly registry = new Registry();
  readonly #ttft: Histogram;
  readonly #tpot: Histogram;
  readonly #e2e: Histogram;
  readonly #queue: Histogram;
  readonly #prompt: Counter;
  readonly #generation: Counter;
  readonly #success: Counter;
  readonly #model: string;

  constructor(sources: Sources) {
    const registers = [this.registry];
    this.#model = sources.model;
    const labelNames = ["model_name"] as const;
    this.#ttft = new Histogram({ name: "vllm:time_to_first_token_seconds", help: "Seconds from a request's arrival to its first token.", buckets: TTFT_BUCKETS, labelNames, registers });
    this.#tpot = new Histogram({ name: "vllm:time_per_output_token_seconds", help: "Seconds per output token after the first, per choice.", buckets: TPOT_BUCKETS, labelNames, registers });
    this.#e2e = new Histogram({ name: "vllm:e2e_request_latency_seconds", help: "Seconds from a request's arrival to its last token.", buckets: LATENCY_BUCKETS, labelNames, registers });
    this.#queue = new Histogram({ name: "vllm:request_queue_time_seconds", help: "Seconds a request waited for a slot (and its adapter).", buckets: LATENCY_BUCKETS, labelNames, registers });
    this.#prompt = new Counter({ name: "vllm:prompt_tokens_total", help: "Prompt tokens prefilled.", labelNames, registers });
    this.#generation = new Counter({ name: "vllm:generation_tokens_total", help: "Tokens generated.", labelNames, registers });
    this.#success = new Counter({ name: "vllm:request_success_total", help: "Finished requests by finish reason.", labelNames: ["model_name", "finished_reason"], registers });

    const gauge = (name: string, help: string, value: (s: SchedulerStats, a: AdapterPoolStats) => number) =>
      new Gauge({ name, help, registers, collect() { this.set(value(sources.scheduler(), sources.adapters())); } });
    // Totals kept elsewhere, exposed as counters: each scrape sets them to the source's value.
    const total = (name: string, help: string, value: (s: SchedulerStats, a: AdapterPoolStats) => number) =>
      new Counter({ name, help, registers, collect() { this.reset(); this.inc(value(sources.scheduler(), sources.adapters())); } });
    const model = sources.model;
    new Gauge({ name: "vllm:num_requests_running", help: "Sequences decoding (one per choice).", labelNames, registers, collect() { this.set({ model_name: model }, sources.scheduler().running); } });
    new Gauge({ name: "vllm:num_requests_waiting", help: "Requests waiting for a slot.", labelNames, registers, collect() { this.set({ model_name: model }, sources.scheduler().queued); } });
    new Gauge({ name: "vllm:kv_cache_usage_perc", help: "Share of KV cache slots in use (0..1).", labelNames, registers, collect() { const s = sources.scheduler(); this.set({ model_name: model }, s.running / s.slots); } });
    gauge("milora_kv_slots", "KV cache slots requests may fill.", (s) => s.slots);
    gauge("milora_running_sequences", "Sequences holding a KV cache slot.", (s) => s.running);
    gauge("milora_queue_depth", "Requests waiting for a slot (or for their adapter to load).", (s) => s.queued);
    gauge("milora_batch_size", "Sequences in the last engine step.", (s) => s.batchSize);
    gauge("milora_tokens_per_second", "Generated tokens per second over the last 5 seconds.", (s) => s.tokensPerSecond);
    total("milora_steps_total", "Engine steps run.", (s) => s.steps);
    total("milora_generated_tokens_total", "Tokens generated.", (s) => s.generatedTokens);
    total("milora_rejected_requests_total", "Requests refused because the queue was full.", (s) => s.rejected);
    new Counter({
      name: "milora_requests_total",
      help: "Finished requests (choices) by tenant (adapter) and outcome.",
      labelNames: ["adapter", "finish"],
      registers,
      collect() {
        this.reset();
        for (const [adapter, t] of sources.scheduler().tenants) for (const [finish, n] of Object.entries(t.finished)) this.inc({ adapter, finish }, n ?? 0);
      },
    });
    new Counter({
      name: "milora_adapter_generated_tokens_total",
      help: "Tokens generated by tenant (adapter).",
      labelNames: ["adapter"],
      registers,
      collect() {
        this.reset();
        for (const [adapter, t] of sources.scheduler().tenants) this.inc({ adapter }, t.tokens);
      },
    });
    gauge("milora_adapters_registered", "Adapters the server knows.", (_s, a) => a.registered);
    gauge("milora_adapters_resident", "Adapters loaded for the engine.", (_s, a) => a.resident);
    total("milora_adapter_loads_total", "Adapter loads.", (_s, a) => a.loads);
    total("milora_adapter_evictions_total", "Adapters evicted to make room.", (_s, a) => a.evictions);
  }

  /** A finished request: its latencies and token counts (every choice's tokens; TPOT per choice). */
  observe(promptTokens: number, done: GenerationResult): void {
    const labels = { model_name: this.#model };
    this.#prompt.inc(labels, promptTokens);
    this.#queue.observe(labels, done.queueMs / 1000);
    for (const c of done.choices) {
      this.#generation.inc(labels, c.tokens.length);
      this.#success.inc({ ...labels, finished_reason: c.finish === "context" ? "length" : c.finish === "cancelled" ? "abort" : c.finish }, 1);
      if (c.tokens.length > 1) this.#tpot.observe(labels, c.decodeMs / 1000 / (c.tokens.length - 1));
    }
    if (Number.isFinite(done.timeToFirstTokenMs)) {
      this.#ttft.observe(labels, done.timeToFirstTokenMs / 1000);
      this.#e2e.observe(labels, (done.timeToFirstTokenMs + done.decodeMs) / 1000);
    }
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }
}
