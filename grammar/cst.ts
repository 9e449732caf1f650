// The shapes of the CST children that parser.ts builds, one interface per rule, keyed by label
// (or token name). Every field is optional: after error recovery any child may be missing.
import type { CstNode, IToken } from "chevrotain";

export interface SpecFileCst {
  declaration?: CstNode[];
}

export interface DeclarationCst {
  importDecl?: CstNode[];
  baseDecl?: CstNode[];
  adapterDecl?: CstNode[];
}

export interface ImportDeclCst {
  path?: IToken[];
}

export interface BaseDeclCst {
  name?: IToken[];
  family?: IToken[];
  from?: IToken[];
  baseBlock?: CstNode[];
}

export interface BaseBlockCst {
  property?: CstNode[];
  /** Options blocks, each following one of the properties. */
  propertyBlock?: CstNode[];
}

export interface AdapterDeclCst {
  name?: IToken[];
  on?: IToken[];
  extends?: IToken[];
  adapterStatement?: CstNode[];
}

export interface AdapterStatementCst {
  expertsStmt?: CstNode[];
  layerOverride?: CstNode[];
  routerDecl?: CstNode[];
  property?: CstNode[];
}

export interface ExpertsStmtCst {
  modulePattern?: CstNode[];
  Kw_off?: IToken[];
  propertyBlock?: CstNode[];
}

export interface ModulePatternCst {
  name?: IToken[];
  Star?: IToken[];
}

export interface LayerOverrideCst {
  keyword?: IToken[];
  value?: CstNode[];
  expertsStmt?: CstNode[];
}

export interface RouterDeclCst {
  Kw_off?: IToken[];
  selectClause?: CstNode[];
  property?: CstNode[];
  /** Options blocks, each following one of the properties. */
  propertyBlock?: CstNode[];
}

export interface SelectClauseCst {
  rule?: IToken[];
  argument?: IToken[];
  modifier?: IToken[];
}

export interface PropertyBlockCst {
  property?: CstNode[];
}

export interface PropertyCst {
  key?: IToken[];
  value?: CstNode[];
}

export interface ValueCst {
  number?: IToken[];
  rangeEnd?: IToken[];
  string?: IToken[];
  boolean?: IToken[];
  ident?: IToken[];
}
