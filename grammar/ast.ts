// The .milora abstract syntax tree: the grammar's public output.
// Every node carries the span of the text it came from, so every later
// diagnostic can point at the exact place in the file.

/** A half-open range of source text. Lines and columns are 1-based; offsets are 0-based. */
export interface Span {
  readonly file: string;
  readonly start: Position;
  /** Exclusive end. */
  readonly end: Position;
}

export interface Position {
  readonly offset: number;
  readonly line: number;
  readonly column: number;
}

interface Node {
  readonly span: Span;
}

/** A name as written, with its own span (for "did you mean" hints that point at the word). */
export interface Identifier extends Node {
  readonly kind: "Identifier";
  readonly name: string;
}

/** One `.milora` file. */
export interface SpecFile extends Node {
  readonly kind: "SpecFile";
  readonly imports: readonly ImportDecl[];
  readonly bases: readonly BaseDecl[];
  readonly adapters: readonly AdapterDecl[];
  /** Comments in source order; the formatter puts them back. */
  readonly comments: readonly Comment[];
}

export interface Comment extends Node {
  readonly kind: "Comment";
  /** The comment's full text including `//` or `/* *\/`. */
  readonly text: string;
}

/** `import "other.milora"`: the other file's bases and adapters become visible here. */
export interface ImportDecl extends Node {
  readonly kind: "ImportDecl";
  readonly path: StringLiteral;
}

/**
 * `base NAME: FAMILY { key value ... }` or `base NAME from "config.json" { overrides }`.
 * Either a family or a `from` path is given (the checker reports neither/both).
 */
export interface BaseDecl extends Node {
  readonly kind: "BaseDecl";
  readonly name: Identifier;
  readonly family?: Identifier;
  readonly from?: StringLiteral;
  readonly properties: readonly Property[];
}

/**
 * `adapter NAME on BASE { ... }` or `adapter NAME extends OTHER { ... }` (a variant: the other
 * adapter's statements, then these, later ones overriding).
 */
export interface AdapterDecl extends Node {
  readonly kind: "AdapterDecl";
  readonly name: Identifier;
  readonly on?: Identifier;
  readonly extends?: Identifier;
  readonly body: readonly AdapterStatement[];
}

export type AdapterStatement = ExpertsStmt | LayerOverride | RouterDecl | Property;

/**
 * `experts attn.*, down_proj { rank 8 alpha 16 }` sets options of the matched modules and turns them on;
 * `experts k_proj off` turns them off. A bare `experts mlp.*` turns them on with current options.
 */
export interface ExpertsStmt extends Node {
  readonly kind: "ExpertsStmt";
  readonly patterns: readonly ModulePattern[];
  /** True for `experts ... off`. */
  readonly off: boolean;
  readonly properties: readonly Property[];
}

/** `q_proj`, `attn.*`, `mlp.*`, `all`: `group` is set for `group.*`. */
export interface ModulePattern extends Node {
  readonly kind: "ModulePattern";
  /** The module or group name (`q_proj`, `attn`, `all`). */
  readonly name: string;
  /** True when written as `NAME.*`. */
  readonly wildcard: boolean;
}

/** `at layers 0..3, 8 { experts ... }`: statements that apply to those layers only. */
export interface LayerOverride extends Node {
  readonly kind: "LayerOverride";
  readonly layers: readonly Value[];
  readonly body: readonly ExpertsStmt[];
}

/** `router { key value ... }` or `router off` (plain LoRA: every enabled module, gate 1). */
export interface RouterDecl extends Node {
  readonly kind: "RouterDecl";
  readonly off: boolean;
  readonly properties: readonly Property[];
  /** `select top_k 2 | threshold 0.2 | dense`, kept apart because it takes a rule and an argument. */
  readonly select?: SelectClause;
}

export interface SelectClause extends Node {
  readonly kind: "SelectClause";
  readonly rule: Identifier;
  readonly argument?: NumberLiteral;
  /** `renormalize` in `select top_k 2 renormalize`. */
  readonly modifier?: Identifier;
}

/** `key value` or `key v1, v2, ...` (e.g. `layers 0..3, 8`). */
export interface Property extends Node {
  readonly kind: "Property";
  readonly key: Identifier;
  readonly values: readonly Value[];
  /** A property's options block: `activation rational { numerator 6 denominator 5 }` in a router, `rope_scaling llama3 { ... }` in a base. */
  readonly options?: readonly Property[];
}

export type Value = NumberLiteral | StringLiteral | BooleanLiteral | IdentValue | RangeValue;

export interface NumberLiteral extends Node {
  readonly kind: "Number";
  readonly value: number;
  /** The text as written (`1e-5`), so the formatter keeps the user's notation. */
  readonly text: string;
  /** True when written without a fraction or exponent. */
  readonly integer: boolean;
}

export interface StringLiteral extends Node {
  readonly kind: "String";
  /** The unescaped value. */
  readonly value: string;
}

export interface BooleanLiteral extends Node {
  readonly kind: "Boolean";
  readonly value: boolean;
}

export interface IdentValue extends Node {
  readonly kind: "Ident";
  readonly name: string;
}

/** `a..b`, inclusive at both ends. */
export interface RangeValue extends Node {
  readonly kind: "Range";
  readonly from: NumberLiteral;
  readonly to: NumberLiteral;
}
