// The adapters a server knows and the few it keeps resident, as vLLM's --max-loras and S-LoRA do:
// registered adapters live on disk; a request for one that is not resident loads it (on a worker
// thread, so decoding goes on meanwhile, and terminated past a time bound) and evicts the least
// recently used adapter no sequence is using. When every resident adapter is in use, the request
// waits for one to be let go.
//
// A name and the instance registered under it are apart: unregistering frees the name at once (a new
// adapter may take it, as in vLLM), while the old instance drains, resident until its last sequence
// ends. Instances are known by a key (the name for the first, `name#2`, `name#3`... for later ones
// registered while an older one still drains; `#` is not allowed in names), which is what the
// scheduler pins and the engine knows the weights by: `keyOf(name)` gives the current one.
import { existsSync, statSync } from "node:fs";
import type { Worker } from "node:worker_threads";
import type { Adapter, BaseModel } from "../../compiler/model.ts";
import type { LoadedAdapter } from "../formats/adapter.ts";
import { CheckpointError } from "../formats/safetensors.ts";
import type { AdapterResidency } from "./scheduler.ts";
import { tsWorker } from "../ts-worker.ts";
import { MiloraError } from "../errors.ts";

/** Where resident adapters live for the engine (its GPU copies of their weights). */
export interface AdapterHost {
  /** Makes an adapter usable by sequences created after this resolves; `adapter.name` is the instance key. */
  add(adapter: LoadedAdapter): void | Promise<void>;
  /** Frees an adapter (by instance key) no sequence uses any more. */
  remove(name: string): void;
  /** The engine's adapter slot a resident instance occupies, when the host tells. */
  slotOf?(key: string): number | undefined;
}

/** What GET /v1/adapters says of one registered adapter. */
export interface AdapterInfo {
  readonly id: string;
  readonly object: "adapter";
  readonly resident: boolean;
  readonly loading: boolean;
  /** The engine's adapter slot while resident, else null. */
  readonly slot: number | null;
  /** Sequences using it now. */
  readonly running: number;
  /** Unix seconds of the last request for it (null: none since it was registered). */
  readonly last_used: number | null;
  /** Whether its router runs once on the prompt (MiLoRA), once known. */
  readonly prompt_routed: boolean;
}

/**
 * Reads an adapter directory, checked against `spec` when given; with `root`, every file read must lie
 * inside it once symlinks are resolved. The default reads it on a worker thread.
 */
export type AdapterReader = (dir: string, name: string, base: BaseModel, spec: Adapter | undefined, root?: string) => Promise<LoadedAdapter>;

/** Adapter reads that a worker answers within this bound by default (a large adapter reads in seconds). */
export const DEFAULT_READ_TIMEOUT_MS = 60_000;

export interface AdapterPoolOptions {
  readonly base: BaseModel;
  readonly host: AdapterHost;
  /** Adapters resident at once. */
  readonly maxResident: number;
  /** The reader (default: a worker thread per read, terminated after `readTimeoutMs`). */
  readonly read?: AdapterReader;
  /** The default reader's time bound per adapter (default DEFAULT_READ_TIMEOUT_MS). */
  readonly readTimeoutMs?: number;
  /** The spec an adapter registered under a name must match (default: none, its own config says). Throws CheckpointError. */
  readonly specOf?: (name: string) => Adapter | undefined;
}

/** An adapter name the pool does not know. */
export class UnknownAdapterError extends MiloraError {
  override name = "UnknownAdapterError";
  readonly kind = "adapter";
}

/** An adapter read that ran past its time bound; its worker was terminated. */
export class AdapterReadTimeoutError extends CheckpointError {
  override name = "AdapterReadTimeoutError";
  constructor(
    readonly adapter: string,
    readonly timeoutMs: number,
  ) {
    super(`adapter ${adapter}: reading its files took longer than ${timeoutMs / 1000} s, so the read was stopped`);
  }
}

interface Entry {
  /** The name it was registered under. */
  readonly name: string;
  readonly dir: string;
  /** Files read must stay inside it (run-time registrations). */
  readonly root: string | undefined;
  readonly spec: Adapter | undefined;
  /** Settles when the adapter is resident (or failed to load); absent while on disk only. */
  loading?: Promise<void>;
  resident: boolean;
  /** Sequences using it now. */
  pins: number;
  /** Use counter at its last acquire: the LRU order. */
  lastUsed: number;
  /** Date.now() at its last acquire (0: never). */
  lastUsedAt: number;
  /** Unregistered while in use: removed when the last pin goes. */
  retired: boolean;
  /** Whether its router runs once on the whole prompt (known once it has loaded). */
  promptRouted: boolean;
}

export interface AdapterPoolStats {
  readonly registered: number;
  readonly resident: number;
  readonly loads: number;
  readonly evictions: number;
}

export interface RegisterOptions {
  /** Every file read must lie inside this real path (run-time registrations through the API). */
  readonly root?: string;
}

export class AdapterPool implements AdapterResidency {
  readonly #opts: AdapterPoolOptions;
  readonly #read: AdapterReader & { close?: () => void };
  /** Instances by key, draining ones included. */
  readonly #entries = new Map<string, Entry>();
  /** Registered names -> their current instance's key. */
  readonly #current = new Map<string, string>();
  /** Acquirers waiting for a resident adapter to become evictable. */
  #waiters: (() => void)[] = [];
  #clock = 0;
  #loads = 0;
  #evictions = 0;
  #instances = 0;
  #closed = false;

  constructor(options: AdapterPoolOptions) {
    if (!Number.isInteger(options.maxResident) || options.maxResident < 1) {
      throw new RangeError(`the resident adapter bound must be a positive integer, got ${options.maxResident}`);
    }
    this.#opts = options;
    this.#read = options.read ?? workerReader({ timeoutMs: options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT_MS });
  }

  /**
   * Adds an adapter directory under `name` and loads it once to check its files (it stays resident if
   * there is room). Throws CheckpointError for a bad directory, and for a name already registered.
   */
  async register(name: string, dir: string, options: RegisterOptions = {}): Promise<void> {
    if (!/^[A-Za-z0-9][A-Za-z0-9._:-]*$/.test(name)) throw new CheckpointError(`adapter name "${name}": use letters, digits and . _ : - only`);
    if (this.#current.has(name)) throw new CheckpointError(`an adapter named ${name} is already registered`);
    if (this.#closed) throw new CheckpointError("the adapter pool is closed");
    if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new CheckpointError(`no adapter directory ${dir}`);
    const key = this.#entries.has(name) ? `${name}#${++this.#instances + 1}` : name;
    const entry: Entry = { name, dir, root: options.root, spec: this.#opts.specOf?.(name), resident: false, pins: 0, lastUsed: 0, lastUsedAt: 0, retired: false, promptRouted: false };
    this.#entries.set(key, entry);
    this.#current.set(name, key);
    try {
      await this.acquire(key);
      this.release(key);
    } catch (e) {
      if (this.#current.get(name) === key) this.#current.delete(name);
      this.#entries.delete(key);
      throw e;
    }
  }

  /** Forgets an adapter's name at once; the instance, while still in use, stays resident until its last sequence ends. */
  unregister(name: string): void {
    const key = this.#current.get(name);
    if (key === undefined) throw new UnknownAdapterError(`no adapter named ${name}`);
    const entry = this.#entries.get(key)!;
    this.#current.delete(name);
    entry.retired = true;
    if (entry.pins === 0) this.#drop(key, entry);
  }

  has(name: string): boolean {
    return this.#current.has(name);
  }

  /** The key of the instance registered under `name` now: what requests for it pin. */
  keyOf(name: string): string | undefined {
    return this.#current.get(name);
  }

  /** Whether an instance's router runs once over the whole prompt (MiLoRA's prompt routing). */
  routesOnPrompt(key: string): boolean {
    return this.#entries.get(key)?.promptRouted ?? false;
  }

  /** Registered adapter names, in registration order. */
  names(): string[] {
    return [...this.#current.keys()];
  }

  /** The directory an adapter was registered from. */
  dirOf(name: string): string | undefined {
    const key = this.#current.get(name);
    return key === undefined ? undefined : this.#entries.get(key)?.dir;
  }

  /** Every registered adapter, in registration order, with its residency. */
  list(): AdapterInfo[] {
    return [...this.#current].map(([name, key]) => {
      const e = this.#entries.get(key)!;
      return {
        id: name,
        object: "adapter" as const,
        resident: e.resident,
        loading: !e.resident && e.loading !== undefined,
        slot: e.resident ? (this.#opts.host.slotOf?.(key) ?? null) : null,
        running: e.pins,
        last_used: e.lastUsedAt === 0 ? null : Math.floor(e.lastUsedAt / 1000),
        prompt_routed: e.promptRouted,
      };
    });
  }

  /** Keys of the resident instances (draining ones included). */
  residentNames(): string[] {
    return [...this.#entries].filter(([, e]) => e.resident).map(([k]) => k);
  }

  stats(): AdapterPoolStats {
    return { registered: this.#current.size, resident: this.residentNames().length, loads: this.#loads, evictions: this.#evictions };
  }

  /** Pins the instance `key` (a name's first instance has its name as key), loading it if it is not resident. */
  async acquire(key: string): Promise<void> {
    const entry = this.#entries.get(key);
    if (!entry || entry.retired) throw new UnknownAdapterError(`no adapter named ${entry?.name ?? key}`);
    entry.pins++;
    entry.lastUsed = ++this.#clock;
    entry.lastUsedAt = Date.now();
    try {
      while (!entry.resident) {
        if (this.#closed) throw new CheckpointError(`adapter ${entry.name}: the server is shutting down`);
        if (!entry.loading) {
          // Room first: a resident adapter nobody uses makes way, or this waits for one to be let go.
          if (!this.#makeRoom()) {
            await new Promise<void>((wake) => this.#waiters.push(wake));
            continue;
          }
          entry.loading = this.#load(key, entry).finally(() => (entry.loading = undefined));
        }
        await entry.loading;
      }
    } catch (e) {
      this.release(key);
      throw e;
    }
  }

  release(key: string): void {
    const entry = this.#entries.get(key);
    if (!entry || entry.pins === 0) throw new Error(`adapter pool: ${key} is not in use`);
    entry.pins--;
    if (entry.pins > 0) return;
    if (entry.retired) this.#drop(key, entry);
    this.#wakeWaiters();
  }

  /** Stops every read in progress (their workers terminated, their acquirers rejected); later loads are refused. */
  close(): void {
    this.#closed = true;
    this.#read.close?.();
    this.#wakeWaiters();
  }

  async #load(key: string, entry: Entry): Promise<void> {
    const adapter = await this.#read(entry.dir, entry.name, this.#opts.base, entry.spec, entry.root);
    if (this.#closed) throw new CheckpointError(`adapter ${entry.name}: the server is shutting down`);
    await this.#opts.host.add({ ...adapter, name: key });
    entry.promptRouted = adapter.spec?.router?.when === "prompt";
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

  #evict(key: string, entry: Entry): void {
    entry.resident = false;
    this.#opts.host.remove(key);
    this.#evictions++;
  }

  #drop(key: string, entry: Entry): void {
    if (entry.resident) this.#evict(key, entry);
    this.#entries.delete(key);
    this.#wakeWaiters();
  }

  #wakeWaiters(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }
}

const workerModule = new URL("./adapter-read-worker.ts", import.meta.url);

/**
 * The default reader: each read on its own worker thread, terminated when it runs past `timeoutMs`
 * (AdapterReadTimeoutError naming the adapter) or when the reader is closed, so that no read (a
 * pathological config, a file that never ends) outlives its bound or keeps the process alive.
 */
export function workerReader(options: { readonly timeoutMs: number; readonly module?: URL }): AdapterReader & { close(): void } {
  const live = new Map<Worker, (e: Error) => void>();
  const read: AdapterReader = (dir, name, base, spec, root) =>
    new Promise((resolve, reject) => {
      const worker = tsWorker(options.module ?? workerModule, { workerData: { dir, name, base, spec, root } });
      let settled = false;
      const settle = (f: () => void) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        live.delete(worker);
        f();
      };
      const stop = (e: Error) => settle(() => void worker.terminate().finally(() => reject(e)));
      live.set(worker, stop);
      const timer = setTimeout(() => stop(new AdapterReadTimeoutError(name, options.timeoutMs)), options.timeoutMs);
      worker.once("message", (m: { adapter?: LoadedAdapter; error?: string }) =>
        settle(() => (m.adapter ? resolve(m.adapter) : reject(new CheckpointError(m.error ?? `adapter ${name}: the reader stopped without an answer`)))),
      );
      worker.once("error", (e: Error) => settle(() => reject(new CheckpointError(`adapter ${name}: ${e.message}`))));
      worker.once("exit", (code) => settle(() => reject(new CheckpointError(`adapter ${name}: the reader exited with code ${code}`))));
    });
  return Object.assign(read, {
    close: () => {
      for (const stop of [...live.values()]) stop(new CheckpointError("the adapter read was stopped: the server is shutting down"));
    },
  });
}
