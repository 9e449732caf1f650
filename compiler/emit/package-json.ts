// The compiled package's package.json: an ES module with its types, a `bin` that runs it, the runtime
// it carries (milora-runtime/, reached through package.json "imports") and the registry packages that
// runtime imports as its dependencies. It does not depend on milora, so it installs anywhere.
import { RUNTIME_DIR, type RuntimeFiles } from "./runtime-files.ts";

export interface PackageIdentity {
  readonly name: string;
  readonly version: string;
}

/**
 * The default package name of an adapter: `milora-` and its name in kebab case (`support_bot` ->
 * `milora-support-bot`), so that it, and the `bin` named after it, do not resolve to an unrelated
 * registry package (`npx tiny` outside a project would fetch the registry's `tiny`).
 */
export function defaultPackageName(adapterName: string): string {
  return `milora-${adapterName.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "")}`;
}

/** npm's rules for a package name, short of the registry's own checks: lower case, URL-safe, optionally scoped. */
export function packageNameProblem(name: string): string | undefined {
  if (name.length === 0 || name.length > 214) return "a package name has 1 to 214 characters";
  if (!/^(?:@[a-z0-9][a-z0-9._~-]*\/)?[a-z0-9][a-z0-9._~-]*$/.test(name)) {
    return `"${name}" is not a valid npm package name (lower-case letters, digits, - . _ ~, optionally @scope/)`;
  }
  return undefined;
}

export function versionProblem(version: string): string | undefined {
  return /^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$/.test(version) ? undefined : `"${version}" is not a semantic version such as 1.0.0`;
}

export function packageJson(id: PackageIdentity, description: string, runtime: Pick<RuntimeFiles, "dependencies" | "imports">): string {
  // Key order is meaningful here (export conditions match first to last), so it is written, not sorted.
  const json = {
    name: id.name,
    version: id.version,
    description,
    type: "module",
    main: "index.js",
    types: "index.d.ts",
    exports: { ".": { types: "./index.d.ts", default: "./index.js" }, "./manifest.json": "./manifest.json" },
    imports: runtime.imports,
    bin: { [id.name.replace(/^@[^/]+\//, "")]: "cli.js" },
    files: ["index.js", "index.d.ts", "cli.js", "cli.d.ts", "src", "kernels", "manifest.json", "README.md", RUNTIME_DIR],
    // The runtime is the package's own copy (it reads this compiler's manifests): only registry packages remain.
    dependencies: runtime.dependencies,
    engines: { node: ">=20" },
  };
  return JSON.stringify(json, null, 2) + "\n";
}
