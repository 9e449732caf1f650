// The command line of a compiled package (its `bin`, cli.js): load the package with a base checkpoint
// and adapters, then generate after a prompt or print its routing. Exit 0 on success, 1 when the
// inputs are wrong (files, shapes, unsupported requests), 2 on bad usage.
import { parseArgs } from "node:util";
import { AdapterStoreError } from "../engine/tenants.ts";
import { NoAdapterError } from "../gpu/device.ts";
import { EngineError } from "../engine/engine.ts";
import { loadCompiledModel, PackageError, UnsupportedError, type CompiledModel, type Prompt } from "./loader.ts";
import { CheckpointError } from "../formats/safetensors.ts";
import { SequenceError } from "../engine/sequence.ts";

const USAGE = `usage: <package> --base DIR (--prompt TEXT | --tokens IDS) [options]

  --base DIR            the base model: a Hugging Face directory
  --adapter NAME=DIR    a tenant's adapter directory, run as tenant NAME and checked against the
                        package's adapter (repeatable; the same meaning as milora run and serve)
  --tenant NAME         apply this tenant's adapter
  --prompt TEXT         prompt text (needs DIR/tokenizer.json)
  --tokens IDS          prompt as comma-separated token ids
  --max-tokens N        tokens to generate (default 32)
  --temperature T       sampling temperature (default 0: greedy)
  --top-k K, --top-p P  sampling cut-offs
  --seed S              sampling seed
  --route               print the tenant's routing decision instead of generating
  --json                print one JSON object
  --backend NAME        force a WebGPU backend (vulkan, metal, d3d12, opengles)
`;

class UsageError extends Error {}

export async function runPackageCli(packageDir: string | URL, argv: readonly string[]): Promise<number> {
  let model: CompiledModel<string> | undefined;
  try {
    const args = parseCli(argv);
    if (args === "help") {
      process.stdout.write(USAGE);
      return 0;
    }
    model = await loadCompiledModel(packageDir, {
      base: args.base,
      adapters: args.adapters,
      ...(args.backend === undefined ? {} : { backend: args.backend }),
      maxSequences: 1,
    });
    if (args.route) {
      if (args.tenant === undefined) throw new UsageError("--route needs --tenant");
      const routing = await model.route(args.prompt, { tenant: args.tenant });
      process.stdout.write(JSON.stringify(routing) + "\n");
      return 0;
    }
    const tokens: number[] = [];
    let text: string | undefined;
    const options = { ...args.sampling, ...(args.maxTokens === undefined ? {} : { maxTokens: args.maxTokens }), ...(args.tenant === undefined ? {} : { tenant: args.tenant }) };
    for await (const token of model.generate(args.prompt, options)) {
      tokens.push(token.id);
      if (token.text !== undefined) text = (text ?? "") + token.text;
      if (!args.json) process.stdout.write(token.text ?? `${token.id} `);
    }
    const promptTokens = model.encode(args.prompt);
    process.stdout.write(args.json ? JSON.stringify({ promptTokens, tokens, ...(text === undefined ? {} : { text }) }) + "\n" : "\n");
    return 0;
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`${e.message}\n(run with --help for usage)\n`);
      return 2;
    }
    const userError = [PackageError, UnsupportedError, CheckpointError, AdapterStoreError, EngineError, SequenceError, NoAdapterError].some((c) => e instanceof c);
    if (!userError) throw e;
    process.stderr.write(`${(e as Error).message}\n`);
    return 1;
  } finally {
    model?.destroy();
  }
}

interface CliArgs {
  readonly base: string;
  readonly adapters: Record<string, string>;
  readonly tenant?: string;
  readonly prompt: Prompt;
  readonly maxTokens?: number;
  readonly sampling: { temperature?: number; topK?: number; topP?: number; seed?: number };
  readonly route: boolean;
  readonly json: boolean;
  readonly backend?: string;
}

function parseCli(argv: readonly string[]): CliArgs | "help" {
  let values;
  try {
    ({ values } = parseArgs({
      args: [...argv],
      options: {
        base: { type: "string" },
        adapter: { type: "string", multiple: true },
        tenant: { type: "string" },
        prompt: { type: "string" },
        tokens: { type: "string" },
        "max-tokens": { type: "string" },
        temperature: { type: "string" },
        "top-k": { type: "string" },
        "top-p": { type: "string" },
        seed: { type: "string" },
        route: { type: "boolean" },
        json: { type: "boolean" },
        backend: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (values.help) return "help";
  if (values.base === undefined) throw new UsageError("--base DIR is required");
  if ((values.prompt === undefined) === (values.tokens === undefined)) throw new UsageError("give exactly one of --prompt TEXT and --tokens IDS");
  const adapters: Record<string, string> = {};
  for (const a of values.adapter ?? []) {
    const eq = a.indexOf("=");
    if (eq <= 0 || eq === a.length - 1) throw new UsageError(`--adapter must be NAME=DIR, got "${a}"`);
    adapters[a.slice(0, eq)] = a.slice(eq + 1);
  }
  const number = (flag: string, text: string | undefined, integer: boolean) => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (text.trim() === "" || !Number.isFinite(n) || (integer && (!Number.isInteger(n) || n < 0))) {
      throw new UsageError(`--${flag} must be ${integer ? "an integer >= 0" : "a number"}, got "${text}"`);
    }
    return n;
  };
  const sampling = Object.fromEntries(
    Object.entries({
      temperature: number("temperature", values.temperature, false),
      topK: number("top-k", values["top-k"], true),
      topP: number("top-p", values["top-p"], false),
      seed: number("seed", values.seed, true),
    }).filter(([, v]) => v !== undefined),
  );
  const prompt: Prompt = values.prompt ?? values.tokens!.split(",").map((t) => number("tokens", t, true)!);
  return {
    base: values.base,
    adapters,
    ...(values.tenant === undefined ? {} : { tenant: values.tenant }),
    prompt,
    ...(values["max-tokens"] === undefined ? {} : { maxTokens: number("max-tokens", values["max-tokens"], true)! }),
    sampling,
    route: values.route === true,
    json: values.json === true,
    ...(values.backend === undefined ? {} : { backend: values.backend }),
  };
}
