// Chat messages -> prompt text through the model's own Jinja template (tokenizer_config.json's
// chat_template), rendered by @huggingface/jinja as transformers' apply_chat_template does.
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
   * The chat template of a model directory, or undefined when its tokenizer_config.json has none.
   * Throws CheckpointError when the template does not parse.
   */
  static load(dir: string): ChatTemplate | undefined {
    const config = tokenizerConfig(dir);
    if (typeof config.chat_template !== "string") return undefined;
    return ChatTemplate.fromText(config.chat_template, join(dir, "tokenizer_config.json"), dir);
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

function tokenizerConfig(dir: string): Record<string, unknown> {
  const path = join(dir, "tokenizer_config.json");
  if (!existsSync(path)) return {};
  return JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
}
