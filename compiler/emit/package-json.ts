// The compiled package's package.json: an ES module with its types, a `bin` that runs it, and the
// milora runtime as its one dependency.
import { COMPILER_VERSION } from "./manifest.ts";

export interface PackageIdentity {
  readonly name: string;
  readonly version: string;
}

/** The default package name of an adapter: its name in kebab case (`support_bot` -> `support-bot`). */
export function defaultPackageName(adapterName: string): string {
  return adapterName.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "");
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

export function packageJson(id: PackageIdentity, description: string): string {
  const [major, minor] = COMPILER_VERSION.split(".");
  // Key order is meaningful here (export conditions match first to last), so it is written, not sorted.
  const json = {
    name: id.name,
    version: id.version,
    description,
    type: "module",
    main: "index.js",
    types: "index.d.ts",
    exports: { ".": { types: "./index.d.ts", default: "./index.js" }, "./manifest.json": "./manifest.json" },
    bin: { [id.name.replace(/^@[^/]+\//, "")]: "cli.js" },
    files: ["index.js", "index.d.ts", "cli.js", "cli.d.ts", "src", "kernels", "manifest.json", "README.md"],
    // The runtime must read this compiler's manifests: same major, and before 1.0 the same minor.
    dependencies: { milora: major === "0" ? `~${major}.${minor}.0` : `^${major}.0.0` },
    engines: { node: ">=20" },
  };
  return JSON.stringify(json, null, 2) + "\n";
}
