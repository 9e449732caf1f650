// One sequence's logit processing entries (penalties and logit bias), packed as the logit_adjust
// kernel reads them (compiler/kernels/logit-adjust.ts, runtime/gpu/layouts.ts) and kept up to date as
// the sequence's tokens are generated.
import { ADJUST_ENTRY_WORDS, ADJUST_ROW_WORDS } from "../gpu/layouts.ts";

/** Penalties and bias of one sequence (the server's fields; neutral values turn each off). */
export interface PenaltySettings {
  readonly presence: number;
  readonly frequency: number;
  /** 1: off. */
  readonly repetition: number;
  readonly bias: ReadonlyMap<number, number>;
}

export function penaltiesActive(s: PenaltySettings): boolean {
  return s.presence !== 0 || s.frequency !== 0 || s.repetition !== 1 || s.bias.size > 0;
}

/**
 * One sequence's entries, kept packed as the kernel reads them and updated in place as tokens are
 * generated: O(1) work per token on the CPU, and one copy of the packed words per step.
 */
export class LogitAdjust {
  readonly #s: PenaltySettings;
  readonly #at = new Map<number, number>();
  readonly #count: number[] = [];
  readonly #seen: boolean[] = [];
  #words = new Uint32Array(64 * ADJUST_ENTRY_WORDS);
  #floats = new Float32Array(this.#words.buffer);

  constructor(prompt: readonly number[], settings: PenaltySettings) {
    this.#s = settings;
    for (const [token] of settings.bias) this.#update(this.#entry(token));
    // The repetition penalty reaches the prompt's tokens too (vLLM, Hugging Face); the others only the output's.
    if (settings.repetition !== 1) {
      for (const t of prompt) {
        const i = this.#entry(t);
        this.#seen[i] = true;
        this.#update(i);
      }
    }
  }

  /** Entries this sequence has (distinct tokens). */
  get size(): number {
    return this.#at.size;
  }

  /** The packed entries, ADJUST_ENTRY_WORDS words each. */
  get words(): Uint32Array {
    return this.#words.subarray(0, this.size * ADJUST_ENTRY_WORDS);
  }

  /** A token was generated. */
  observe(token: number): void {
    if (this.#s.presence === 0 && this.#s.frequency === 0 && this.#s.repetition === 1) return;
    const i = this.#entry(token);
    this.#count[i]!++;
    this.#seen[i] = true;
    this.#update(i);
  }

  #entry(token: number): number {
    let i = this.#at.get(token);
    if (i !== undefined) return i;
    i = this.#at.size;
    this.#at.set(token, i);
    this.#count.push(0);
    this.#seen.push(false);
    if ((i + 1) * ADJUST_ENTRY_WORDS > this.#words.length) {
      const grown = new Uint32Array(this.#words.length * 2);
      grown.set(this.#words);
      this.#words = grown;
      this.#floats = new Float32Array(grown.buffer);
    }
    this.#words[i * ADJUST_ENTRY_WORDS] = token;
    return i;
  }

  #update(i: number): void {
    const s = this.#s;
    const token = this.#words[i * ADJUST_ENTRY_WORDS]!;
    const count = this.#count[i]!;
    const r = this.#seen[i] ? s.repetition : 1;
    const at = i * ADJUST_ENTRY_WORDS;
    this.#floats[at + 1] = 1 / r;
    this.#floats[at + 2] = r;
    this.#floats[at + 3] = -s.frequency * count - (count > 0 ? s.presence : 0) + (s.bias.get(token) ?? 0);
  }
}

/** One step's logit processing as the logit_adjust kernel reads it: per out row (first entry, entries, min_p, temperature), then the entries. */
export interface LogitProcessing {
  readonly info: Uint32Array;
  readonly entries: Uint32Array;
}

/** What an out row's sequence asks of logit processing (a Sequence has these fields). */
export interface AdjustedRow {
  readonly adjust: LogitAdjust | undefined;
  readonly sampling: { readonly minP: number; readonly temperature: number };
}

/** Per out row the sequence it samples for (undefined: a logits-only row): the step's processing, if any row has some. */
export function logitProcessingOf(sampled: readonly (AdjustedRow | undefined)[]): LogitProcessing | undefined {
  if (!sampled.some((s) => s && ((s.adjust?.size ?? 0) > 0 || s.sampling.minP > 0))) return undefined;
  const info = new Uint32Array(sampled.length * ADJUST_ROW_WORDS);
  const floats = new Float32Array(info.buffer);
  let total = 0;
  for (const s of sampled) total += s?.adjust?.size ?? 0;
  const entries = new Uint32Array(Math.max(1, total) * ADJUST_ENTRY_WORDS);
  let at = 0;
  sampled.forEach((s, r) => {
    const words = s?.adjust?.words;
    info[r * ADJUST_ROW_WORDS] = at;
    info[r * ADJUST_ROW_WORDS + 1] = words ? words.length / ADJUST_ENTRY_WORDS : 0;
    floats[r * ADJUST_ROW_WORDS + 2] = s?.sampling.minP ?? 0;
    floats[r * ADJUST_ROW_WORDS + 3] = s?.sampling.temperature ?? 0;
    if (words) {
      entries.set(words, at * ADJUST_ENTRY_WORDS);
      at += words.length / ADJUST_ENTRY_WORDS;
    }
  });
  return { info, entries };
}
