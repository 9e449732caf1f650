// milora's "." export (package.json "exports"): the toolchain as a library, what the `milora` command
// does for check and compile, plus the runtime's loader (compiled packages carry their own copy).
export { checkFiles } from "../compiler/check.ts";
export { compilePackage, CompileError, type CompileOptions, type CompileResult } from "../compiler/emit/compile-package.ts";
export { writePackage, OutputError, type PackageFile, type WriteOptions } from "../compiler/emit/write-package.ts";
export { loadCompiledModel } from "../runtime/package/loader.ts";
export { ERROR_KINDS, MiloraError, reportError, type ErrorKind } from "../runtime/errors.ts";
