// Acquiring a WebGPU device through Dawn's Node binding.
// Preference: a hardware adapter on the platform's native backend (feature level core), then Mesa's
// llvmpipe through Dawn's OpenGL ES backend (feature level compatibility). CPU Vulkan drivers
// (lavapipe, SwiftShader) rank below GL ES: Debian 12's lavapipe is rejected by Dawn and newer
// ones have crashed under load.
import { existsSync, readdirSync } from "node:fs";
import { create, globals } from "webgpu";
import { MiloraError, userError } from "../errors.ts";

export type BackendName = "vulkan" | "metal" | "d3d12" | "opengles";
export type BackendChoice = BackendName | "auto";

/** What the runtime got, as `milora doctor` and `milora run` report it. */
export interface GpuAdapterReport {
  readonly backend: BackendName;
  readonly featureLevel: "core" | "compatibility";
  readonly vendor: string;
  readonly architecture: string;
  readonly description: string;
  /** True for a CPU implementation (llvmpipe, lavapipe, SwiftShader). */
  readonly software: boolean;
  readonly features: readonly string[];
  readonly limits: Readonly<Record<string, number>>;
}

export interface GpuContext {
  readonly device: GPUDevice;
  readonly report: GpuAdapterReport;
  /** Whether WGSL `f16` may be used (shader-f16 feature granted). */
  readonly hasF16: boolean;
  destroy(): void;
}

/** No WebGPU adapter (a GPU, or Mesa's llvmpipe) could be had on the backend asked for. */
export class NoAdapterError extends MiloraError {
  override name = "NoAdapterError";
  readonly kind = "device";
}

// Limits the kernels depend on; we ask for the adapter's maxima because the defaults are lower
// (e.g. 128 MiB storage bindings on llvmpipe versus a 128 MiB default, 256 invocations by default).
const WANTED_LIMITS = [
  "maxStorageBufferBindingSize",
  "maxBufferSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupSizeY",
  "maxComputeWorkgroupSizeZ",
  "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage",
  "maxUniformBufferBindingSize",
] as const;

const WANTED_FEATURES = ["shader-f16", "timestamp-query", "subgroups"] as const;

let globalsInstalled = false;
function installGlobals(): void {
  if (globalsInstalled) return;
  // Dawn's objects check `instanceof` against these (GPUBufferUsage etc. are needed by callers too).
  Object.assign(globalThis, globals);
  globalsInstalled = true;
}

function nativeBackend(): BackendName {
  if (process.platform === "darwin") return "metal";
  if (process.platform === "win32") return "d3d12";
  return "vulkan";
}

/** A Vulkan loader and at least one driver manifest; skipping Vulkan otherwise avoids Dawn's warnings. */
function vulkanAvailable(): boolean {
  const libDirs = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"];
  const extra = (process.env.LD_LIBRARY_PATH ?? "").split(":").filter(Boolean);
  const loader = [...extra, ...libDirs].some((d) => existsSync(`${d}/libvulkan.so.1`));
  if (!loader) return false;
  if (process.env.VK_ICD_FILENAMES || process.env.VK_DRIVER_FILES) return true;
  const icdDirs = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"];
  return icdDirs.some((d) => existsSync(d) && readdirSync(d).some((f) => f.endsWith(".json")));
}

const SOFTWARE_NAMES = /llvmpipe|lavapipe|softpipe|swiftshader|software/i;

// Dawn instances must outlive every adapter and device made from them: a collected instance takes
// the process down from a native thread. One per backend, kept for the life of the process.
const instances = new Map<BackendName, GPU>();

async function tryBackend(backend: BackendName, featureLevel: "core" | "compatibility") {
  if (backend === "vulkan" && !vulkanAvailable()) return undefined;
  if (backend === "opengles") process.env.EGL_PLATFORM ??= "surfaceless";
  let gpu = instances.get(backend);
  if (!gpu) {
    gpu = create([`backend=${backend}`]);
    instances.set(backend, gpu);
  }
  const adapter = await gpu.requestAdapter({ featureLevel, powerPreference: "high-performance" });
  return adapter ? { adapter, backend, featureLevel } : undefined;
}

function describe(adapter: GPUAdapter, backend: BackendName, featureLevel: "core" | "compatibility"): GpuAdapterReport {
  const info = adapter.info;
  const limits: Record<string, number> = {};
  for (const name of WANTED_LIMITS) limits[name] = adapter.limits[name];
  const text = `${info.vendor} ${info.architecture} ${info.description} ${info.device}`;
  return {
    backend,
    featureLevel,
    vendor: info.vendor,
    architecture: info.architecture,
    description: info.description || info.device || "(unnamed adapter)",
    software: SOFTWARE_NAMES.test(text) || backend === "opengles",
    features: [...adapter.features].map(String).sort(),
    limits,
  };
}

/** The backend requested through `MILORA_BACKEND` or an option, validated. */
export function requestedBackend(option?: string): BackendChoice {
  const value = (option ?? process.env.MILORA_BACKEND ?? "auto").toLowerCase();
  if (value === "auto" || value === "vulkan" || value === "metal" || value === "d3d12" || value === "opengles") return value;
  throw userError("usage", `unknown backend "${value}" (MILORA_BACKEND or --backend): use auto, vulkan, metal, d3d12 or opengles`);
}

/**
 * Finds the best adapter and opens a device with the limits the kernels need.
 * Throws NoAdapterError with the setup command to run when no adapter is found.
 */
export async function acquireDevice(options: { backend?: string } = {}): Promise<GpuContext> {
  installGlobals();
  const choice = requestedBackend(options.backend);
  const candidates: [BackendName, "core" | "compatibility"][] =
    choice === "auto"
      ? [
          [nativeBackend(), "core"],
          ["opengles", "compatibility"],
        ]
      : [[choice, choice === "opengles" ? "compatibility" : "core"]];

  let found: Awaited<ReturnType<typeof tryBackend>>;
  let softwareFallback: typeof found;
  for (const [backend, level] of candidates) {
    const got = await tryBackend(backend, level);
    if (!got) continue;
    const software = describe(got.adapter, backend, level).software;
    // A CPU Vulkan driver is kept only as a last resort behind GL ES.
    if (choice === "auto" && software && backend !== "opengles") {
      softwareFallback ??= got;
      continue;
    }
    found = got;
    break;
  }
  found ??= softwareFallback;
  if (!found) {
    const hint =
      choice === "auto"
        ? "no WebGPU adapter found. On Debian/Ubuntu run `bash scripts/setup.sh` (as root it installs Mesa's " +
          "software GPU: apt-get install libegl1 libegl-mesa0 libgles2 libgl1-mesa-dri)"
        : `no WebGPU adapter on the ${choice} backend (MILORA_BACKEND=${choice}); unset it to let milora choose`;
    throw new NoAdapterError(hint);
  }

  const { adapter, backend, featureLevel } = found;
  const report = describe(adapter, backend, featureLevel);
  const requiredFeatures = WANTED_FEATURES.filter((f) => adapter.features.has(f)) as GPUFeatureName[];
  const device = await adapter.requestDevice({
    requiredFeatures,
    requiredLimits: { ...report.limits },
  });
  device.addEventListener("uncapturederror", (event) => {
    // Validation errors are bugs in milora's kernels or dispatches, never user input: make them loud.
    process.stderr.write(`milora: WebGPU error: ${(event as GPUUncapturedErrorEvent).error.message}\n`);
  });
  return {
    device,
    report,
    hasF16: requiredFeatures.includes("shader-f16" as GPUFeatureName),
    destroy: () => device.destroy(),
  };
}

/** One line naming the device, e.g. for `milora run`'s summary. */
export function adapterSummary(r: GpuAdapterReport): string {
  const kind = r.software ? "software" : "hardware";
  return `${r.description} (${r.backend}, ${r.featureLevel}, ${kind})`;
}
