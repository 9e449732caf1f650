// A device's calibration: the row count up to which the matvec kernels beat the matmul, per weight
// storage format, as `milora bench --calibrate` measured it (crossover.ts). One JSON file per device,
// by default under the user's cache directory and named by the device's description, so that `milora
// run` and `milora serve` find the figure for the GPU they got; `milora compile --calibration FILE`
// bakes one into a package. Without a file, plans use MATVEC_MAX_ROWS (compiler/plan.ts).
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { adapterSummary, type GpuAdapterReport } from "../../runtime/gpu/device.ts";
import { userError } from "../../runtime/errors.ts";
import { WEIGHT_FORMATS, type WeightFormat } from "../../runtime/package/format.ts";

export const CALIBRATION_VERSION = 1;

/** One format's measurement: the kernels' microseconds at each row count, and the crossover drawn from them. */
export interface FormatCrossover {
  readonly weights: WeightFormat;
  /** The largest row count the matvec kernels should take (PlanOptions.matvecMaxRows). */
  readonly matvecMaxRows: number;
  /** False when the matvec still won at the largest row count measured: the crossover is at least that. */
  readonly bounded: boolean;
  /** Microseconds of one layer's linears plus the lm_head at each row count, both ways. */
  readonly timings: readonly { readonly rows: number; readonly matvecUs: number; readonly matmulUs: number }[];
}

export interface Calibration {
  readonly version: typeof CALIBRATION_VERSION;
  /** adapterSummary of the device measured: what a run's device must match. */
  readonly device: string;
  /** When it was measured (ISO 8601) and on what shapes. */
  readonly measuredAt: string;
  readonly model: string;
  readonly formats: readonly FormatCrossover[];
}

/** milora's cache directory: $XDG_CACHE_HOME/milora, else ~/.cache/milora. */
export function cacheDir(): string {
  const xdg = process.env.XDG_CACHE_HOME;
  return join(xdg !== undefined && xdg !== "" ? xdg : join(homedir(), ".cache"), "milora");
}

/** Where a device's calibration lives by default: CACHE/calibration/<description>-<hash>.json. */
export function defaultCalibrationFile(report: GpuAdapterReport): string {
  const device = adapterSummary(report);
  const slug = device.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 60);
  const hash = createHash("sha256").update(device).digest("hex").slice(0, 8);
  return join(cacheDir(), "calibration", `${slug}-${hash}.json`);
}

/** Writes a calibration atomically (a reader never sees half a file). */
export function writeCalibration(file: string, calibration: Calibration): void {
  try {
    mkdirSync(dirname(file), { recursive: true });
    const temp = `${file}.tmp-${process.pid}`;
    writeFileSync(temp, JSON.stringify(calibration, null, 2) + "\n");
    renameSync(temp, file);
  } catch (e) {
    throw userError("file", `cannot write the calibration ${file}: ${(e as Error).message}`);
  }
}

/** Reads and checks a calibration file; anything wrong is a MiloraError naming the file and the field. */
export function readCalibration(file: string): Calibration {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    throw userError("file", `cannot read the calibration ${file}: ${(e as Error).message}`);
  }
  const bad = (what: string) => userError("file", `${file} is not a milora calibration: ${what} (run \`milora bench --calibrate\` again, or delete it)`);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw bad(`not JSON (${(e as Error).message})`);
  }
  if (!isObject(json)) throw bad("not a JSON object");
  if (json.version !== CALIBRATION_VERSION) throw bad(`version ${JSON.stringify(json.version)}, this milora reads version ${CALIBRATION_VERSION}`);
  for (const key of ["device", "measuredAt", "model"] as const) if (typeof json[key] !== "string") throw bad(`"${key}" must be a string`);
  if (!Array.isArray(json.formats) || json.formats.length === 0) throw bad(`"formats" must be a non-empty array`);
  const seen = new Set<string>();
  json.formats.forEach((f: unknown, i: number) => {
    const at = `formats[${i}]`;
    if (!isObject(f)) throw bad(`${at} must be an object`);
    if (!WEIGHT_FORMATS.includes(f.weights as WeightFormat)) throw bad(`${at}.weights must be one of ${WEIGHT_FORMATS.join(", ")}, got ${JSON.stringify(f.weights)}`);
    if (seen.has(f.weights as string)) throw bad(`${at}.weights ${f.weights} appears twice`);
    seen.add(f.weights as string);
    if (!Number.isInteger(f.matvecMaxRows) || (f.matvecMaxRows as number) < 1) throw bad(`${at}.matvecMaxRows must be a whole number of rows, at least 1, got ${JSON.stringify(f.matvecMaxRows)}`);
    if (typeof f.bounded !== "boolean") throw bad(`${at}.bounded must be true or false`);
    if (!Array.isArray(f.timings)) throw bad(`${at}.timings must be an array`);
    f.timings.forEach((t: unknown, j: number) => {
      const ok = isObject(t) && Number.isInteger(t.rows) && [t.matvecUs, t.matmulUs].every((v) => typeof v === "number" && Number.isFinite(v) && v >= 0);
      if (!ok) throw bad(`${at}.timings[${j}] must be { rows, matvecUs, matmulUs } with a whole rows and finite times`);
    });
  });
  return json as unknown as Calibration;
}

/**
 * The calibration a run on `report`'s device uses: `file` when given (which must exist and be of this
 * device), else the device's default file when there is one; undefined without either.
 */
export function deviceCalibration(report: GpuAdapterReport, file?: string): Calibration | undefined {
  const path = file ?? defaultCalibrationFile(report);
  if (file === undefined && !existsSync(path)) return undefined;
  const calibration = readCalibration(path);
  const device = adapterSummary(report);
  if (calibration.device !== device) {
    throw userError("file", `${path} was measured on ${calibration.device}, not on this device (${device}): run \`milora bench --calibrate\` here`);
  }
  return calibration;
}

/** The calibrated matvec row limit for weights stored as `format`; undefined when that format was not measured. */
export function calibratedMatvecRows(calibration: Pick<Calibration, "formats"> | undefined, format: WeightFormat): number | undefined {
  return calibration?.formats.find((f) => f.weights === format)?.matvecMaxRows;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
