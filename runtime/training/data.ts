// Training data: JSONL files in the forms users already have, turned into token ids and Hugging Face
// labels (aligned with the tokens, -100 where unsupervised; the model shifts, so logits at t predict
// labels[t + 1]). Every line is checked first and all problems are reported at once, each naming the
// file and line: nothing is trained on a file with errors.
//   {"prompt": "...", "completion": "..."}   loss on the completion (and the EOS after it)
//   {"messages": [{"role", "content"}, ...]} rendered with the base's chat template, loss on assistant turns
//   {"text": "..."}                          loss on every token
//   {"input_ids": [...], "labels": [...]}    pre-tokenized, as is (labels default to input_ids)
// MiLoRA's router reads a sequence's prompt: the leading run of unsupervised positions.
import { readFileSync } from "node:fs";
import { MiloraError } from "../errors.ts";

export const IGNORE_INDEX = -100;

export interface TrainExample {
  readonly tokens: readonly number[];
  readonly labels: readonly number[];
  /** Where it came from, for messages about it. */
  readonly source: string;
}

/** What the loader needs of a tokenizer (runtime/tokenizer.ts's Tokenizer has it). */
export interface TextEncoder {
  encode(text: string, options: { readonly addBos: boolean }): number[];
  readonly eosIds: readonly number[];
}

/** Renders chat messages; with `addGenerationPrompt` the text ends with the assistant's cue. */
export interface ChatRenderer {
  render(messages: readonly { readonly role: string; readonly content: string }[], options: { readonly addGenerationPrompt: boolean }): string;
}

export interface LoadDataOptions {
  readonly vocabSize: number;
  /** Longer examples are cut to this many tokens (from the end), as Hugging Face truncates. */
  readonly maxLength: number;
  readonly tokenizer?: TextEncoder;
  readonly chat?: ChatRenderer;
}

export interface TrainData {
  readonly examples: readonly TrainExample[];
  /** Examples cut to maxLength. */
  readonly truncated: number;
  /** Examples left with no supervised position after truncation, and so dropped. */
  readonly dropped: number;
}

export class DataError extends MiloraError {
  override name = "DataError";
  readonly kind = "data";
}

const MAX_PROBLEMS_SHOWN = 20;

/** Reads a JSONL file; throws one DataError listing every bad line (the first 20, then a count). */
export function loadTrainData(path: string, options: LoadDataOptions): TrainData {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new DataError(`${path}: cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  const problems: string[] = [];
  const examples: TrainExample[] = [];
  let truncated = 0;
  let dropped = 0;
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    const where = `${path}:${i + 1}`;
    try {
      let example = exampleOf(parseLine(line), where, options);
      const cut = example.tokens.length > options.maxLength;
      if (cut) {
        truncated++;
        example = { ...example, tokens: example.tokens.slice(0, options.maxLength), labels: example.labels.slice(0, options.maxLength) };
      }
      // labels[0] is never a target: the first token has nothing before it to predict it.
      if (!example.labels.slice(1).some((l) => l !== IGNORE_INDEX)) {
        if (!cut) throw new DataError("no supervised token: nothing to learn from this line");
        dropped++;
        return;
      }
      examples.push(example);
    } catch (e) {
      if (!(e instanceof DataError)) throw e;
      problems.push(`${where}: ${e.message}`);
    }
  });
  if (problems.length > 0) {
    const shown = problems.slice(0, MAX_PROBLEMS_SHOWN);
    if (problems.length > shown.length) shown.push(`... and ${problems.length - shown.length} more`);
    throw new DataError(`${path} has ${problems.length} bad line${problems.length === 1 ? "" : "s"}; nothing was trained:\n  ${shown.join("\n  ")}`);
  }
  if (examples.length === 0) throw new DataError(`${path} holds no example`);
  return { examples, truncated, dropped };
}

function parseLine(line: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (e) {
    // JSON.parse's message quotes the input; say only where it failed.
    const at = /position (\d+)/.exec((e as Error).message)?.[1];
    throw new DataError(`not valid JSON${at === undefined ? "" : ` (at column ${Number(at) + 1})`}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw new DataError("each line must be a JSON object");
  return value as Record<string, unknown>;
}

function exampleOf(o: Record<string, unknown>, source: string, options: LoadDataOptions): TrainExample {
  const keys = Object.keys(o);
  if ("input_ids" in o) return pretokenized(o, source, options.vocabSize);
  const tokenizer = options.tokenizer;
  const needTokenizer = (form: string) => {
    if (!tokenizer) throw new DataError(`a "${form}" line needs the base's tokenizer.json; give pre-tokenized {"input_ids", "labels"} lines instead`);
    return tokenizer;
  };
  const eos = (t: TextEncoder) => (t.eosIds.length > 0 ? [t.eosIds[0]!] : []);
  if ("prompt" in o || "completion" in o) {
    const prompt = stringField(o, "prompt");
    const completion = stringField(o, "completion");
    const t = needTokenizer("prompt");
    const p = t.encode(prompt, { addBos: true });
    const c = [...t.encode(completion, { addBos: false }), ...eos(t)];
    return checked({ tokens: [...p, ...c], labels: [...p.map(() => IGNORE_INDEX), ...c], source }, options.vocabSize);
  }
  if ("messages" in o) return chat(o.messages, source, needTokenizer("messages"), options);
  if ("text" in o) {
    const t = needTokenizer("text");
    const tokens = [...t.encode(stringField(o, "text"), { addBos: true }), ...eos(t)];
    return checked({ tokens, labels: tokens, source }, options.vocabSize);
  }
  throw new DataError(`no known fields (${keys.join(", ") || "none"}): use prompt/completion, messages, text, or input_ids/labels`);
}

function stringField(o: Record<string, unknown>, key: string): string {
  const v = o[key];
  if (typeof v !== "string") throw new DataError(`"${key}" must be a string, got ${v === undefined ? "nothing" : typeof v}`);
  return v;
}

function pretokenized(o: Record<string, unknown>, source: string, vocabSize: number): TrainExample {
  const ids = intList(o.input_ids, "input_ids");
  const labels = o.labels === undefined ? ids : intList(o.labels, "labels");
  if (labels.length !== ids.length) throw new DataError(`"labels" has ${labels.length} entries but "input_ids" has ${ids.length}`);
  return checked({ tokens: ids, labels, source }, vocabSize);
}

function intList(v: unknown, key: string): number[] {
  if (!Array.isArray(v) || v.length === 0) throw new DataError(`"${key}" must be a non-empty array of integers`);
  const bad = v.findIndex((x) => !Number.isInteger(x));
  if (bad >= 0) throw new DataError(`"${key}"[${bad}] is not an integer`);
  return v as number[];
}

function checked(example: TrainExample, vocabSize: number): TrainExample {
  const badToken = example.tokens.findIndex((t) => t < 0 || t >= vocabSize);
  if (badToken >= 0) throw new DataError(`token ${example.tokens[badToken]} at position ${badToken} is outside the vocabulary (0..${vocabSize - 1})`);
  const badLabel = example.labels.findIndex((l) => l !== IGNORE_INDEX && (l < 0 || l >= vocabSize));
  if (badLabel >= 0) throw new DataError(`label ${example.labels[badLabel]} at position ${badLabel} is neither -100 nor a token of the vocabulary`);
  return example;
}

/**
 * A conversation through the chat template. Each assistant turn's text is the difference between the
 * rendering up to and including it and the rendering up to it with the generation cue; the segments
 * between are encoded separately and concatenated, assistant segments supervised.
 */
function chat(messages: unknown, source: string, tokenizer: TextEncoder, options: LoadDataOptions): TrainExample {
  if (!options.chat) throw new DataError('a "messages" line needs a chat template (tokenizer_config.json, chat_template.jinja or --chat-template)');
  if (!Array.isArray(messages) || messages.length === 0) throw new DataError('"messages" must be a non-empty array');
  const list = messages.map((m, i) => {
    if (typeof m !== "object" || m === null || typeof m.role !== "string" || typeof m.content !== "string") {
      throw new DataError(`"messages"[${i}] must be {"role": string, "content": string}`);
    }
    return { role: m.role as string, content: m.content as string };
  });
  if (!list.some((m) => m.role === "assistant")) throw new DataError('"messages" has no assistant turn to learn from');
  const render = (upTo: number, addGenerationPrompt: boolean) => {
    try {
      return options.chat!.render(list.slice(0, upTo), { addGenerationPrompt });
    } catch (e) {
      throw new DataError(`the chat template failed: ${(e as Error).message}`);
    }
  };
  const tokens: number[] = [];
  const labels: number[] = [];
  let done = "";
  const emit = (text: string, supervised: boolean) => {
    const ids = tokenizer.encode(text, { addBos: tokens.length === 0 });
    tokens.push(...ids);
    labels.push(...ids.map((id) => (supervised ? id : IGNORE_INDEX)));
  };
  list.forEach((m, i) => {
    if (m.role !== "assistant") return;
    const before = render(i, true);
    const after = render(i + 1, false);
    if (!before.startsWith(done) || !after.startsWith(before)) {
      throw new DataError(`the chat template's rendering of turn ${i} does not extend the earlier turns' text, so assistant tokens cannot be told apart`);
    }
    emit(before.slice(done.length), false);
    emit(after.slice(before.length), true);
    done = after;
  });
  const rest = render(list.length, false).slice(done.length);
  if (rest.length > 0) emit(rest, false);
  return checked({ tokens, labels, source }, options.vocabSize);
}
