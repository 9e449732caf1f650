// Streaming text's CPU cost per token along a long output: the server's TextStream (incremental
// detokenizer + stop strings) over 2000 tokens of mixed ASCII and multi-byte text, in blocks of 250
// tokens, against the old way (decode the whole output again at every token).
//   node --import tsx bench/detokenize.ts [--tokens N]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { writeRandomCheckpoint } from "../examples/random-checkpoint.ts";
import { TextStream } from "../runtime/serving/http/text-stream.ts";
import { Tokenizer } from "../runtime/text/tokenizer.ts";

const { values } = parseArgs({ options: { tokens: { type: "string", default: "2000" } } });
const total = Number(values.tokens);
const BLOCK = 250;
const root = mkdtempSync(join(tmpdir(), "milora-bench-detok-"));
const dir = join(root, "model");
writeRandomCheckpoint(dir, { hiddenSize: 64, layers: 1, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 512, maxPositions: 256, seed: 1, tokenizer: true });
const tokenizer = (await Tokenizer.load(dir))!;
const unit = "cafe ☕ the model reads 日本語 text, line by line. ";
let ids: number[] = [];
while (ids.length < total) ids = tokenizer.encode(unit.repeat(Math.ceil((2 * total) / unit.length)), { addBos: false });
ids = ids.slice(0, total);
const decode = (x: readonly number[]) => tokenizer.decode(x);

function perBlock(push: (id: number) => void): number[] {
  const out: number[] = [];
  for (let at = 0; at < total; at += BLOCK) {
    const before = process.cpuUsage();
    for (let i = at; i < Math.min(total, at + BLOCK); i++) push(ids[i]!);
    const used = process.cpuUsage(before);
    out.push((used.user + used.system) / Math.min(BLOCK, total - at));
  }
  return out;
}

// Each way streams the whole output REPEATS times (the first warms the JIT); per block, the median.
const REPEATS = 11;
const median = (xs: number[]) => [...xs].sort((p, q) => p - q)[Math.floor(xs.length / 2)]!;
function medianBlocks(run: () => number[]): number[] {
  const runs = Array.from({ length: REPEATS }, run).slice(1);
  return runs[0]!.map((_, b) => median(runs.map((r) => r[b]!)));
}
const now = medianBlocks(() => {
  const stream = new TextStream(decode, ["</answer>", "\n\nUser:"]);
  return perBlock((id) => stream.push(id));
});
const old = medianBlocks(() => {
  const seen: number[] = [];
  let shown = "";
  return perBlock((id) => {
    seen.push(id);
    const text = decode(seen);
    shown = text.slice(shown.length) && text;
  });
});
console.log(`${total} tokens, median CPU microseconds per token by block of ${BLOCK} (tokens ${BLOCK} apart):`);
console.log(`block          ${now.map((_, i) => String((i + 1) * BLOCK).padStart(6)).join("")}`);
console.log(`TextStream     ${now.map((x) => x.toFixed(1).padStart(6)).join("")}   last/first ${(now.at(-1)! / now[0]!).toFixed(2)}`);
console.log(`full re-decode ${old.map((x) => x.toFixed(1).padStart(6)).join("")}   last/first ${(old.at(-1)! / old[0]!).toFixed(2)}`);
tokenizer.close();
rmSync(root, { recursive: true, force: true });
