// `milora doctor`: which adapter milora gets, with what limits, and whether a compute kernel
// actually produces the right numbers on it.
import pc from "picocolors";
import { acquireDevice, adapterSummary, NoAdapterError, type GpuContext } from "../../runtime/device.ts";

const SELF_TEST_SIZE = 4099; // not a multiple of the workgroup size, so bounds checks are exercised

const SELF_TEST_WGSL = /* wgsl */ `
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  let i = id.x;
  if (i < arrayLength(&out)) { out[i] = fma(a[i], b[i], f32(i)); }
}`;

interface SelfTest {
  readonly ok: boolean;
  readonly maxError: number;
  readonly ms: number;
}

async function selfTest({ device }: GpuContext): Promise<SelfTest> {
  const n = SELF_TEST_SIZE;
  const a = new Float32Array(n).map((_, i) => Math.sin(i));
  const b = new Float32Array(n).map((_, i) => Math.cos(i * 0.5));
  const started = performance.now();
  const upload = (data: Float32Array) => {
    const buf = device.createBuffer({ size: data.byteLength, usage: GPUBufferUsage.STORAGE, mappedAtCreation: true });
    new Float32Array(buf.getMappedRange()).set(data);
    buf.unmap();
    return buf;
  };
  const out = device.createBuffer({ size: n * 4, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
  const read = device.createBuffer({ size: n * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const pipeline = device.createComputePipeline({
    layout: "auto",
    compute: { module: device.createShaderModule({ code: SELF_TEST_WGSL }), entryPoint: "main" },
  });
  const bind = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [upload(a), upload(b), out].map((buffer, binding) => ({ binding, resource: { buffer } })),
  });
  const enc = device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(0, bind);
  pass.dispatchWorkgroups(Math.ceil(n / 64));
  pass.end();
  enc.copyBufferToBuffer(out, 0, read, 0, n * 4);
  device.queue.submit([enc.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  const got = new Float32Array(read.getMappedRange().slice(0));
  read.unmap();
  let maxError = 0;
  for (let i = 0; i < n; i++) {
    const want = a[i]! * b[i]! + i;
    maxError = Math.max(maxError, Math.abs(got[i]! - want) / Math.max(1, Math.abs(want)));
  }
  return { ok: maxError < 1e-6, maxError, ms: performance.now() - started };
}

export async function doctorCommand(opts: { backend?: string; json?: boolean }): Promise<number> {
  let ctx: GpuContext;
  try {
    ctx = await acquireDevice({ backend: opts.backend });
  } catch (err) {
    if (!(err instanceof NoAdapterError)) throw err;
    if (opts.json) console.log(JSON.stringify({ ok: false, error: err.message }, null, 2));
    else console.error(`milora doctor: ${err.message}`);
    return 1;
  }
  try {
    const test = await selfTest(ctx);
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
      const verdict = test.ok ? pc.green("ok") : pc.red("FAILED");
      console.log(`self-test     ${verdict}: ${SELF_TEST_SIZE} fused multiply-adds, max relative error ${test.maxError.toExponential(2)}, ${test.ms.toFixed(1)} ms`);
    }
    return test.ok ? 0 : 1;
  } finally {
    ctx.destroy();
  }
}
