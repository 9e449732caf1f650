// "Did you mean" hints for misspelt names.
import { closest, distance } from "fastest-levenshtein";

/** The closest candidate when it is near enough to be a plausible typo. */
function closestName(word: string, candidates: readonly string[]): string | undefined {
  if (candidates.length === 0) return undefined;
  const best = closest(word, candidates);
  if (distance(word, best) <= Math.max(2, Math.floor(best.length / 3))) return best;
  // an abbreviation (`pool` for `pooling`) is far in edits but plainly meant
  return word.length >= 3 ? candidates.find((c) => c.startsWith(word)) : undefined;
}

/** `did you mean `x`?`, or a list of the valid choices when nothing is close. */
export function didYouMean(word: string, candidates: readonly string[]): string {
  const best = closestName(word, candidates);
  return best !== undefined
    ? `did you mean \`${best}\`?`
    : `expected one of ${candidates.map((c) => `\`${c}\``).join(", ")}`;
}
