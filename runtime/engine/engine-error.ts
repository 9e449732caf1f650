import { MiloraError } from "../errors.ts";

/** A request the engine cannot serve as configured (context, capacity, device limits). */
export class EngineError extends MiloraError {
  override name = "EngineError";
  readonly kind = "capacity";
}
