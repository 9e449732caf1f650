// Reads one adapter directory on a worker thread, so that parsing and converting its tensors never
// holds up the main thread's decode loop. Replies with the LoadedAdapter or the error's message.
import { parentPort, workerData } from "node:worker_threads";
import type { Adapter, BaseModel } from "../compiler/model.ts";
import { loadAdapter } from "./adapter.ts";

const { dir, name, base, spec } = workerData as { dir: string; name: string; base: BaseModel; spec: Adapter | undefined };
try {
  parentPort!.postMessage({ adapter: loadAdapter(dir, { name, base, ...(spec ? { spec } : {}) }) });
} catch (e) {
  parentPort!.postMessage({ error: (e as Error).message });
}
