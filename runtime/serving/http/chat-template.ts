// Chat messages -> prompt text through the model's own Jinja template (chat_template.jinja,
// chat_template.json or tokenizer_config.json's chat_template; an adapter directory's own; or the
// operator's --chat-template FILE), rendered by @huggingface/jinja as transformers' apply_chat_template does.
import { Template } from "@huggingface/jinja";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { CheckpointError } from "../../formats/safetensors.ts";

export interface ChatMessage {
  readonly role: string;
  readonly content: string;
}

export class ChatTemplate {
  readonly #template: Template;
  readonly #specialTokens: Readonly<Record<string, string>>;

  private constructor(template: Template, specialTokens: Readonly<Record<string, string>>) {
    this.#template = template;
    this.#specialTokens = specialTokens;
  }

  /**
   * The chat template of a model (or adapter) directory, where Hugging Face's layouts put it, first
   * found wins: chat_template.jinja (the current layout), chat_template.json ({"chat_template": ...}),
   * tokenizer_config.json's chat_template (a string, or a list of {name, template} whose "default" is
   * taken). Undefined when there is none. Throws CheckpointError when one does not read or parse.
   * Special tokens come from `specialTokensDir` (default `dir`): an adapter's template uses its base's.
   */
  static load(dir: string, specialTokensDir: string = dir): ChatTemplate | undefined {
    const found = findTemplate(dir);
    return found && ChatTemplate.fromText(found.text, found.where, specialTokensDir);
  }

  /** A template file given by the operator (`--chat-template FILE`): Jinja text, or a chat_template.json. */
  static fromFile(path: string, specialTokensDir?: string): ChatTemplate {
    let text: string;
    try {
      text = readFileSync(path, "utf8");
    } catch (e) {
      throw new CheckpointError(`${path}: cannot read the chat template (${(e as Error).message})`);
    }
    if (path.endsWith(".json")) text = templateOfJson(JSON.parse(text) as Record<string, unknown>, path);
    return ChatTemplate.fromText(text, path, specialTokensDir);
  }

  /**
   * A template given as text (read from `where`, named in errors), with the special tokens of the model
   * directory `dir` when given. Throws CheckpointError when the template does not parse.
   */
  static fromText(text: string, where: string, dir?: string): ChatTemplate {
    const config = dir === undefined ? {} : tokenizerConfig(dir);
    // Templates refer to the special tokens by their text: {{ bos_token }}, {{ eos_token }}.
    const special: Record<string, string> = {};
    for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
      const value = config[key];
      const token = typeof value === "object" && value !== null ? (value as { content?: unknown }).content : value;
      if (typeof token === "string") special[key] = token;
    }
    try {
      return new ChatTemplate(new Template(text), special);
    } catch (e) {
      throw new CheckpointError(`${where}: the chat template does not parse (${(e as Error).message})`);
    }
  }

  /** The text of `messages`, by default ending with the cue for the assistant's turn. Throws on template errors. */
  render(messages: readonly ChatMessage[], options: { readonly addGenerationPrompt?: boolean } = {}): string {
    const add_generation_prompt = options.addGenerationPrompt ?? true;
    return this.#template.render({ ...this.#specialTokens, messages: messages.map((m) => ({ ...m })), add_generation_prompt });
  }
}

function findTemplate(dir: string): { text: string; where: string } | undefined {
  const jinja = join(dir, "chat_template.jinja");
  if (existsSync(jinja)) return { text: readFileSync(jinja, "utf8"), where: jinja };
  const json = join(dir, "chat_template.json");
  if (existsSync(json)) return { text: templateOfJson(readJson(json), json), where: json };
  const config = tokenizerConfig(dir);
  if (config.chat_template === undefined || config.chat_template === null) return undefined;
  return { text: templateOfJson(config, join(dir, "tokenizer_config.json")), where: join(dir, "tokenizer_config.json") };
}

/** The `chat_template` of a JSON object: a string, or Hugging Face's list of named templates ("default" taken). */
function templateOfJson(json: Record<string, unknown>, where: string): string {
  const t = json.chat_template;
  if (typeof t === "string") return t;
  if (Array.isArray(t)) {
    const named = t as { name?: unknown; template?: unknown }[];
    const pick = named.find((x) => x?.name === "default") ?? (named.length === 1 ? named[0] : undefined);
    if (typeof pick?.template === "string") return pick.template;
    throw new CheckpointError(`${where}: chat_template is a list of named templates without a "default" one`);
  }
  throw new CheckpointError(`${where}: chat_template must be a string or a list of {name, template}`);
}

function readJson(path: string): Record<string, unknown> {
  try {
    return JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
  } catch (e) {
    throw new CheckpointError(`${path}: cannot read as JSON (${(e as Error).message})`);
  }
}

function tokenizerConfig(dir: string): Record<string, unknown> {
  const path = join(dir, "tokenizer_config.json");
  if (!existsSync(path)) return {};
  return JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
}
