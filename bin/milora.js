#!/usr/bin/env node
// The `milora` command. Installed (what `npm pack` ships: dist/ without the TypeScript sources), it runs
// the build, dist/bin/cli.js, with plain node. In a repository checkout (bin/cli.ts is here) it runs the
// sources through tsx's loader, so there is no build step while developing; MILORA_BUILT=1 runs the
// build there too (after `npm run build`).
import { existsSync } from "node:fs";

const fromSource = existsSync(new URL("./cli.ts", import.meta.url)) && process.env.MILORA_BUILT !== "1";
let main;
if (fromSource) {
  const { register } = await import("tsx/esm/api");
  register();
  ({ main } = await import("./cli.ts"));
} else {
  ({ main } = await import("../dist/bin/cli.js"));
}
process.exitCode = await main(process.argv);
