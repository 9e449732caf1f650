// Errors a client's request causes, answered as OpenAI does: a status and
// { "error": { "message", "type", "param", "code" } }, so OpenAI clients raise their usual exceptions.

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
