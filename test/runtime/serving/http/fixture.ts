// A server over a tiny random checkpoint (with tokenizer and chat template) on a free loopback
// port, plus the OpenAI client pointed at it: what the server tests share.
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import { readHfConfig } from "../../../../compiler/hf-config.ts";
import { PRESETS, writeRandomCheckpoint } from "../../../../examples/random-checkpoint.ts";
import { writeRandomPeftAdapter } from "../../../../examples/random-adapter.ts";
import { acquireDevice, type GpuContext } from "../../../../runtime/gpu/device.ts";
import { startServing, type Serving, type ServingSetup } from "../../../../runtime/serving/http/start.ts";
import { servingPlan } from "../../../../bin/engine-plan.ts";

export const MODEL = "tiny";
export const CTX = 128;

export interface Fixture {
  readonly serving: Serving;
  readonly client: OpenAI;
  readonly root: string;
  /** Writes a plain PEFT adapter for the tiny base and returns its directory. */
  adapterDir(name: string, seed: number): string;
  /** The server's /metrics sample for `name` (with its label text, if any), or undefined. */
  metric(name: string): Promise<number | undefined>;
  close(): Promise<void>;
}

export interface FixtureOptions extends Partial<ServingSetup> {
  /** Positions per sequence (default CTX). */
  readonly ctx?: number;
  readonly adapterNames?: readonly string[];
  /** Turn run-time adapter loading on, confined to the directory adapterDir() writes in (root/adapters). */
  readonly adapterLoading?: boolean;
  /** Settings that need the checkpoint's directory (e.g. a spec resolved against it). */
  readonly fromCheckpoint?: (dir: string) => Partial<ServingSetup>;
}

export async function startFixture(options: FixtureOptions = {}): Promise<Fixture> {
  const root = mkdtempSync(join(tmpdir(), "milora-serve-"));
  const dir = join(root, MODEL);
  writeRandomCheckpoint(dir, { ...PRESETS.tiny, seed: 11, tokenizer: true });
  const base = readHfConfig(dir);
  mkdirSync(join(root, "adapters"));
  const adapterDir = (name: string, seed: number) => {
    const at = join(root, "adapters", name);
    writeRandomPeftAdapter(at, { base, modules: ["q_proj", "v_proj"], rank: 4, alpha: 8, seed, name });
    return at;
  };
  const gpu: GpuContext = await acquireDevice();
  const setup = {
    base,
    checkpointDir: dir,
    slots: 4,
    ctx: CTX,
    maxQueue: 64,
    maxResidentAdapters: 2,
    port: 0,
    gpu,
    adapters: (options.adapterNames ?? []).map((n, i) => [n, adapterDir(n, 100 + i)] as const),
    ...(options.adapterLoading ? { adapterRoot: join(root, "adapters") } : {}),
    ...options,
    ...options.fromCheckpoint?.(dir),
  };
  // Planned as `milora serve` plans (bin/engine-plan.ts), for the fixture's context and adapters.
  const serving = await startServing({ ...setup, engine: servingPlan(setup) });
  const client = new OpenAI({ baseURL: `${serving.server.url}/v1`, apiKey: options.apiKey ?? "unused", maxRetries: 0, timeout: 30_000 });
  return {
    serving,
    client,
    root,
    adapterDir,
    metric: async (name) => {
      const text = await (await fetch(`${serving.server.url}/metrics`, { headers: { authorization: `Bearer ${options.apiKey ?? ""}` } })).text();
      const line = text.split("\n").find((l) => l.startsWith(`${name} `));
      return line === undefined ? undefined : Number(line.slice(name.length + 1));
    },
    close: async () => {
      await serving.close();
      gpu.destroy();
      rmSync(root, { recursive: true, force: true });
    },
  };
}

/** The `milora` extension of a response or stream chunk. */
export function miloraField(x: unknown): { token_ids: number[]; prompt_token_ids?: number[]; adapter: string | null } {
  return (x as { milora: { token_ids: number[]; prompt_token_ids?: number[]; adapter: string | null } }).milora;
}

/** Polls until `check` holds (the server settles a disconnect at its next step), failing after `ms`. */
export async function eventually(check: () => Promise<boolean>, ms = 5000): Promise<void> {
  const until = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`condition not met within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
