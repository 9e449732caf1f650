// The step planner without a GPU: batches of sequences (named by strings) against hand-written steps.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { planSteps, type PlanSequence } from "../../../runtime/engine/step-planner.ts";

const BASE = 0xffffffff; // NO_ADAPTER, the base alone

function seq(name: string, tokens: number[], cached: number, extra: Partial<PlanSequence<string>> = {}): PlanSequence<string> {
  return { seq: name, slot: name.charCodeAt(0) - 97, tenantSlot: BASE, tokens, cached, logits: "none", ...extra };
}

test("prefill chunks and decode tokens share one step; each finishing sequence samples from its last row", () => {
  const steps = planSteps([seq("a", [11, 12, 13], 0), seq("b", [21, 22, 23, 24, 25, 26], 5, { tenantSlot: 1 }), seq("c", [31, 32], 1)], 8);
  assert.equal(steps, [
    {
      rows: [
        { seq: "a", slot: 0, token: 11, position: 0, tenantSlot: BASE },
        { seq: "a", slot: 0, token: 12, position: 1, tenantSlot: BASE },
        { seq: "a", slot: 0, token: 13, position: 2, tenantSlot: BASE },
        { seq: "b", slot: 1, token: 26, position: 5, tenantSlot: 1 },
        { seq: "c", slot: 2, token: 32, position: 1, tenantSlot: BASE },
      ],
      outRows: [2, 3, 4],
      routes: [],
      finishing: new Map([
        ["a", 0],
        ["b", 1],
        ["c", 2],
      ]),
    },
  ]);
});

test("a row budget splits a prompt: the first chunk samples nothing, the next sequence waits for room", () => {
  const steps = planSteps([seq("a", [1, 2, 3, 4, 5], 0), seq("b", [7, 8], 1)], 4);
  assert.equal(steps, [
    {
      rows: [1, 2, 3, 4].map((token, position) => ({ seq: "a", slot: 0, token, position, tenantSlot: BASE })),
      outRows: [],
      routes: [],
      finishing: new Map(),
    },
    {
      rows: [
        { seq: "a", slot: 0, token: 5, position: 4, tenantSlot: BASE },
        { seq: "b", slot: 1, token: 8, position: 1, tenantSlot: BASE },
      ],
      outRows: [0, 1],
      routes: [],
      finishing: new Map([
        ["a", 0],
        ["b", 1],
      ]),
    },
  ]);
});

test("a prompt-routed prompt runs in one step with one route over all its rows; it waits for a step with room", () => {
  const steps = planSteps([seq("b", [9, 8], 1), seq("a", [1, 2, 3], 0, { tenantSlot: 2, routes: "prompt" })], 3);
  assert.equal(steps, [
    {
      rows: [{ seq: "b", slot: 1, token: 8, position: 1, tenantSlot: BASE }],
      outRows: [0],
      routes: [],
      finishing: new Map([["b", 0]]),
    },
    {
      rows: [1, 2, 3].map((token, position) => ({ seq: "a", slot: 0, token, position, tenantSlot: 2 })),
      outRows: [2],
      routes: [{ seq: "a", first: 0, count: 3, perRow: false }],
      finishing: new Map([["a", 0]]),
    },
  ]);
});

test("a prompt-routed prompt longer than a step gets a step of its own, run layer by layer over chunks; the rest is packed after it", () => {
  const steps = planSteps([seq("b", [9, 8], 1), seq("a", [1, 2, 3, 4, 5, 6, 7], 0, { tenantSlot: 2, routes: "prompt", logits: "all" }), seq("c", [6], 0)], 3);
  assert.equal(steps, [
    {
      rows: [1, 2, 3, 4, 5, 6, 7].map((token, position) => ({ seq: "a", slot: 0, token, position, tenantSlot: 2 })),
      chunks: [3, 3, 1],
      outRows: [0, 1, 2, 3, 4, 5, 6],
      routes: [{ seq: "a", first: 0, count: 7, perRow: false }],
      finishing: new Map([["a", 6]]),
    },
    {
      rows: [
        { seq: "b", slot: 1, token: 8, position: 1, tenantSlot: BASE },
        { seq: "c", slot: 2, token: 6, position: 0, tenantSlot: BASE },
      ],
      outRows: [0, 1],
      routes: [],
      finishing: new Map([
        ["b", 0],
        ["c", 1],
      ]),
    },
  ]);
  const [last] = planSteps([seq("a", [1, 2, 3, 4], 0, { tenantSlot: 0, routes: "prompt" })], 3);
  assert.equal(last!.chunks, [3, 1]);
  assert.equal(last!.outRows, [3]);
  assert.equal(last!.finishing, new Map([["a", 0]]));
});

test("token routing routes each chunk's rows on their own; known gates ride on every row", () => {
  const gates = Float32Array.of(0.5, 0, 1);
  const steps = planSteps([seq("a", [1, 2, 3], 0, { tenantSlot: 0, routes: "token" }), seq("b", [4, 5], 1, { tenantSlot: 1, gates })], 2);
  assert.equal(steps, [
    {
      rows: [
        { seq: "a", slot: 0, token: 1, position: 0, tenantSlot: 0 },
        { seq: "a", slot: 0, token: 2, position: 1, tenantSlot: 0 },
      ],
      outRows: [],
      routes: [{ seq: "a", first: 0, count: 2, perRow: true }],
      finishing: new Map(),
    },
    {
      rows: [
        { seq: "a", slot: 0, token: 3, position: 2, tenantSlot: 0 },
        { seq: "b", slot: 1, token: 5, position: 1, tenantSlot: 1, gates },
      ],
      outRows: [0, 1],
      routes: [{ seq: "a", first: 0, count: 1, perRow: true }],
      finishing: new Map([
        ["a", 0],
        ["b", 1],
      ]),
    },
  ]);
});

test('logits "all": every row of every chunk is an out row, and the sample comes from the last', () => {
  const steps = planSteps([seq("a", [1, 2, 3, 4, 5], 0, { logits: "all" }), seq("b", [6, 7], 1, { logits: "last" })], 3);
  assert.equal(steps, [
    {
      rows: [1, 2, 3].map((token, position) => ({ seq: "a", slot: 0, token, position, tenantSlot: BASE })),
      outRows: [0, 1, 2],
      routes: [],
      finishing: new Map(),
    },
    {
      rows: [
        { seq: "a", slot: 0, token: 4, position: 3, tenantSlot: BASE },
        { seq: "a", slot: 0, token: 5, position: 4, tenantSlot: BASE },
        { seq: "b", slot: 1, token: 7, position: 1, tenantSlot: BASE },
      ],
      outRows: [0, 1, 2],
      routes: [],
      finishing: new Map([
        ["a", 1],
        ["b", 2],
      ]),
    },
  ]);
});

test.run();
