// The few pieces every milora picture is made of: escaped text, elements as strings, numbers that read
// well in a label. Pictures are plain SVG 1.1 strings, made without a browser or a DOM.

/** Text safe inside an element or a double-quoted attribute. */
export function escapeXml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}

export type Attributes = Readonly<Record<string, string | number | undefined>>;

/** `<name a="1">children</name>`, or self-closed without children; undefined attributes are left out. */
export function el(name: string, attributes: Attributes = {}, ...children: readonly string[]): string {
  const attrs = Object.entries(attributes)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => ` ${k}="${escapeXml(typeof v === "number" ? num(v) : v!)}"`)
    .join("");
  return children.length === 0 ? `<${name}${attrs}/>` : `<${name}${attrs}>${children.join("")}</${name}>`;
}

/** A text node's content, escaped. */
export function text(content: string): string {
  return escapeXml(content);
}

/** A coordinate: at most two decimals, no trailing zeros. */
export function num(v: number): string {
  return Number.isInteger(v) ? String(v) : String(Math.round(v * 100) / 100);
}

/** A value for a label: 3 significant digits, no exponent for the usual range. */
export function label(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  if (a >= 1000) return Math.round(v).toLocaleString("en-US");
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return String(Number(v.toFixed(1)));
  if (a >= 0.01) return String(Number(v.toFixed(2)));
  return v.toPrecision(2);
}

export const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif";

/** The outer `<svg>` of a picture, with its accessible title and a white background. */
export function document(width: number, height: number, title: string, body: readonly string[], attributes: Attributes = {}): string {
  return (
    el(
      "svg",
      {
        xmlns: "http://www.w3.org/2000/svg",
        width: Math.ceil(width),
        height: Math.ceil(height),
        viewBox: `0 0 ${Math.ceil(width)} ${Math.ceil(height)}`,
        role: "img",
        "aria-label": title,
        "font-family": FONT,
        ...attributes,
      },
      el("title", {}, text(title)),
      el("rect", { width: "100%", height: "100%", fill: "#ffffff" }),
      ...body,
    ) + "\n"
  );
}

/** Roughly how wide `s` sets at `size` px in a sans-serif face (for layout without a font engine). */
export function textWidth(s: string, size: number): number {
  return s.length * size * 0.58;
}
