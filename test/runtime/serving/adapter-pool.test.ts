// Resident adapters under a bound: least recently used idle ones evicted, adapters in use never, a
// request waiting when every resident adapter is busy; the default reader on a worker thread.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { randomCheckpointBase } from "../../../examples/random-checkpoint.ts";
import { writeRandomPeftAdapter } from "../../../examples/random-adapter.ts";
import { AdapterPool, AdapterReadTimeoutError, UnknownAdapterError, workerReader, type AdapterReader } from "../../../runtime/serving/adapter-pool.ts";
import type { LoadedAdapter } from "../../../runtime/formats/adapter.ts";
import { CheckpointError } from "../../../runtime/formats/safetensors.ts";

const base = randomCheckpointBase({ hiddenSize: 32, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 64, vocabSize: 64, seed: 1 });
const root = mkdtempSync(join(tmpdir(), "milora-pool-"));
test.after(() => rmSync(root, { recursive: true, force: true }));

function pool(maxResident: number) {
  const events: string[] = [];
  const read: AdapterReader = async (_dir, name) => ({ name }) as LoadedAdapter;
  const p = new AdapterPool({ base, maxResident, read, host: { add: (a) => void events.push(`+${a.name}`), remove: (n) => void events.push(`-${n}`) } });
  return { p, events };
}

test("the least recently used idle adapter makes way; one in use is never evicted", async () => {
  const { p, events } = pool(2);
  for (const n of ["a", "b"]) await p.register(n, root);
  await p.acquire("a"); // a in use
  await p.register("c", root); // evicts b, the idle one
  assert.equal(p.residentNames(), ["a", "c"]);
  p.release("a");
  await p.acquire("c");
  p.release("c");
  await p.acquire("b"); // a is now the least recently used
  assert.equal(events, ["+a", "+b", "-b", "+c", "-a", "+b"]);
  assert.equal(p.stats(), { registered: 3, resident: 2, loads: 4, evictions: 2 });
});

test("with every resident adapter in use, a request waits for one to be let go", async () => {
  const { p } = pool(1);
  await p.register("a", root);
  await p.register("b", root);
  await p.acquire("b");
  let loaded = false;
  const waiting = p.acquire("a").then(() => (loaded = true));
  await new Promise((r) => setTimeout(r, 10));
  assert.is(loaded, false);
  p.release("b");
  await waiting;
  assert.equal(p.residentNames(), ["a"]);
});

test("unregistering: unknown names refused, one in use leaves when its last user does", async () => {
  const { p, events } = pool(2);
  await p.register("a", root);
  await p.acquire("a");
  p.unregister("a");
  assert.is(p.has("a"), false);
  assert.equal(p.residentNames(), ["a"]);
  p.release("a");
  assert.equal(p.residentNames(), []);
  assert.equal(events, ["+a", "-a"]);
  assert.throws(() => p.unregister("a"), (e: unknown) => e instanceof UnknownAdapterError);
});

test("the default reader loads a PEFT adapter on a worker thread, and reports a bad one", async () => {
  const dir = join(root, "peft");
  const written = writeRandomPeftAdapter(dir, { base, modules: ["q_proj"], rank: 2, alpha: 4, seed: 3, name: "peft" });
  const got: LoadedAdapter[] = [];
  const p = new AdapterPool({ base, maxResident: 1, host: { add: (a) => void got.push(a), remove: () => {} } });
  await p.register("peft", dir);
  assert.equal(got[0]!.lora.get("0.q_proj")!.a, written.lora.get("0.q_proj")!.a);
  const failed = await p.register("broken", root).then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.instance(failed, CheckpointError);
  assert.is(p.has("broken"), false);
});

test("a name is free as soon as it is unregistered: a new instance takes it while the old one drains", async () => {
  const { p, events } = pool(3);
  await p.register("a", root);
  await p.acquire(p.keyOf("a")!); // a request holds the first instance
  p.unregister("a");
  await p.register("a", root);
  const second = p.keyOf("a")!;
  assert.is.not(second, "a");
  assert.equal(p.names(), ["a"]);
  assert.equal(p.residentNames(), ["a", second]);
  p.release("a"); // the old request ends: the old instance leaves, the new one stays
  assert.equal(p.residentNames(), [second]);
  assert.equal(events, ["+a", `+${second}`, "-a"]);
  await p.acquire(second);
  p.release(second);
  const gone = await p.acquire("a").then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.instance(gone, UnknownAdapterError, "the drained instance's key is gone");
});

const spinModule = new URL("./http/spin-worker.ts", import.meta.url);

test("the worker reader stops a read that runs past its bound, naming the adapter", async () => {
  const read = workerReader({ timeoutMs: 300, module: spinModule });
  const p = new AdapterPool({ base, maxResident: 1, read, host: { add: () => {}, remove: () => {} } });
  const started = Date.now();
  const failed = await p.register("slow", root).then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.instance(failed, AdapterReadTimeoutError);
  assert.match((failed as Error).message, "adapter slow");
  assert.ok(Date.now() - started < 5000);
  assert.is(p.has("slow"), false);
});

test("closing the pool stops a read in progress at once, so shutdown never waits on it", async () => {
  const read = workerReader({ timeoutMs: 600_000, module: spinModule });
  const p = new AdapterPool({ base, maxResident: 1, read, host: { add: () => {}, remove: () => {} } });
  const registering = p.register("stuck", root).then(
    () => undefined,
    (e: unknown) => e,
  );
  await new Promise((r) => setTimeout(r, 200));
  const started = Date.now();
  p.close();
  assert.instance(await registering, CheckpointError);
  assert.ok(Date.now() - started < 2000);
});

test.run();
