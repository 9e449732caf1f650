// `milora doctor`: which adapter milora gets, with what limits, and whether milora's kernels produce
// the right numbers on it (bin/commands/self-test.ts).
import pc from "picocolors";
import { acquireDevice, adapterSummary, NoAdapterError, type GpuContext } from "../../runtime/gpu/device.ts";
import { ERROR_KINDS } from "../../runtime/errors.ts";
import { runSelfTest } from "./self-test.ts";

export async function doctorCommand(opts: { backend?: string; json?: boolean }): Promise<number> {
  let ctx: GpuContext;
  try {
    ctx = await acquireDevice({ backend: opts.backend });
  } catch (err) {
    // --json answers in JSON even without a device; otherwise bin/cli.ts prints the error.
    if (!(err instanceof NoAdapterError && opts.json)) throw err;
    console.log(JSON.stringify({ ok: false, error: err.message }, null, 2));
    return ERROR_KINDS.device.exit;
  }
  try {
    const test = await runSelfTest(ctx);
    const r = ctx.report;
    if (opts.json) {
      console.log(JSON.stringify({ ok: test.ok, adapter: r, selfTest: test }, null, 2));
    } else {
      console.log(`adapter       ${adapterSummary(r)}`);
      console.log(`vendor        ${r.vendor || "-"}  architecture ${r.architecture || "-"}`);
      console.log(`backend       ${r.backend}   feature level ${r.featureLevel}`);
      console.log(`features      ${r.features.join(" ") || "-"}`);
      console.log("limits");
      for (const [name, value] of Object.entries(r.limits)) console.log(`  ${name.padEnd(36)} ${value.toLocaleString("en-US")}`);
      console.log(`self-test     ${test.ok ? pc.green("ok") : pc.red("FAILED")} (${test.ms.toFixed(0)} ms)`);
      for (const c of test.checks) console.log(`  ${c.kernel.padEnd(12)} ${c.ok ? pc.green("ok") : pc.red("FAILED")}  ${c.detail}`);
    }
    return test.ok ? 0 : ERROR_KINDS.device.exit;
  } finally {
    ctx.destroy();
  }
}
