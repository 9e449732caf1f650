// Everything `milora serve` assembles, in one call the CLI, the tests and the benchmark share: the
// engine over a model directory, the scheduler over its KV cache slots, the adapter pool, the
// tokenizer and chat template, and the HTTP server in front.
import type { Adapter, BaseModel } from "../../../compiler/model.ts";
import { AdapterPool, type AdapterHost, type AdapterReader } from "../adapter-pool.ts";
import type { GpuContext } from "../../gpu/device.ts";
import { Engine, type EngineOptions } from "../../engine/engine.ts";
import { Scheduler } from "../scheduler.ts";
import { Tokenizer } from "../../text/tokenizer.ts";
import { ChatTemplate } from "./chat-template.ts";
import { MiloraServer, type ServerOptions } from "./server.ts";

export interface ServingSetup extends ServerOptions {
  readonly base: BaseModel;
  /** The Hugging Face model directory (config.json, weights, tokenizer files). */
  readonly checkpointDir: string;
  /** KV cache slots: sequences decoding at once. */
  readonly slots: number;
  /** The plan and its kernels: a compiled package's, or one the CLI made (bin/engine-plan.ts servingPlan). */
  readonly engine: Pick<EngineOptions, "plan" | "kernels" | "resolver">;
  /** The spec an adapter registered under a name must match (default: none, its own config says). Throws CheckpointError. */
  readonly adapterSpec?: (name: string) => Adapter | undefined;
  /** Requests that may wait beyond the slots before the server answers 429. */
  readonly maxQueue: number;
  /** Adapters resident at once (vLLM's --max-loras). */
  readonly maxResidentAdapters: number;
  /** Adapters to register at start: [name, directory]. */
  readonly adapters?: readonly (readonly [string, string])[];
  readonly gpu?: GpuContext;
  readonly backend?: string;
  /** Milliseconds an adapter's files may take to read before the read is stopped (default AdapterPool's, 60 s). */
  readonly adapterReadTimeoutMs?: number;
  /** Rows one engine step runs (default the engine's, 256): also the longest prompt a prompt-routed adapter takes. */
  readonly maxBatchRows?: number;
  /** Reads adapter directories (default: on worker threads); tests put slow or failing readers here. */
  readonly readAdapter?: AdapterReader;
  /** The base model's id in the API (vLLM's --served-model-name); default the base's name. */
  readonly servedModelName?: string;
  /** A chat template file for every request (`--chat-template FILE`), over the model's and adapters' own. */
  readonly chatTemplateFile?: string;
  /** Refuses a device before weights are uploaded (the CLI's kernel self-test). */
  readonly checkDevice?: (gpu: GpuContext) => Promise<void>;
}

export interface Serving {
  readonly server: MiloraServer;
  readonly engine: Engine;
  /** Stops adapter reads in progress, drains, stops listening and frees the engine. */
  close(): Promise<void>;
}

export async function startServing(setup: ServingSetup): Promise<Serving> {
  const tokenizer = await Tokenizer.load(setup.checkpointDir);
  const chatTemplate = !tokenizer
    ? undefined
    : setup.chatTemplateFile !== undefined
      ? ChatTemplate.fromFile(setup.chatTemplateFile, setup.checkpointDir)
      : ChatTemplate.load(setup.checkpointDir);
  const engine = await Engine.load({
    base: setup.base,
    checkpointDir: setup.checkpointDir,
    maxSequences: setup.slots,
    maxAdapters: setup.maxResidentAdapters,
    // One step may run a whole context (the engine keeps it within the device's binding limit): a
    // prompt up to the context prefills in one step.
    maxBatchRows: setup.maxBatchRows ?? setup.engine.plan.dims.ctx,
    ...setup.engine,
    ...(setup.gpu ? { gpu: setup.gpu } : {}),
    ...(setup.backend === undefined ? {} : { backend: setup.backend }),
    ...(setup.checkDevice ? { checkDevice: setup.checkDevice } : {}),
  });
  let adapters: AdapterPool | undefined;
  try {
    const slots = new Map<string, number>();
    const host: AdapterHost = {
      add: (a) => void slots.set(a.name, engine.loadAdapter(a.name, a).slot),
      remove: (name) => {
        engine.unloadAdapter(name);
        slots.delete(name);
      },
      slotOf: (key) => slots.get(key),
    };
    adapters = new AdapterPool({
      base: setup.base,
      host,
      maxResident: setup.maxResidentAdapters,
      ...(setup.adapterSpec ? { specOf: setup.adapterSpec } : {}),
      ...(setup.readAdapter ? { read: setup.readAdapter } : {}),
      ...(setup.adapterReadTimeoutMs === undefined ? {} : { readTimeoutMs: setup.adapterReadTimeoutMs }),
    });
    for (const [name, dir] of setup.adapters ?? []) await adapters.register(name, dir);
    const ctx = engine.plan.dims.ctx;
    const scheduler = new Scheduler({ engine, slots: setup.slots, ctx, maxQueue: setup.maxQueue, adapters });
    const pool = adapters;
    const server = await MiloraServer.start(
      {
        scheduler,
        adapters,
        baseName: setup.servedModelName ?? setup.base.name,
        vocabSize: setup.base.vocabSize,
        ctx,
        logitProcessing: engine.plan.logitAdjust !== undefined && engine.plan.chosenLogprob !== undefined,
        ...(tokenizer ? { tokenizer } : {}),
        ...(chatTemplate ? { chatTemplate } : {}),
        // An adapter directory with its own template serves its chats with it, unless the operator named one for all.
        ...(tokenizer && setup.chatTemplateFile === undefined ? { adapterChatTemplate: adapterTemplates(pool, setup.checkpointDir) } : {}),
      },
      setup,
    );
    return {
      server,
      engine,
      close: async () => {
        // Reads in progress are stopped first: requests waiting on them fail, so the drain can end.
        pool.close();
        await server.close();
        tokenizer?.close();
        engine.destroy();
      },
    };
  } catch (e) {
    adapters?.close();
    tokenizer?.close();
    engine.destroy();
    throw e;
  }
}

/** Adapters registered later may bring higher ranks; with none at start, room for the engine's usual 16. */

/** Adapters' own chat templates, read once per registered directory. */
function adapterTemplates(pool: AdapterPool, baseDir: string): (adapter: string) => ChatTemplate | undefined {
  const cache = new Map<string, ChatTemplate | undefined>();
  return (adapter) => {
    const dir = pool.dirOf(adapter);
    if (dir === undefined) return undefined;
    if (!cache.has(dir)) cache.set(dir, ChatTemplate.load(dir, baseDir));
    return cache.get(dir);
  };
}
