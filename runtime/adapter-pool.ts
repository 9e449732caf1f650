// The adapters a server knows and the few it keeps resident, as vLLM's --max-loras and S-LoRA do:
// registered adapters live on disk; a request for one that is not resident loads it (on a worker
// thread, so decoding goes on meanwhile) and evicts the least recently used adapter no sequence is
// using. When every resident adapter is in use, the request waits for one to be let go.
import { existsSync, statSync } from "node:fs";
import { Worker } from "node:worker_threads";
import type { Adapter, BaseModel } from "../compiler/model.ts";
import type { LoadedAdapter } from "./adapter.ts";
import { CheckpointError } from "./safetensors.ts";
import type { AdapterResidency } from "./scheduler.ts";

/** Where resident adapters live for the engine (its GPU copies of their weights). */
export interface AdapterHost {
  /** Makes an adapter usable by sequences created after this resolves. */
  add(adapter: LoadedAdapter): void | Promise<void>;
  /** Frees an adapter no sequence uses any more. */
  remove(name: string): void;
}

/** Reads an adapter directory, checked against `spec` when given; the default reads it on a worker thread. */
export type AdapterReader = (dir: string, name: string, base: BaseModel, spec: Adapter | undefined) => Promise<LoadedAdapter>;

export interface AdapterPoolOptions {
  readonly base: BaseModel;
  readonly host: AdapterHost;
  /** Adapters resident at once. */
  readonly maxResident: number;
  readonly read?: AdapterReader;
  /** The spec an adapter registered under a name must match (default: none, its own config says). Throws CheckpointError. */
  readonly specOf?: (name: string) => Adapter | undefined;
}

/** An adapter name the pool does not know. */
export class UnknownAdapterError extends Error {
  override name = "UnknownAdapterError";
}

interface Entry {
  readonly dir: string;
  readonly spec: Adapter | undefined;
  /** Settles when the adapter is resident (or failed to load); absent while on disk only. */
  loading?: Promise<void>;
  resident: boolean;
  /** Sequences using it now. */
  pins: number;
  /** Use counter at its last acquire: the LRU order. */
  lastUsed: number;
  /** Unregistered while in use: removed when the last pin goes. */
  retired: boolean;
}

export interface AdapterPoolStats {
  readonly registered: number;
  readonly resident: number;
  readonly loads: number;
  readonly evictions: number;
}

export class AdapterPool implements AdapterResidency {
  readonly #opts: AdapterPoolOptions;
  readonly #entries = new Map<string, Entry>();
  /** Acquirers waiting for a resident adapter to become evictable. */
  #waiters: (() => void)[] = [];
  #clock = 0;
  #loads = 0;
  #evictions = 0;

  constructor(options: AdapterPoolOptions) {
    if (!Number.isInteger(options.maxResident) || options.maxResident < 1) {
      throw new RangeError(`the resident adapter bound must be a positive integer, got ${options.maxResident}`);
    }
    this.#opts = options;
  }

  /**
   * Adds an adapter directory under `name` and loads it once to check its files (it stays resident if
   * there is room). Throws CheckpointError for a bad directory, and for a name already registered.
   */
  async register(name: string, dir: string): Promise<void> {
    if (!/^[A-Za-z0-9][A-Za-z0-9._:-]*$/.test(name)) throw new CheckpointError(`adapter name "${name}": use letters, digits and . _ : - only`);
    if (this.#entries.has(name)) throw new CheckpointError(`an adapter named ${name} is already registered`);
    if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new CheckpointError(`no adapter directory ${dir}`);
    const entry: Entry = { dir, spec: this.#opts.specOf?.(name), resident: false, pins: 0, lastUsed: 0, retired: false };
    this.#entries.set(name, entry);
    try {
      await this.acquire(name);
      this.release(name);
    } catch (e) {
      this.#entries.delete(name);
      throw e;
    }
  }

  /** Forgets an adapter; one still in use stays resident until its last sequence ends. */
  unregister(name: string): void {
    const entry = this.#entries.get(name);
    if (!entry || entry.retired) throw new UnknownAdapterError(`no adapter named ${name}`);
    entry.retired = true;
    if (entry.pins === 0) this.#drop(name, entry);
  }

  has(name: string): boolean {
    const entry = this.#entries.get(name);
    return entry !== undefined && !entry.retired;
  }

  /** Registered adapter names, in registration order. */
  names(): string[] {
    return [...this.#entries].filter(([, e]) => !e.retired).map(([n]) => n);
  }

  residentNames(): string[] {
    return [...this.#entries].filter(([, e]) => e.resident).map(([n]) => n);
  }

  stats(): AdapterPoolStats {
    return { registered: this.names().length, resident: this.residentNames().length, loads: this.#loads, evictions: this.#evictions };
  }

  async acquire(name: string): Promise<void> {
    const entry = this.#entries.get(name);
    if (!entry || entry.retired) throw new UnknownAdapterError(`no adapter named ${name}`);
    entry.pins++;
    entry.lastUsed = ++this.#clock;
    try {
      while (!entry.resident) {
        if (!entry.loading) {
          // Room first: a resident adapter nobody uses makes way, or this waits for one to be let go.
          if (!this.#makeRoom()) {
            await new Promise<void>((wake) => this.#waiters.push(wake));
            continue;
          }
          entry.loading = this.#load(name, entry).finally(() => (entry.loading = undefined));
        }
        await entry.loading;
      }
    } catch (e) {
      this.release(name);
      throw e;
    }
  }

  release(name: string): void {
    const entry = this.#entries.get(name);
    if (!entry || entry.pins === 0) throw new Error(`adapter pool: ${name} is not in use`);
    entry.pins--;
    if (entry.pins > 0) return;
    if (entry.retired) this.#drop(name, entry);
    this.#wakeWaiters();
  }

  async #load(name: string, entry: Entry): Promise<void> {
    const adapter = await (this.#opts.read ?? readOnWorker)(entry.dir, name, this.#opts.base, entry.spec);
    await this.#opts.host.add(adapter);
    entry.resident = true;
    this.#loads++;
  }

  /** Whether a load may start now: under the bound, or after evicting the least recently used idle adapter. */
  #makeRoom(): boolean {
    const busy = [...this.#entries.values()].filter((e) => e.resident || e.loading).length;
    if (busy < this.#opts.maxResident) return true;
    const idle = [...this.#entries].filter(([, e]) => e.resident && e.pins === 0).sort(([, a], [, b]) => a.lastUsed - b.lastUsed);
    const victim = idle[0];
    if (!victim) return false;
    this.#evict(victim[0], victim[1]);
    return true;
  }

  #evict(name: string, entry: Entry): void {
    entry.resident = false;
    this.#opts.host.remove(name);
    this.#evictions++;
  }

  #drop(name: string, entry: Entry): void {
    if (entry.resident) this.#evict(name, entry);
    this.#entries.delete(name);
    this.#wakeWaiters();
  }

  #wakeWaiters(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }
}

const workerUrl = new URL("./adapter-read-worker.ts", import.meta.url).href;
// Workers do not inherit tsx's loader (nor take it from --import in execArgv on Node 20), so the
// worker registers it before importing the TypeScript reader.
const workerSource = `import(${JSON.stringify(import.meta.resolve("tsx/esm/api"))}).then((tsx) => { tsx.register(); return import(${JSON.stringify(workerUrl)}); })`;

const readOnWorker: AdapterReader = (dir, name, base, spec) =>
  new Promise((resolve, reject) => {
    const worker = new Worker(workerSource, { eval: true, workerData: { dir, name, base, spec } });
    worker.once("message", (m: { adapter?: LoadedAdapter; error?: string }) => {
      if (m.adapter) resolve(m.adapter);
      else reject(new CheckpointError(m.error ?? `adapter ${name}: the reader stopped without an answer`));
    });
    worker.once("error", (e: Error) => reject(new CheckpointError(`adapter ${name}: ${e.message}`)));
    worker.once("exit", (code) => reject(new CheckpointError(`adapter ${name}: the reader exited with code ${code}`)));
  });
