// The buffer meter: bytes of the buffers made while it is on, counted until their destroy().
import { test } from "uvu";
import * as assert from "uvu/assert";
import { acquireDevice } from "../../../runtime/gpu/device.ts";
import { createStorage } from "../../../runtime/gpu/kernel-runner.ts";
import { meterBuffers } from "../../../runtime/gpu/memory-meter.ts";

const gpu = await acquireDevice();
test.after(() => gpu.destroy());

test("live and peak bytes follow creation and destruction, a double destroy counts once", () => {
  const before = createStorage(gpu.device, 4096, "made before the meter");
  const meter = meterBuffers(gpu.device);
  assert.is(meter.liveBytes, 0);
  const a = createStorage(gpu.device, 1000, "a"); // rounded up to 1000 (a multiple of 4)
  const b = gpu.device.createBuffer({ size: 256, usage: GPUBufferUsage.UNIFORM });
  assert.is(meter.liveBytes, 1256);
  a.destroy();
  a.destroy();
  assert.is(meter.liveBytes, 256);
  assert.is(meter.peakBytes, 1256);
  before.destroy(); // not counted: it predates the meter
  assert.is(meter.liveBytes, 256);
  meter.resetPeak();
  assert.is(meter.peakBytes, 256);
  const c = createStorage(gpu.device, new Float32Array(16), "c");
  assert.is(meter.peakBytes, 320);
  meter.stop();
  const d = createStorage(gpu.device, 64, "after the meter");
  assert.is(meter.liveBytes, 320);
  for (const buffer of [b, c, d]) buffer.destroy();
  assert.is(meter.liveBytes, 320, "destroys after stop() no longer count");
});

test("a device is metered once at a time; stop() frees it for another meter", () => {
  const meter = meterBuffers(gpu.device);
  assert.throws(() => meterBuffers(gpu.device), /already metered/);
  meter.stop();
  meterBuffers(gpu.device).stop();
});

test.run();
