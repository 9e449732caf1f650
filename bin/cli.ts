// Command-line entry: parses arguments with commander and hands each command to its module.
// Each command module exports one function that returns the process exit code, or throws: a user
// error (a MiloraError) is printed here as one line with its kind's exit status, anything else as an
// internal error with its stack (runtime/errors.ts reportError, the printer of every CLI).
import { Command, CommanderError, Option } from "commander";
import { readFileSync } from "node:fs";
import { ERROR_KINDS, exitStatusHelp, reportError } from "../runtime/errors.ts";

/** run and serve store the weights the same way (compile, reading no checkpoint, defaults to f32). */
const WEIGHTS_HELP =
  "how the linear weights are stored on the device: f32, f16, q8 or q4 (default: the spec's weights, else f16 for an F16/BF16 checkpoint, f32 otherwise; docs/weights.md)";

// From the sources bin/cli.ts, built dist/bin/cli.js: milora's package.json is one or two folders up.
const version = (JSON.parse(readFileSync(new URL(import.meta.url.endsWith(".js") ? "../../package.json" : "../package.json", import.meta.url), "utf8")) as { version: string })
  .version;

export async function main(argv: readonly string[]): Promise<number> {
  let exitCode = 0;
  // The command running, for the prefix of its errors ("milora run: ...").
  let running = "milora";
  const program = new Command("milora")
    .description("A toolchain for Mixture-of-LoRA (MiLoRA) language models")
    .version(version)
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(text) })
    .showHelpAfterError("(run `milora help` for usage)")
    .addHelpText("after", `\n${exitStatusHelp()}`)
    .hook("preAction", (_program, command) => {
      running = `milora ${command.name()}`;
    });

  program
    .command("check")
    .description("check .milora specs: every problem with its place, then a budget table per adapter")
    .argument("<files...>", ".milora spec files")
    .option("--json", "print diagnostics and budgets as JSON on stdout")
    .option("--no-color", "plain output")
    .action(async (files: string[], opts: { json?: boolean; color: boolean }) => {
      const { checkCommand } = await import("./commands/check.ts");
      exitCode = await checkCommand(files, opts);
    });

  program
    .command("fmt")
    .description("print a spec in canonical formatting")
    .argument("<files...>", ".milora spec files")
    .option("-w, --write", "rewrite the files in place (atomically)")
    .option("--check", "exit 1 if a file is not formatted")
    .action(async (files: string[], opts: { write?: boolean; check?: boolean }) => {
      const { fmtCommand } = await import("./commands/fmt.ts");
      exitCode = await fmtCommand(files, opts);
    });

  program
    .command("doctor")
    .description("show the WebGPU adapter milora gets and run a compute self-test")
    .addOption(new Option("--backend <name>", "force a backend").choices(["auto", "vulkan", "metal", "d3d12", "opengles"]))
    .option("--json", "print the report as JSON")
    .action(async (opts: { backend?: string; json?: boolean }) => {
      const { doctorCommand } = await import("./commands/doctor.ts");
      exitCode = await doctorCommand(opts);
    });

  program
    .command("run")
    .description("run a prompt on a base model (a Hugging Face directory), with adapters, and report routing and tokens/s")
    .argument("[spec]", ".milora spec or compiled package whose base the checkpoint must match (default: DIR/config.json)")
    .requiredOption("--base <dir>", "model directory: config.json and safetensors weights")
    .option("--prompt <text>", "prompt text (needs the directory's tokenizer.json)")
    .option("--tokens <ids>", "prompt as comma-separated token ids")
    .option("--max-tokens <n>", "tokens to generate (0: prompt only)", "32")
    .option("--temperature <t>", "sampling temperature (0: greedy)")
    .option("--top-k <k>", "sample from the k most likely tokens")
    .option("--top-p <p>", "sample from the most likely tokens holding mass p")
    .option("--seed <s>", "sampling seed")
    .option("--adapter <[name=]dir>", "a PEFT/MiLoRA adapter directory run as tenant NAME (repeat for several tenants, one prompt each); with a spec, DIR is checked against the spec's adapter NAME (SPEC_ADAPTER:NAME picks another; a spec of one adapter checks every DIR against it)", (v: string, all: string[]) => [...all, v], [] as string[])
    .option("--merged", "fold the (single) adapter's LoRA into the base weights for the prompt's routing, then decode the base")
    .option("--weights <format>", WEIGHTS_HELP)
    .option("--beams <n>", "beam search of width n (Hugging Face's num_beams; 1: greedy); the prompt and its routing are shared by every beam")
    .option("--length-penalty <x>", "with --beams: score = sum of log-probabilities / length ** x", "1")
    .addOption(new Option("--early-stopping <when>", "with --beams: stop at n finished hypotheses (true), by HF's heuristic (false), or never early").choices(["false", "true", "never"]).default("false"))
    .option("--num-return-sequences <n>", "with --beams: print the n best hypotheses with their scores", "1")
    .option("--json", "print one JSON object { tokens, text?, timings, device, logits?, adapter?, routing?, score?, beams? } (one line per adapter)")
    .option("--routing-svg <file>", "write each tenant's routing as an SVG heatmap (layers x modules; tokens x layers for per-token routing)")
    .addOption(new Option("--logits <which>", "add the prompt's logits to --json output").choices(["last", "all"]))
    .addOption(new Option("--backend <name>", "force a backend").choices(["auto", "vulkan", "metal", "d3d12", "opengles"]))
    .action(async (spec: string | undefined, opts: import("./commands/run.ts").RunOptions) => {
      const { runCommand } = await import("./commands/run.ts");
      exitCode = await runCommand(spec, opts);
    });

  program
    .command("train")
    .description("fine-tune a spec's adapter (MiLoRA, LoRA, or the per_module/per_ffn baselines) over a frozen Hugging Face base on the GPU")
    .argument("<spec>", ".milora spec declaring the adapter")
    .option("--adapter <name>", "the spec's adapter to train (needed when it declares several)")
    .requiredOption("--base <dir>", "model directory: config.json, safetensors weights, tokenizer.json for text data")
    .requiredOption("--data <file>", "training data, JSONL: prompt/completion, messages, text or input_ids/labels lines")
    .requiredOption("--out <dir>", "where OUT/adapter, OUT/best, OUT/checkpoint and OUT/metrics.jsonl go")
    .option("--eval <file>", "eval data (same forms): eval loss and perplexity, early stopping, best checkpoint")
    .option("--init <dir>", "start from this adapter directory instead of a fresh initialisation")
    .option("--resume <dir>", "continue the run whose --out this was, from its checkpoint")
    .option("--epochs <n>", "passes over the data", "1")
    .option("--steps <n>", "optimizer steps (overrides --epochs)")
    .option("--batch-size <n>", "sequences per micro-batch", "8")
    .option("--grad-accum <n>", "micro-batches per optimizer step", "1")
    .option("--lr <x>", "peak learning rate", "1e-4")
    .addOption(new Option("--lr-schedule <kind>", "learning-rate schedule after warm-up").choices(["linear", "cosine", "constant"]).default("linear"))
    .option("--warmup <x>", "warm-up: a ratio of the steps (< 1) or a number of steps", "0.06")
    .addOption(new Option("--optimizer <kind>", "optimizer").choices(["adamw", "sgd"]).default("adamw"))
    .option("--weight-decay <x>", "AdamW's decoupled weight decay", "0")
    .option("--max-grad-norm <x>", "clip the global gradient norm to this (0: off)", "1")
    .option("--max-length <n>", "cut longer examples to this many tokens", "768")
    .option("--seed <n>", "seed of the initialisation and the data order", "0")
    .option("--no-shuffle", "keep the data in file order")
    .option("--eval-every <n>", "evaluate every n steps (0: at the end only)", "200")
    .option("--patience <n>", "stop after n evaluations without a better eval loss (0: never)", "0")
    .option("--save-every <n>", "write a resumable checkpoint every n steps (0: at the end)", "0")
    .option("--activation-lr <x>", "learning rate of the rational activation, trained on eval batches (bi-level, as in the paper)", "1e-6")
    .option("--chat-template <file>", "a Jinja chat template for messages lines (default: the base's)")
    .option("--weights <format>", `${WEIGHTS_HELP}; the frozen base is read in that format by the forward and backward`)
    .option("--json", "print each step's metrics as one JSON line on stdout")
    .addOption(new Option("--backend <name>", "force a backend").choices(["auto", "vulkan", "metal", "d3d12", "opengles"]))
    .action(async (spec: string, opts: import("./commands/train.ts").TrainCommandOptions) => {
      const { trainCommand } = await import("./commands/train.ts");
      exitCode = await trainCommand(spec, opts);
    });

  program
    .command("report")
    .description("draw a milora train run's loss and eval curves (OUT/metrics.jsonl) as an SVG")
    .argument("<out>", "the run's --out directory, or its metrics.jsonl")
    .option("--out <file>", "where to write the SVG (default: OUT/report.svg)")
    .action(async (dir: string, opts: import("./commands/report.ts").ReportOptions) => {
      const { reportCommand } = await import("./commands/report.ts");
      exitCode = reportCommand(dir, opts);
    });

  program
    .command("compile")
    .description("compile a spec's adapter into a runnable npm package: kernels, manifest, typed API")
    .argument("<spec>", ".milora spec file")
    .requiredOption("--out <dir>", "the package directory to write (must be empty unless --force)")
    .option("--adapter <name>", "which adapter (needed when the spec declares several)")
    .option("--name <name>", "npm package name (default: the adapter's name in kebab case)")
    .option("--pkg-version <version>", "npm package version (default 0.1.0)")
    .option("--ctx <n>", "context positions the kernels serve (default: max_positions, factor x max_positions with dynamic rope scaling, at most 2048)")
    .option("--weights <format>", "how the package stores the linear weights: f32, f16, q8 or q4 (default: the spec's weights, else f32; docs/weights.md)")
    .option("--calibration <file>", "the matvec row limits of the device the package is for, as `milora bench --calibrate` wrote them there (default: the plan's 28)")
    .option("-f, --force", "replace a non-empty --out directory that milora compile wrote")
    .option("--force-any", "replace a non-empty --out directory even if milora compile did not write it (never the current directory, an ancestor of it, or one holding the spec)")
    .option("--no-color", "plain output")
    .action(async (spec: string, opts: import("./commands/compile.ts").CompileCommandOptions) => {
      const { compileCommand } = await import("./commands/compile.ts");
      exitCode = await compileCommand(spec, opts);
    });

  program
    .command("serve")
    .description("serve a base model and its adapters over an OpenAI-compatible HTTP API")
    .argument("[spec]", ".milora spec or compiled package: its base, and the adapters checked against it (default: DIR/config.json)")
    .requiredOption("--base <dir>", "model directory: config.json, safetensors weights, tokenizer files")
    .option("--adapter <name=dir>", "serve the adapter in DIR as model NAME (repeatable); with a spec, DIR is checked against the spec's adapter NAME (SPEC_ADAPTER:NAME picks another; a spec of one adapter checks every DIR against it)", (v: string, all: string[]) => [...all, v], [] as string[])
    .option("--served-model-name <name>", "the base model's id in the API (default: the base's name)")
    .option("--chat-template <file>", "a Jinja chat template (or chat_template.json) for every request, over the model's and adapters' own")
    .option("--cors-origin <origin>", "let browser pages from this origin call the API (repeatable; * for any; off by default)", (v: string, all: string[]) => [...all, v], [] as string[])
    .option("--no-access-log", "no access log line per request on stderr")
    .option("--max-batch-rows <n>", "rows one engine step runs (default: the context, within the device's binding limit); a longer prompt is prefilled in chunks")
    .option("--host <host>", "interface to bind", "127.0.0.1")
    .option("--port <n>", "port to listen on (0: any free one)", "8000")
    .option("--api-key <key>", "require this bearer key on every route but /health (default: $MILORA_API_KEY)")
    .option("--max-sequences <n>", "KV cache slots: requests decoding at once", "8")
    .option("--max-queue <n>", "requests that may wait for a slot before 429", "64")
    .option("--max-adapters <n>", "adapters resident at once (least recently used evicted)", "8")
    .option("--ctx <n>", "positions per sequence (default: the model's, capped at 2048)")
    .option("--weights <format>", WEIGHTS_HELP)
    .option("--allow-adapter-loading", "let clients add and remove adapters at run time (POST/DELETE /v1/adapters; off by default), only from --adapter-root")
    .option("--adapter-root <dir>", "with --allow-adapter-loading: the directory adapters loaded at run time must lie in (symlinks resolved)")
    .option("--adapter-load-timeout <s>", "seconds an adapter's files may take to read before the read is stopped", "60")
    .option("--headers-timeout <s>", "seconds a client has to send a request's headers", "10")
    .option("--request-timeout <s>", "seconds a client has to send a whole request, body included (answers may stream for longer)", "30")
    .option("--max-connections <n>", "connections held at once; more are closed as they arrive", "512")
    .option("--no-ui", "no page at / (the live view of throughput, latency, KV slots and routing)")
    .addOption(new Option("--backend <name>", "force a backend").choices(["auto", "vulkan", "metal", "d3d12", "opengles"]))
    .action(async (spec: string | undefined, opts: import("./commands/serve.ts").ServeOptions) => {
      const { serveCommand } = await import("./commands/serve.ts");
      exitCode = await serveCommand(spec, opts);
    });

  program
    .command("bench")
    .description("measure decode and prefill speed on this device: base, merged and unmerged LoRA, MiLoRA, per-token routing, DoRA, at each weight format, tenant count and beam width; or calibrate the kernels' row crossover")
    .argument("[spec]", ".milora spec whose adapter shape (rank, modules, router) the tenants take (default: rank 8 on all seven modules, the default router)")
    .option("--base <dir>", "model directory: config.json and safetensors weights")
    .option("--random <size>", "a random LLaMA instead: tiny or small, sizes changed by KEY=N (small,hidden=2048,layers=16; keys hidden, layers, heads, kv-heads, intermediate, vocab, positions, seed)")
    .option("--adapter <name>", "the spec's adapter to take the shape of (needed when it declares several)")
    .option("--modes <list>", "what to run, comma-separated: base, merged, lora, milora, token, moelora, mixlora, dora (default: all; mixlora where the adapter has MLP LoRA)")
    .option("--weights <list>", "weight storage formats, comma-separated", "f32,f16,q8,q4")
    .option("--tenants <list>", "concurrent tenants (sequences of distinct adapters), comma-separated", "1,8,16")
    .option("--beams <list>", "beam widths, comma-separated (1: greedy)", "1,3")
    .option("--prompt <n>", "prompt tokens per request", "32")
    .option("--decode <n>", "decode steps per request", "16")
    .option("--repeats <n>", "rounds over every mode (or, with --calibrate, submits per row count); the best counts", "2")
    .option("--json", "print the rows (and ratios) as one JSON object")
    .option("--calibrate", "measure each weight format's matvec/matmul row crossover on this device and write the calibration that run, serve and compile use")
    .option("--calibration <file>", "the calibration file to write (--calibrate) or read (default: the device's own under ~/.cache/milora/calibration/, $XDG_CACHE_HOME respected)")
    .option("--rows <list>", "with --calibrate: the row counts to time, ascending (default 1,4,8,...,256)")
    .addOption(new Option("--backend <name>", "force a backend").choices(["auto", "vulkan", "metal", "d3d12", "opengles"]))
    .action(async (spec: string | undefined, opts: import("./commands/bench.ts").BenchOptions) => {
      const { benchCommand } = await import("./commands/bench.ts");
      exitCode = await benchCommand(spec, opts);
    });

  try {
    await program.parseAsync(argv as string[]);
  } catch (err) {
    if (err instanceof CommanderError) {
      // help and --version exit 0 through here; anything else is a usage error (commander printed it)
      return err.exitCode === 0 ? 0 : ERROR_KINDS.usage.exit;
    }
    return reportError(err, { program: running });
  }
  return exitCode;
}
