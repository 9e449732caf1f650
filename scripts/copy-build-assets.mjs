// Part of `npm run build`: the files the built JavaScript reads beside itself that tsc does not emit
// (the serving page's static files), copied to the same place under dist/ (or the folder given:
// scripts/build.sh builds into a fresh one and swaps it in).
import { cpSync, readdirSync } from "node:fs";
import { join } from "node:path";

const out = process.argv[2] ?? "dist";

for (const dir of ["runtime/serving/ui"]) {
  for (const name of readdirSync(dir)) {
    if (!name.endsWith(".ts")) cpSync(join(dir, name), join(out, dir, name));
  }
}
