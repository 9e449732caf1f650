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
    // Let signals that arrived during the work reach `note` before the listeners go: libuv hands them to
    // the event loop asynchronously, and under load one loop turn is not enough (a signal dropped here
    // would be lost), so wait up to 100 ms, less when one has come.
    for (let i = 0; i < 10 && caught === undefined; i++) await new Promise<void>((done) => setTimeout(done, 10));
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
