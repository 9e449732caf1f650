// Reads one adapter directory on a worker thread, so that parsing and converting its tensors never
// holds up the main thread's decode loop (and a read that runs away can be terminated). Checks the
// files first (adapter-guard.ts: inside `root` when given, and no message quoting their bytes), then
// replies with the LoadedAdapter or the error's message.
import { parentPort, workerData } from "node:worker_threads";
import type { Adapter, BaseModel } from "../../compiler/model.ts";
import { loadAdapter } from "../formats/adapter.ts";
import { checkAdapterFiles } from "../formats/adapter-guard.ts";

const { dir, name, base, spec, root } = workerData as { dir: string; name: string; base: BaseModel; spec: Adapter | undefined; root: string | undefined };
try {
  checkAdapterFiles(dir, root);
  parentPort!.postMessage({ adapter: loadAdapter(dir, { name, base, ...(spec ? { spec } : {}) }) });
} catch (e) {
  parentPort!.postMessage({ error: (e as Error).message });
}
