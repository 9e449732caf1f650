/** A request the engine cannot serve as configured (context, capacity, device limits). */
export class EngineError extends Error {
  override name = "EngineError";
}
