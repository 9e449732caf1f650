// The device self-test runs milora's real kernels against float64 references; run and serve refuse a
// device that fails it.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { DeviceSelfTestError, judgeSelfTest, runSelfTest, type SelfTestReport } from "../../../bin/commands/self-test.ts";
import { acquireDevice } from "../../../runtime/gpu/device.ts";

test("this device passes every kernel check: matvec, rmsnorm, attention, sampling with top-k and top-p, the router", async () => {
  const ctx = await acquireDevice();
  try {
    const report = await runSelfTest(ctx);
    assert.equal(report.checks.map((c) => c.kernel), ["matvec", "rmsnorm", "attention", "sampling", "router"]);
    for (const c of report.checks) assert.ok(c.ok, `${c.kernel}: ${c.detail}`);
    assert.ok(report.ok);
  } finally {
    ctx.destroy();
  }
});

const failed: SelfTestReport = {
  ok: false,
  ms: 1,
  checks: [
    { kernel: "matvec", ok: true, detail: "relative error 1e-8" },
    { kernel: "sampling", ok: false, detail: "rows 2: got 14, want 220" },
  ],
};

test("a failed kernel check refuses the device, naming the kernel and milora doctor", () => {
  try {
    judgeSelfTest(failed, "llvmpipe", {});
    assert.unreachable("a failed self-test must refuse the device");
  } catch (e) {
    assert.instance(e, DeviceSelfTestError);
    const message = (e as Error).message;
    assert.match(message, "sampling: rows 2: got 14, want 220");
    assert.not.match(message, "matvec");
    assert.match(message, "milora doctor");
    assert.match(message, "MILORA_IGNORE_SELF_TEST=1");
  }
});

test("MILORA_IGNORE_SELF_TEST=1 turns the refusal into a warning; a passing report says nothing", () => {
  judgeSelfTest(failed, "llvmpipe", { MILORA_IGNORE_SELF_TEST: "1" });
  judgeSelfTest({ ok: true, ms: 1, checks: [] }, "llvmpipe", {});
});

test.run();
