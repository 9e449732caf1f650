// A stand-in for an adapter read that never ends (a catastrophic regular expression, a file that
// never ends): the worker spins until it is terminated.
for (;;) {
  // spin
}
