// Worker threads that run one of milora's TypeScript modules. Workers do not inherit tsx's loader (nor
// take it from --import in execArgv on Node 20), so the worker registers it before importing the module.
import { Worker, type WorkerOptions } from "node:worker_threads";

/** A worker running the TypeScript module at `moduleUrl` (a file: URL), with `workerData`. */
export function tsWorker(moduleUrl: URL, options: Omit<WorkerOptions, "eval"> = {}): Worker {
  // Built (dist/, or the runtime a compiled package carries): the worker is the JavaScript beside its source's name.
  if (import.meta.url.endsWith(".js")) return new Worker(new URL(moduleUrl.href.replace(/\.ts$/, ".js")), options);
  const source = `import(${JSON.stringify(import.meta.resolve("tsx/esm/api"))}).then((tsx) => { tsx.register(); return import(${JSON.stringify(moduleUrl.href)}); })`;
  return new Worker(source, { ...options, eval: true });
}
