// Command-line entry: parses arguments with commander and hands each command to its module.
// Each command module exports one function that returns the process exit code
// (0 success, 1 the input has errors, 2 usage error).
import { Command, CommanderError, Option } from "commander";
import { readFileSync } from "node:fs";

const version = (JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string })
  .version;

export async function main(argv: readonly string[]): Promise<number> {
  let exitCode = 0;
  const program = new Command("milora")
    .description("A toolchain for Mixture-of-LoRA (MiLoRA) language models")
    .version(version)
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(text) })
    .showHelpAfterError("(run `milora help` for usage)");

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
    .description("run a prompt on a base model (a Hugging Face directory) and report tokens/s")
    .argument("[spec]", ".milora spec whose base the checkpoint must match (default: DIR/config.json)")
    .requiredOption("--base <dir>", "model directory: config.json and safetensors weights")
    .option("--prompt <text>", "prompt text (needs the directory's tokenizer.json)")
    .option("--tokens <ids>", "prompt as comma-separated token ids")
    .option("--max-tokens <n>", "tokens to generate (0: prompt only)", "32")
    .option("--temperature <t>", "sampling temperature (0: greedy)")
    .option("--top-k <k>", "sample from the k most likely tokens")
    .option("--top-p <p>", "sample from the most likely tokens holding mass p")
    .option("--seed <s>", "sampling seed")
    .option("--json", "print one JSON object { tokens, text?, timings, device, logits? }")
    .addOption(new Option("--logits <which>", "add the prompt's logits to --json output").choices(["last", "all"]))
    .addOption(new Option("--backend <name>", "force a backend").choices(["auto", "vulkan", "metal", "d3d12", "opengles"]))
    .action(async (spec: string | undefined, opts: import("./commands/run.ts").RunOptions) => {
      const { runCommand } = await import("./commands/run.ts");
      exitCode = await runCommand(spec, opts);
    });

  try {
    await program.parseAsync(argv as string[]);
  } catch (err) {
    if (err instanceof CommanderError) {
      // help and --version exit 0 through here; anything else is a usage error
      return err.exitCode === 0 ? 0 : 2;
    }
    throw err;
  }
  return exitCode;
}
