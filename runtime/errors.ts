// The errors milora reports to its users. A MiloraError is a problem with what the user gave (flags, a
// spec, a checkpoint, a request...): its message says what and where, and its kind says with what,
// which decides the exit status of every CLI and the HTTP status of the server. Anything else thrown
// is a bug in milora. Every CLI prints a failure with reportError, and only with it.

/** The kinds of user error and each one's exit status (printed by --help; docs/architecture.md's table, checked by a test). */
export const ERROR_KINDS = {
  spec: { exit: 1, about: "a .milora spec: its errors, or what it lacks (no such adapter)" },
  usage: { exit: 2, about: "the command line: a flag, its value, a combination, a path that is not there" },
  file: { exit: 3, about: "a file or directory that cannot be read or written as asked (also an OS error naming a path)" },
  checkpoint: { exit: 4, about: "a base model's or adapter's files (config, tokenizer, safetensors), or their fit to the spec" },
  adapter: { exit: 5, about: "an adapter the engine or server cannot take (rank, slots, name) or does not know" },
  package: { exit: 6, about: "a compiled package that is damaged or from another milora, or the runtime build it needs" },
  data: { exit: 7, about: "training data, or a run's metrics.jsonl" },
  device: { exit: 8, about: "the GPU: none usable, or it failed milora's self-test" },
  capacity: { exit: 9, about: "more than the engine holds as set up: context, sequence slots, rows per step, queue" },
  request: { exit: 10, about: "a generation request: token ids, sampling or beam settings" },
  unsupported: { exit: 11, about: "what milora cannot build or run: a family without a planner, sizes past the kernels' limits" },
} as const satisfies Record<string, { exit: number; about: string }>;

export type ErrorKind = keyof typeof ERROR_KINDS;

/** The exit status of a failure that is not a MiloraError: a bug (sysexits' EX_SOFTWARE). */
export const INTERNAL_EXIT = 70;

/**
 * A user error. Subclasses fix the kind (`readonly kind = "checkpoint"`) and are what callers tell apart
 * by class; a problem nobody catches by class is thrown as userError(kind, message).
 */
export abstract class MiloraError extends Error {
  abstract readonly kind: ErrorKind;
}

class KindError extends MiloraError {
  override name = "MiloraError";
  constructor(
    readonly kind: ErrorKind,
    message: string,
  ) {
    super(message);
  }
}

/** A MiloraError of `kind` for a problem no caller tells apart by class (a flag's value, a missing path). */
export function userError(kind: ErrorKind, message: string): MiloraError {
  return new KindError(kind, message);
}

/**
 * `e` as a user error, or undefined for a bug. A file the operating system refused (an errno error
 * naming its path, from a read or write of a path the user gave) is the user's to fix, as kind "file".
 */
export function asUserError(e: unknown): MiloraError | undefined {
  if (e instanceof MiloraError) return e;
  const os = e as NodeJS.ErrnoException | undefined;
  if (typeof os?.code === "string" && typeof os.syscall === "string" && typeof os.path === "string") {
    return userError("file", `cannot ${os.syscall} ${os.path} (${os.code}); check the path and its permissions`);
  }
  return undefined;
}

/**
 * Prints a CLI's failure on stderr and returns its exit status: a user error as one line,
 * `PROGRAM: message` (no stack; a usage error followed by `usageHint`), with its kind's exit status;
 * anything else as an internal error with its stack, exit INTERNAL_EXIT.
 */
export function reportError(e: unknown, options: { readonly program?: string; readonly usageHint?: string; readonly write?: (text: string) => void } = {}): number {
  const write = options.write ?? ((text: string) => void process.stderr.write(text));
  const prefix = options.program === undefined ? "" : `${options.program}: `;
  const user = asUserError(e);
  if (user !== undefined) {
    const hint = user.kind === "usage" && options.usageHint !== undefined ? ` (${options.usageHint})` : "";
    write(`${prefix}${user.message}${hint}\n`);
    return ERROR_KINDS[user.kind].exit;
  }
  const detail = e instanceof Error ? (e.stack ?? `${e.name}: ${e.message}`) : String(e);
  write(`${prefix}internal error (a bug in milora: please report it with this output)\n${detail}\n`);
  return INTERNAL_EXIT;
}

/** The exit statuses, for a CLI's help: one line per kind. */
export function exitStatusHelp(): string {
  const rows = [
    ["0", "success"],
    ...Object.values(ERROR_KINDS).map(({ exit, about }) => [String(exit), about]),
    [String(INTERNAL_EXIT), "an internal error (a bug in milora), printed with its stack"],
  ];
  return `Exit status:\n${rows.map(([code, about]) => `  ${code!.padStart(2)}  ${about}`).join("\n")}\n`;
}
