// Turns the parser's CST into the AST of ast.ts. After error recovery a CST node may lack
// children; a node that lacks its name is left out, so the AST holds only what was written.
import type { CstElement, CstNode, IToken } from "chevrotain";
import type {
  AdapterDecl,
  AdapterStatement,
  BaseDecl,
  Comment,
  ExpertsStmt,
  Identifier,
  ImportDecl,
  LayerOverride,
  ModulePattern,
  NumberLiteral,
  Property,
  RouterDecl,
  SelectClause,
  Span,
  SpecFile,
  StringLiteral,
  Value,
} from "./ast.ts";
import type {
  AdapterDeclCst,
  AdapterStatementCst,
  BaseBlockCst,
  BaseDeclCst,
  DeclarationCst,
  ExpertsStmtCst,
  ImportDeclCst,
  LayerOverrideCst,
  ModulePatternCst,
  PropertyBlockCst,
  PropertyCst,
  RouterDeclCst,
  SelectClauseCst,
  SpecFileCst,
  ValueCst,
} from "./cst.ts";
import type { Diagnostic } from "./diagnostic.ts";
import { UnterminatedString } from "./lexer.ts";
import type { SourceText } from "./source-text.ts";
import { unescapeString } from "./string-escapes.ts";

/** Tokens Chevrotain made up during recovery have no place in the text. */
function isReal(token: IToken): boolean {
  return !token.isInsertedInRecovery && !Number.isNaN(token.startOffset);
}

function isToken(element: CstElement): element is IToken {
  return "image" in element;
}

/** The first real token of a list, if any. */
function first(tokens: IToken[] | undefined): IToken | undefined {
  return tokens?.find(isReal);
}

export class AstBuilder {
  readonly diagnostics: Diagnostic[] = [];

  constructor(private readonly source: SourceText) {}

  specFile(node: CstNode, comments: readonly IToken[]): SpecFile {
    const imports: ImportDecl[] = [];
    const bases: BaseDecl[] = [];
    const adapters: AdapterDecl[] = [];
    for (const decl of (node.children as SpecFileCst).declaration ?? []) {
      const c = decl.children as DeclarationCst;
      for (const n of c.importDecl ?? []) push(imports, this.importDecl(n));
      for (const n of c.baseDecl ?? []) push(bases, this.baseDecl(n));
      for (const n of c.adapterDecl ?? []) push(adapters, this.adapterDecl(n));
    }
    return {
      kind: "SpecFile",
      span: this.source.span(0, this.source.text.length),
      imports,
      bases,
      adapters,
      comments: comments.map((t): Comment => ({ kind: "Comment", span: this.tokenSpan(t), text: t.image })),
    };
  }

  private importDecl(node: CstNode): ImportDecl | undefined {
    const path = first((node.children as ImportDeclCst).path);
    return path && { kind: "ImportDecl", span: this.nodeSpan(node), path: this.string(path) };
  }

  private baseDecl(node: CstNode): BaseDecl | undefined {
    const c = node.children as BaseDeclCst;
    const name = first(c.name);
    if (name === undefined) return undefined;
    const family = first(c.family);
    const from = first(c.from);
    return {
      kind: "BaseDecl",
      span: this.nodeSpan(node),
      name: this.identifier(name),
      ...(family && { family: this.identifier(family) }),
      ...(from && { from: this.string(from) }),
      properties: c.baseBlock?.[0] === undefined ? [] : this.withOptions(c.baseBlock[0].children as BaseBlockCst),
    };
  }

  private adapterDecl(node: CstNode): AdapterDecl | undefined {
    const c = node.children as AdapterDeclCst;
    const name = first(c.name);
    if (name === undefined) return undefined;
    const on = first(c.on);
    const parent = first(c.extends);
    const body: AdapterStatement[] = [];
    for (const statement of c.adapterStatement ?? []) push(body, this.adapterStatement(statement));
    return {
      kind: "AdapterDecl",
      span: this.nodeSpan(node),
      name: this.identifier(name),
      ...(on && { on: this.identifier(on) }),
      ...(parent && { extends: this.identifier(parent) }),
      body,
    };
  }

  private adapterStatement(node: CstNode): AdapterStatement | undefined {
    const c = node.children as AdapterStatementCst;
    const [experts] = c.expertsStmt ?? [];
    if (experts) return this.expertsStmt(experts);
    const [override] = c.layerOverride ?? [];
    if (override) return this.layerOverride(override);
    const [router] = c.routerDecl ?? [];
    if (router) return this.routerDecl(router);
    const [property] = c.property ?? [];
    return property && this.property(property);
  }

  private expertsStmt(node: CstNode): ExpertsStmt | undefined {
    const c = node.children as ExpertsStmtCst;
    const patterns: ModulePattern[] = [];
    for (const pattern of c.modulePattern ?? []) push(patterns, this.modulePattern(pattern));
    if (patterns.length === 0) return undefined;
    return {
      kind: "ExpertsStmt",
      span: this.nodeSpan(node),
      patterns,
      off: first(c.Kw_off) !== undefined,
      properties: this.propertyBlock(c.propertyBlock),
    };
  }

  private modulePattern(node: CstNode): ModulePattern | undefined {
    const c = node.children as ModulePatternCst;
    const name = first(c.name);
    return (
      name && { kind: "ModulePattern", span: this.nodeSpan(node), name: name.image, wildcard: first(c.Star) !== undefined }
    );
  }

  private layerOverride(node: CstNode): LayerOverride | undefined {
    const c = node.children as LayerOverrideCst;
    const keyword = first(c.keyword);
    if (keyword === undefined) return undefined;
    if (keyword.image !== "layers" && keyword.image !== "layer") {
      this.report("MIL006", `expected "layers" after "at", found "${keyword.image}"`, this.tokenSpan(keyword));
    }
    const body: ExpertsStmt[] = [];
    for (const statement of c.expertsStmt ?? []) push(body, this.expertsStmt(statement));
    return { kind: "LayerOverride", span: this.nodeSpan(node), layers: this.values(c.value), body };
  }

  private routerDecl(node: CstNode): RouterDecl {
    const c = node.children as RouterDeclCst;
    let select: SelectClause | undefined;
    for (const clause of c.selectClause ?? []) {
      const parsed = this.selectClause(clause);
      if (parsed && select) {
        this.report("MIL007", "a router takes one select rule; remove one of them", parsed.span, {
          hint: `the first is at ${select.span.start.line}:${select.span.start.column}`,
        });
      }
      select ??= parsed;
    }
    return {
      kind: "RouterDecl",
      span: this.nodeSpan(node),
      off: first(c.Kw_off) !== undefined,
      properties: this.withOptions(c),
      ...(select && { select }),
    };
  }

  /** Properties of a block where a property may carry an options block (a router's, a base's). */
  private withOptions(c: { property?: CstNode[]; propertyBlock?: CstNode[] }): Property[] {
    const properties: Property[] = [];
    const blocks = [...(c.propertyBlock ?? [])];
    for (const property of c.property ?? []) {
      const parsed = this.property(property);
      if (!parsed) continue;
      // An options block belongs to the property right before it.
      const next = (c.property ?? []).find((p) => (p.location?.startOffset ?? 0) > (property.location?.startOffset ?? 0));
      const at = blocks.findIndex((b) => (b.location?.startOffset ?? 0) > (property.location?.startOffset ?? 0) && (next === undefined || (b.location?.startOffset ?? 0) < (next.location?.startOffset ?? 0)));
      if (at < 0) {
        properties.push(parsed);
        continue;
      }
      const [block] = blocks.splice(at, 1);
      const span = this.nodeSpan(block!);
      properties.push({ ...parsed, span: { ...parsed.span, end: span.end }, options: this.propertyBlock([block!]) });
    }
    return properties;
  }

  private selectClause(node: CstNode): SelectClause | undefined {
    const c = node.children as SelectClauseCst;
    const rule = first(c.rule);
    if (rule === undefined) return undefined;
    const argument = first(c.argument);
    const modifier = first(c.modifier);
    return {
      kind: "SelectClause",
      span: this.nodeSpan(node),
      rule: this.identifier(rule),
      ...(argument && { argument: this.number(argument) }),
      ...(modifier && { modifier: this.identifier(modifier) }),
    };
  }

  private propertyBlock(nodes: CstNode[] | undefined): Property[] {
    const properties: Property[] = [];
    for (const block of nodes ?? []) {
      for (const property of (block.children as PropertyBlockCst).property ?? []) push(properties, this.property(property));
    }
    return properties;
  }

  private property(node: CstNode): Property | undefined {
    const c = node.children as PropertyCst;
    const key = first(c.key);
    return key && { kind: "Property", span: this.nodeSpan(node), key: this.identifier(key), values: this.values(c.value) };
  }

  private values(nodes: CstNode[] | undefined): Value[] {
    const values: Value[] = [];
    for (const node of nodes ?? []) push(values, this.value(node));
    return values;
  }

  private value(node: CstNode): Value | undefined {
    const c = node.children as ValueCst;
    const number = first(c.number);
    if (number) {
      const from = this.number(number);
      const end = first(c.rangeEnd);
      return end ? { kind: "Range", span: this.nodeSpan(node), from, to: this.number(end) } : from;
    }
    const string = first(c.string);
    if (string) return this.string(string);
    const boolean = first(c.boolean);
    if (boolean) return { kind: "Boolean", span: this.tokenSpan(boolean), value: boolean.image === "true" };
    const ident = first(c.ident);
    return ident && { kind: "Ident", span: this.tokenSpan(ident), name: ident.image };
  }

  private identifier(token: IToken): Identifier {
    return { kind: "Identifier", span: this.tokenSpan(token), name: token.image };
  }

  private number(token: IToken): NumberLiteral {
    return {
      kind: "Number",
      span: this.tokenSpan(token),
      value: Number(token.image),
      text: token.image,
      integer: /^-?\d+$/.test(token.image),
    };
  }

  /** Unescapes a string token; unknown escapes are reported here, the one place strings are read. */
  private string(token: IToken): StringLiteral {
    const raw = token.image.slice(1, token.tokenType === UnterminatedString ? undefined : -1);
    const { value, badEscapes } = unescapeString(raw);
    for (const at of badEscapes) {
      const start = token.startOffset + 1 + at;
      this.report("MIL005", `unknown escape "${raw.slice(at, at + 2)}" in string`, this.source.span(start, start + 2), {
        hint: 'the escapes are \\" \\\\ and \\n',
      });
    }
    return { kind: "String", span: this.tokenSpan(token), value };
  }

  private tokenSpan(token: IToken): Span {
    return this.source.span(token.startOffset, token.startOffset + token.image.length);
  }

  /** From the node's first real token to the end of its last. */
  private nodeSpan(node: CstNode): Span {
    let start = Infinity;
    let end = -Infinity;
    const visit = (n: CstNode): void => {
      for (const elements of Object.values(n.children)) {
        for (const element of elements) {
          if (!isToken(element)) visit(element);
          else if (isReal(element)) {
            start = Math.min(start, element.startOffset);
            end = Math.max(end, element.startOffset + element.image.length);
          }
        }
      }
    };
    visit(node);
    return this.source.span(start, end);
  }

  private report(code: Diagnostic["code"], message: string, span: Span, extra: { hint?: string } = {}): void {
    this.diagnostics.push({ code, severity: "error", message, span, ...extra });
  }
}

function push<T>(into: T[], item: T | undefined): void {
  if (item !== undefined) into.push(item);
}
