// Keeping a synchronous piece of work whole when the user interrupts it. With a listener installed,
// Node only queues SIGINT, SIGTERM and SIGHUP until the work returns (its `finally` blocks clean up
// their temporary files); then the signal is raised again with its default action, so the process
// still ends as interrupted, with nothing half written left behind.

const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

export async function withSignalsDeferred<T>(work: () => T): Promise<T> {
  let caught: NodeJS.Signals | undefined;
  const note = (signal: NodeJS.Signals) => {
    caught ??= signal;
  };
  for (const s of SIGNALS) process.on(s, note);
  try {
    return work();
  } finally {
    // let signals that arrived during the work reach `note` before the listeners go
    await new Promise<void>((done) => setImmediate(done));
    await new Promise<void>((done) => setTimeout(done, 0));
    for (const s of SIGNALS) process.off(s, note);
    if (caught !== undefined) {
      process.kill(process.pid, caught);
      // The re-raised signal is delivered asynchronously: keep the process alive until it lands, so the
      // caller's next lines never run, with an exit as interrupted if it somehow does not.
      await new Promise<void>((done) => setTimeout(done, 2000));
      process.exit(128 + (caught === "SIGINT" ? 2 : caught === "SIGHUP" ? 1 : 15));
    }
  }
}
