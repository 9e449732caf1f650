// Parses a picture as strict XML (any well-formedness error throws) and reads its elements back, for
// tests that check a picture's structure and numbers rather than its pixels.
import { DOMParser, type Element } from "@xmldom/xmldom";

export function parseSvg(svg: string): Element {
  const errors: string[] = [];
  const doc = new DOMParser({ onError: (level, message) => void (level !== "warning" && errors.push(message)) }).parseFromString(svg, "image/svg+xml");
  if (errors.length > 0) throw new Error(`not well-formed SVG: ${errors.join("; ")}`);
  const root = doc.documentElement;
  if (!root || root.tagName !== "svg") throw new Error("no <svg> root");
  return root;
}

/** Every element named `tag` under `root` whose class list holds `cls` (any class when omitted). */
export function elements(root: Element, tag: string, cls?: string): Element[] {
  const all = Array.from(root.getElementsByTagName(tag));
  return cls === undefined ? all : all.filter((e) => (e.getAttribute("class") ?? "").split(/\s+/).includes(cls));
}

/** The text of every element named `tag` with class `cls`. */
export function texts(root: Element, tag: string, cls: string): string[] {
  return elements(root, tag, cls).map((e) => e.textContent ?? "");
}
