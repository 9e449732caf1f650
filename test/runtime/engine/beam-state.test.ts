// The beam search's bookkeeping (runtime/beam-search.ts BeamState) against the float64 literal reading
// of Hugging Face's beam search (test/reference/beam.ts) on synthetic models: the next-token
// distribution is a seeded function of the whole token list, so every option can be swept in
// milliseconds without a device. Same hypotheses in the same order, same scores to 1e-12.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { mulberry32 } from "../../../examples/random-checkpoint.ts";
import { BeamState, checkBeamOptions } from "../../../runtime/engine/beam-search.ts";
import type { BeamSearchOptions } from "../../../runtime/engine/requests.ts";
import { SequenceError } from "../../../runtime/engine/sequence.ts";
import { logSoftmax, referenceBeamSearch } from "../../reference/beam.ts";

/** Log-probabilities of the token after `tokens`: seeded by a hash of the tokens, `peaked` sharpens them. */
function syntheticModel(vocab: number, seed: number, peaked: number) {
  return (tokens: readonly number[]) => {
    let h = seed >>> 0;
    for (const t of tokens) h = Math.imul(h ^ (t + 0x9e3779b9), 0x85ebca6b) >>> 0;
    const random = mulberry32(h);
    return logSoftmax(Float64Array.from({ length: vocab }, () => (random() * 2 - 1) * peaked));
  };
}

/** BeamState driven by the same model: each beam's row is its top perBeam tokens, ties to the lower id. */
function runState(model: (t: readonly number[]) => Float64Array, prompt: readonly number[], options: BeamSearchOptions, stop: number[], maxNew: number) {
  const state = new BeamState({ beam: options, stop, maxNew });
  while (!state.done) {
    const rows = state.beams.map((b) => {
      const lp = model([...prompt, ...b.tokens]);
      const order = Array.from(lp, (_, i) => i).sort((x, y) => lp[y]! - lp[x]! || x - y).slice(0, state.perBeam);
      return { tokens: order, logprobs: order.map((i) => lp[i]!) };
    });
    state.step(rows);
  }
  return state.results();
}

test("same hypotheses and scores as the reference over beams, length penalties, early stopping, EOS sets and lengths", () => {
  const random = mulberry32(3);
  const penalties = [1, 0, 2, -0.5, 0.6];
  const stoppings = [false, true, "never"] as const;
  let cases = 0;
  let stoppedByEos = 0;
  for (let i = 0; i < 300; i++) {
    const vocab = 8 + Math.floor(random() * 12);
    const beams = 1 + Math.floor(random() * 4);
    const eosCount = Math.floor(random() * 3);
    const eos = Array.from({ length: eosCount }, (_, j) => (j * 5 + 1) % vocab);
    const lengthPenalty = penalties[i % penalties.length]!;
    const earlyStopping = stoppings[Math.floor(i / penalties.length) % stoppings.length]!;
    const numReturnSequences = 1 + Math.floor(random() * beams);
    const maxNew = 1 + Math.floor(random() * 7);
    const model = syntheticModel(vocab, i, 1 + random() * 4);
    const prompt = [2, 4, 6].slice(0, 1 + (i % 3));
    const got = runState(model, prompt, { beams, lengthPenalty, earlyStopping, numReturnSequences }, eos, maxNew);
    const want = referenceBeamSearch(model, prompt, { numBeams: beams, maxNewTokens: maxNew, eos, lengthPenalty, earlyStopping, numReturnSequences });
    const label = `case ${i}: vocab ${vocab} beams ${beams} eos [${eos}] lp ${lengthPenalty} early ${earlyStopping} n ${numReturnSequences} max ${maxNew}`;
    assert.equal(got.map((h) => h.tokens), want.map((h) => h.tokens), label);
    got.forEach((h, j) => assert.ok(Math.abs(h.score - want[j]!.score) < 1e-12, `${label}: score ${h.score} vs ${want[j]!.score}`));
    stoppedByEos += got.filter((h) => h.finish === "stop").length;
    cases++;
  }
  assert.is(cases, 300);
  assert.ok(stoppedByEos > 50, `only ${stoppedByEos} hypotheses ended with an EOS: the sweep does not exercise EOS handling`);
});

test("an EOS candidate ranked at or past the beam width is ignored; a finished hypothesis keeps its EOS", () => {
  // Two beams; step 1: token 0 (EOS) ranks third of four and is skipped, tokens 1 and 2 continue.
  const state = new BeamState({ beam: { beams: 2, numReturnSequences: 2 }, stop: [0], maxNew: 3 });
  assert.is(state.perBeam, 4);
  const next = state.step([{ tokens: [1, 2, 0, 3], logprobs: [-0.1, -0.5, -2, -3] }]);
  assert.equal(next.map((c) => c.token), [1, 2]);
  // Step 2: EOS after beam 0 ranks first (-0.15) and finishes [1, 0] with score -0.15 / 2; EOS after
  // beam 1 ranks third (-0.8) and is skipped; [2, 3] (-0.7) and [1, 3] (-1.1) continue.
  const second = state.step([
    { tokens: [0, 3, 4, 5], logprobs: [-0.05, -1, -1.5, -4] },
    { tokens: [3, 0, 4, 5], logprobs: [-0.2, -0.3, -3, -4] },
  ]);
  assert.equal(second.map((c) => [c.parent, c.token]), [[1, 3], [0, 3]]);
  assert.not.ok(state.done);
  // Step 3 reaches maxNew: [2, 3, 0] finishes (-0.9 / 3), then the open beams join, [2, 3, 4] displacing it.
  state.step([
    { tokens: [4, 0, 5, 6], logprobs: [-0.1, -0.2, -3, -4] },
    { tokens: [4, 0, 5, 6], logprobs: [-0.1, -0.2, -3, -4] },
  ]);
  assert.ok(state.done);
  const [best, runnerUp] = state.results();
  assert.equal(best!.tokens, [1, 0]);
  assert.is(best!.finish, "stop");
  assert.ok(Math.abs(best!.score - -0.15 / 2) < 1e-15);
  assert.equal(runnerUp!.tokens, [2, 3, 4]);
  assert.is(runnerUp!.finish, "length");
  assert.ok(Math.abs(runnerUp!.score - -0.8 / 3) < 1e-15);
});

test("options: defaults as Hugging Face's, and client mistakes are SequenceErrors", () => {
  assert.equal(checkBeamOptions({ beams: 3 }), { beams: 3, lengthPenalty: 1, earlyStopping: false, numReturnSequences: 1 });
  for (const bad of [{ beams: 0 }, { beams: 2.5 }, { beams: 3, numReturnSequences: 4 }, { beams: 2, lengthPenalty: NaN }, { beams: 2, earlyStopping: "sometimes" as never }]) {
    assert.throws(() => checkBeamOptions(bad), (e: unknown) => e instanceof SequenceError, JSON.stringify(bad));
  }
});

test.run();
