// Errors a client's request causes, answered as OpenAI does: a status and
// { "error": { "message", "type", "param", "code" } }, so OpenAI clients raise their usual exceptions.
import { MiloraError } from "../../errors.ts";
import { AdapterReadTimeoutError, UnknownAdapterError } from "../adapter-pool.ts";
import { DrainingError, QueueFullError } from "../scheduler.ts";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string,
    readonly code: string | null = null,
    readonly param: string | null = null,
    /** Extra response headers (Retry-After). */
    readonly headers: Readonly<Record<string, string>> = {},
  ) {
    super(message);
  }

  body(): { error: { message: string; type: string; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** 400: a malformed body or a field with a bad value; `param` names the field. */
export function badRequest(message: string, param: string | null = null, code: string | null = null): ApiError {
  return new ApiError(400, message, "invalid_request_error", code, param);
}

export function notFound(message: string, code: string | null = null, param: string | null = null): ApiError {
  return new ApiError(404, message, "invalid_request_error", code, param);
}

export function tooLarge(message: string, code: string, param: string | null = null): ApiError {
  return new ApiError(413, message, "invalid_request_error", code, param);
}

/** 400 context_length_exceeded, as OpenAI and vLLM answer a prompt and max_tokens beyond the context. */
export function contextTooLong(message: string, param: string): ApiError {
  return badRequest(message, param, "context_length_exceeded");
}

/**
 * The answer to a failure: an ApiError as it is; a user error (runtime/errors.ts) by the few classes
 * HTTP has a status for (429 with Retry-After for a full queue, 503 while draining, 504 for an adapter
 * read that timed out, 404 for an adapter nobody registered), 503 for a device problem (nothing the
 * client did), else 400 with its message; undefined for anything else, which is a bug (500).
 * `param` names the field the failure is about; `message` replaces the error's own.
 */
export function apiErrorOf(e: unknown, options: { readonly param?: string; readonly message?: string } = {}): ApiError | undefined {
  if (e instanceof ApiError) return e;
  if (!(e instanceof MiloraError)) return undefined;
  const message = options.message ?? e.message;
  const param = options.param ?? null;
  if (e instanceof QueueFullError) return new ApiError(429, message, "rate_limit_error", "server_overloaded", param, { "retry-after": String(e.retryAfterSeconds) });
  if (e instanceof DrainingError) return new ApiError(503, message, "server_error", "shutting_down", param);
  if (e instanceof AdapterReadTimeoutError) return new ApiError(504, message, "server_error", "adapter_load_timeout", param);
  if (e instanceof UnknownAdapterError) return notFound(message, "model_not_found", param);
  if (e.kind === "device") return new ApiError(503, message, "server_error", "device_error", param);
  return badRequest(message, param);
}
