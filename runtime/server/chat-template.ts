// Chat messages -> prompt text through the model's own Jinja template (tokenizer_config.json's
// chat_template), rendered by @huggingface/jinja as transformers' apply_chat_template does.
import { Template } from "@huggingface/jinja";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { CheckpointError } from "../safetensors.ts";

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
    const path = join(dir, "tokenizer_config.json");
    if (!existsSync(path)) return undefined;
    const config = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
    if (typeof config.chat_template !== "string") return undefined;
    // Templates refer to the special tokens by their text: {{ bos_token }}, {{ eos_token }}.
    const special: Record<string, string> = {};
    for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
      const value = config[key];
      const text = typeof value === "object" && value !== null ? (value as { content?: unknown }).content : value;
      if (typeof text === "string") special[key] = text;
    }
    try {
      return new ChatTemplate(new Template(config.chat_template), special);
    } catch (e) {
      throw new CheckpointError(`${path}: chat_template does not parse (${(e as Error).message})`);
    }
  }

  /** The prompt text for `messages`, ending with the cue for the assistant's turn. Throws on template errors. */
  render(messages: readonly ChatMessage[]): string {
    return this.#template.render({ ...this.#specialTokens, messages: messages.map((m) => ({ ...m })), add_generation_prompt: true });
  }
}
