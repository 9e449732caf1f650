// The calibration file of `milora bench --calibrate`: where it goes, that it reads back as written,
// that a damaged or foreign one is refused naming the file and the field; the crossover drawn from
// timings; the sizes of `--random`.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import {
  CALIBRATION_VERSION,
  calibratedMatvecRows,
  defaultCalibrationFile,
  deviceCalibration,
  readCalibration,
  writeCalibration,
  type Calibration,
} from "../../../bin/measure/calibration.ts";
import { crossoverOf } from "../../../bin/measure/crossover.ts";
import { randomModelOptions } from "../../../bin/measure/random-model.ts";
import { MiloraError } from "../../../runtime/errors.ts";
import type { GpuAdapterReport } from "../../../runtime/gpu/device.ts";

const root = mkdtempSync(join(tmpdir(), "milora-calibration-"));
// uvu imports every suite before running any, so the variable is set per suite, not at import
let savedCache: string | undefined;
test.before(() => {
  savedCache = process.env.XDG_CACHE_HOME;
  process.env.XDG_CACHE_HOME = join(root, "cache");
});
test.after(() => {
  if (savedCache === undefined) delete process.env.XDG_CACHE_HOME;
  else process.env.XDG_CACHE_HOME = savedCache;
  rmSync(root, { recursive: true, force: true });
});

const h200: GpuAdapterReport = { backend: "vulkan", featureLevel: "core", vendor: "nvidia", architecture: "hopper", description: "NVIDIA H200", software: false, features: [], limits: {} };
const llvmpipe: GpuAdapterReport = { ...h200, backend: "opengles", featureLevel: "compatibility", vendor: "mesa", description: "llvmpipe (LLVM 19.1.7, 256 bits)", software: true };

const calibration: Calibration = {
  version: CALIBRATION_VERSION,
  device: "NVIDIA H200 (vulkan, core, hardware)",
  measuredAt: "2025-01-01T00:00:00.000Z",
  model: "hidden 2048, 16 layers",
  formats: [
    { weights: "f32", matvecMaxRows: 28, bounded: true, timings: [{ rows: 1, matvecUs: 10, matmulUs: 90 }, { rows: 32, matvecUs: 95, matmulUs: 90 }] },
    { weights: "q8", matvecMaxRows: 64, bounded: false, timings: [{ rows: 64, matvecUs: 50, matmulUs: 60 }] },
  ],
};

/** The error `f` throws, which must be a user error of kind `file`. */
function fileError(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof MiloraError, String(e));
    assert.is(e.kind, "file");
    return e.message;
  }
  throw new Error("expected an error");
}

test("the default file is under $XDG_CACHE_HOME/milora/calibration, named by the device's description", () => {
  const file = defaultCalibrationFile(h200);
  assert.match(file, new RegExp(`^${join(root, "cache", "milora", "calibration")}/nvidia-h200-vulkan-core-hardware-[0-9a-f]{8}\\.json$`));
  assert.is.not(defaultCalibrationFile(llvmpipe), file);
  assert.is(defaultCalibrationFile({ ...h200 }), file, "the same device, the same file");
});

test("a calibration reads back as it was written, and gives each measured format's row limit", () => {
  const file = join(root, "round-trip", "c.json");
  writeCalibration(file, calibration);
  const back = readCalibration(file);
  assert.equal(back, calibration);
  assert.is(calibratedMatvecRows(back, "f32"), 28);
  assert.is(calibratedMatvecRows(back, "q8"), 64);
  assert.is(calibratedMatvecRows(back, "f16"), undefined);
  assert.is(calibratedMatvecRows(undefined, "f32"), undefined);
});

test("a run finds its device's default file, none when there is none, and refuses another device's", () => {
  assert.is(deviceCalibration(h200), undefined);
  writeCalibration(defaultCalibrationFile(h200), calibration);
  assert.equal(deviceCalibration(h200), calibration);
  const foreign = join(root, "foreign.json");
  writeCalibration(foreign, calibration);
  const message = fileError(() => deviceCalibration(llvmpipe, foreign));
  assert.ok(message.includes(`${foreign} was measured on NVIDIA H200 (vulkan, core, hardware), not on this device (llvmpipe (LLVM 19.1.7, 256 bits) (opengles, compatibility, software))`), message);
  assert.ok(fileError(() => deviceCalibration(h200, join(root, "missing.json"))).startsWith(`cannot read the calibration ${join(root, "missing.json")}`));
});

test("a damaged file is an error naming the file and what is wrong", () => {
  const f = calibration.formats[0]!;
  const cases: [string, string][] = [
    ["{ not json", "not JSON"],
    ["[]", "not a JSON object"],
    [JSON.stringify({ ...calibration, version: 2 }), "version 2, this milora reads version 1"],
    [JSON.stringify({ ...calibration, device: 7 }), `"device" must be a string`],
    [JSON.stringify({ ...calibration, formats: [] }), `"formats" must be a non-empty array`],
    [JSON.stringify({ ...calibration, formats: [{ ...f, weights: "q2" }] }), `formats[0].weights must be one of f32, f16, q8, q4, got "q2"`],
    [JSON.stringify({ ...calibration, formats: [f, f] }), "formats[1].weights f32 appears twice"],
    [JSON.stringify({ ...calibration, formats: [{ ...f, matvecMaxRows: 0 }] }), "formats[0].matvecMaxRows must be a whole number of rows, at least 1, got 0"],
    [JSON.stringify({ ...calibration, formats: [{ ...f, matvecMaxRows: "28" }] }), `formats[0].matvecMaxRows must be a whole number of rows, at least 1, got "28"`],
    [JSON.stringify({ ...calibration, formats: [{ ...f, bounded: "yes" }] }), "formats[0].bounded must be true or false"],
    [JSON.stringify({ ...calibration, formats: [{ ...f, timings: [{ rows: 1, matvecUs: -1, matmulUs: 2 }] }] }), "formats[0].timings[0] must be { rows, matvecUs, matmulUs }"],
  ];
  cases.forEach(([text, what], i) => {
    const file = join(root, `bad-${i}.json`);
    writeFileSync(file, text);
    const message = fileError(() => readCalibration(file));
    assert.ok(message.startsWith(`${file} is not a milora calibration: `), message);
    assert.ok(message.includes(what), `${message}\n  should say: ${what}`);
    assert.ok(message.endsWith("(run `milora bench --calibrate` again, or delete it)"), message);
  });
});

const timings = (matvec: number[], matmul: number[], rows = [1, 8, 16, 24, 32, 40]) => rows.map((r, i) => ({ rows: r, matvecUs: matvec[i]!, matmulUs: matmul[i]! }));

test("the crossover lies where matvec minus matmul, linear between the last win and the next count, is zero", () => {
  // wins up to 24 rows (40 <= 45), loses at 32 (50): -5 and +5 meet half way, at 28
  assert.equal(crossoverOf(timings([10, 20, 30, 40, 50, 60], [45, 45, 45, 45, 45, 45])), { matvecMaxRows: 28, bounded: true });
  // -9 at 16, +1 at 24: 16 + 8 * 9/10 = 23.2, whole rows down
  assert.equal(crossoverOf(timings([10, 20, 36, 46, 50, 60], [45, 45, 45, 45, 45, 45])), { matvecMaxRows: 23, bounded: true });
  // a tie counts as a win
  assert.equal(crossoverOf(timings([10, 20, 30, 45, 50, 60], [45, 45, 45, 45, 45, 45])), { matvecMaxRows: 24, bounded: true });
});

test("a loss before the last win is noise; never losing is unbounded; never winning keeps one row", () => {
  assert.equal(crossoverOf(timings([10, 99, 30, 40, 50, 60], [45, 45, 45, 45, 45, 45])), { matvecMaxRows: 28, bounded: true });
  assert.equal(crossoverOf(timings([1, 2, 3, 4, 5, 6], [45, 45, 45, 45, 45, 45])), { matvecMaxRows: 40, bounded: false });
  assert.equal(crossoverOf(timings([50, 60, 70, 80, 90, 99], [45, 45, 45, 45, 45, 45])), { matvecMaxRows: 1, bounded: true });
});

test("--random takes a named size and KEY=N changes, and refuses anything else by name", () => {
  assert.equal(randomModelOptions("tiny"), { hiddenSize: 64, layers: 2, heads: 4, kvHeads: 2, intermediateSize: 176, vocabSize: 512, maxPositions: 256, seed: 1 });
  assert.equal(randomModelOptions("small, hidden=2048,layers=16,heads=16,kv-heads=8,intermediate=5632,vocab=32000"), {
    hiddenSize: 2048,
    layers: 16,
    heads: 16,
    kvHeads: 8,
    intermediateSize: 5632,
    vocabSize: 32000,
    maxPositions: 256,
    seed: 3,
  });
  const usage = (text: string) => {
    try {
      randomModelOptions(text);
    } catch (e) {
      assert.ok(e instanceof MiloraError && e.kind === "usage", String(e));
      return e.message;
    }
    throw new Error(`${text} was taken`);
  };
  assert.match(usage("medium"), /--random medium: the size must start with one of tiny, small/);
  assert.match(usage("tiny,width=3"), /"width=3" must be KEY=N .* KEY one of hidden, layers/);
  assert.match(usage("tiny,layers=0"), /"layers=0" must be KEY=N with a positive whole N/);
  assert.match(usage("tiny,heads=3"), /hidden 64 must split into 3 heads/);
});

test.run();
