// The tokenizer's worker thread (Tokenizer.encodeAsync): reads the model directory's tokenizer once,
// then answers { id, text, addBos } with { id, ids } or { id, error }, one text at a time.
import { parentPort, workerData } from "node:worker_threads";
import { Tokenizer } from "./tokenizer.ts";

const tokenizer = await Tokenizer.load((workerData as { dir: string }).dir);
parentPort!.on("message", (m: { id: number; text: string; addBos: boolean }) => {
  try {
    if (!tokenizer) throw new Error("the model directory has no tokenizer.json");
    parentPort!.postMessage({ id: m.id, ids: tokenizer.encode(m.text, { addBos: m.addBos }) });
  } catch (e) {
    parentPort!.postMessage({ id: m.id, error: (e as Error).message });
  }
});
