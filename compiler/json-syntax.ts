// Why a text is not JSON, without quoting it: V8's messages can echo the start of the text
// ("Unexpected token 'r', \"root:x:0:0\"... is not valid JSON"), and a path that names the wrong file
// (a private one, say) must not get its contents printed in an error.

/** The reason JSON.parse gave, with any quoted text left out, and the line and column when it gave an offset. */
export function jsonSyntaxReason(err: unknown, text?: string): string {
  const message = err instanceof Error ? err.message : "";
  if (/^Unexpected end of JSON input/.test(message)) return "the JSON ends early";
  const at = /^(.*?) (in|after) JSON at position (\d+)/.exec(message);
  // V8 quotes single characters ('}'); anything else in quotes would be the file's text
  if (at !== null && !/["']/.test(at[1]!.replace(/'.'/g, ""))) {
    const what = at[2] === "after" ? "more text after the JSON value" : at[1]!.charAt(0).toLowerCase() + at[1]!.slice(1);
    return `${what}${where(Number(at[3]), text)}`;
  }
  return "an unexpected character where a JSON value should be";
}

function where(offset: number, text: string | undefined): string {
  if (text === undefined) return ` at offset ${offset}`;
  const before = text.slice(0, offset);
  const line = before.split("\n").length;
  return ` at line ${line}, column ${offset - before.lastIndexOf("\n")}`;
}
