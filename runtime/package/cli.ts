// The command line of a compiled package (its `bin`, cli.js): load the package with a base checkpoint
// and adapters, then generate after a prompt or print its routing. Exit 0 on success; a failure is
// printed by reportError, as milora's own commands print theirs, with its kind's exit status (USAGE).
import { parseArgs } from "node:util";
import { exitStatusHelp, reportError, userError } from "../errors.ts";
import { loadCompiledModel, type CompiledModel, type Prompt } from "./loader.ts";

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

${exitStatusHelp()}`;

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
      if (args.tenant === undefined) throw userError("usage", "--route needs --tenant");
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
    return reportError(e, { usageHint: "run with --help for usage" });
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
    throw userError("usage", (e as Error).message);
  }
  if (values.help) return "help";
  if (values.base === undefined) throw userError("usage", "--base DIR is required");
  if ((values.prompt === undefined) === (values.tokens === undefined)) throw userError("usage", "give exactly one of --prompt TEXT and --tokens IDS");
  const adapters: Record<string, string> = {};
  for (const a of values.adapter ?? []) {
    const eq = a.indexOf("=");
    if (eq <= 0 || eq === a.length - 1) throw userError("usage", `--adapter must be NAME=DIR, got "${a}"`);
    adapters[a.slice(0, eq)] = a.slice(eq + 1);
  }
  const number = (flag: string, text: string | undefined, integer: boolean) => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (text.trim() === "" || !Number.isFinite(n) || (integer && (!Number.isInteger(n) || n < 0))) {
      throw userError("usage", `--${flag} must be ${integer ? "an integer >= 0" : "a number"}, got "${text}"`);
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
