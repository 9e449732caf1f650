// `adapter` declarations -> Adapter. Statements apply in order onto a grid of LoRA options per
// (layer, module); a variant starts from its parent's resolved grid, layers and router.
import type { AdapterDecl, BaseDecl, ExpertsStmt, LayerOverride, Property, RouterDecl, Span } from "../grammar/ast.ts";
import { applyRouter, type Routing } from "./check-router.ts";
import { LORA_DEFAULTS, ROUTER_DEFAULTS } from "./defaults.ts";
import { allLayers, layerList } from "./layers.ts";
import { MAX_RANK, MAX_STACKED_RANK } from "./limits.ts";
import {
  EXPERT_MODULES,
  FFN_MODULES,
  storedRank,
  type Adapter,
  type BaseModel,
  type ExpertModule,
  type ExpertSlot,
} from "./model.ts";
import { moduleShape } from "./families.ts";
import { modulesOfPattern, PATTERN_SPELLINGS } from "./modules.ts";
import type { Declared, Scope } from "./resolve.ts";
import type { Reporter } from "./reporter.ts";
import { didYouMean } from "./suggest.ts";
import { booleanValue, knownProperties, numberValue } from "./values.ts";

/** One module in one layer while statements are applied: on or off, and the options it would have. */
interface Cell {
  enabled: boolean;
  rank: number;
  alpha: number;
  dropout: number;
  rslora: boolean;
  dora: boolean;
}

/** An adapter part-way through (or at the end of) its statements. */
interface AdapterState {
  readonly base: BaseModel;
  /** [layer][index in EXPERT_MODULES]. */
  readonly grid: Cell[][];
  layers: number[];
  routing: Routing;
}

type LoraOptionSet = Partial<Omit<Cell, "enabled">>;
const EXPERT_KEYS = ["rank", "alpha", "dropout", "rslora", "dora"] as const;

/** Resolves adapters once each, in any order: a variant pulls in its parent first. */
export class AdapterChecker {
  private readonly done = new Map<AdapterDecl, AdapterState | undefined>();
  private readonly inProgress: string[] = [];
  private readonly inProgressDecls = new Set<AdapterDecl>();

  constructor(
    private readonly scopes: ReadonlyMap<Declared<AdapterDecl>["file"], Scope>,
    private readonly bases: ReadonlyMap<BaseDecl, BaseModel | undefined>,
    private readonly r: Reporter,
  ) {}

  /** The checked adapter, or undefined when it (or what it builds on) has errors. */
  check(entry: Declared<AdapterDecl>): Adapter | undefined {
    const state = this.resolve(entry);
    return state === undefined ? undefined : toAdapter(entry.decl, state);
  }

  private resolve(entry: Declared<AdapterDecl>): AdapterState | undefined {
    const { decl } = entry;
    if (this.done.has(decl)) return this.done.get(decl);
    this.inProgress.push(decl.name.name);
    this.inProgressDecls.add(decl);
    const errorsBefore = this.r.errorCount;
    // a declaration with a syntax error was only partly recovered: checking it would report noise
    let state: AdapterState | undefined;
    if (!entry.file.broken.has(decl)) {
      const start = this.startState(entry);
      if (start === undefined) this.checkStatementsAlone(decl);
      else state = this.applyBody(decl, start);
    }
    this.inProgress.pop();
    this.inProgressDecls.delete(decl);
    const result = this.r.errorCount > errorsBefore ? undefined : state;
    this.done.set(decl, result);
    return result;
  }

  /** The state before the adapter's own statements: the parent's, or an empty grid on the named base. */
  private startState({ decl, file }: Declared<AdapterDecl>): AdapterState | undefined {
    const scope = this.scopes.get(file)!;
    const name = decl.name.name;
    if (decl.extends !== undefined) {
      const parentName = decl.extends.name;
      const parent = scope.adapters.get(parentName);
      if (parent === undefined) {
        this.r.report(
          "MIL108",
          decl.extends.span,
          `adapter \`${name}\` extends undefined adapter \`${parentName}\``,
          didYouMean(
            parentName,
            [...scope.adapters.keys()].filter((n) => n !== name),
          ),
        );
        return undefined;
      }
      if (this.inProgressDecls.has(parent.decl)) {
        const cycle = [...this.inProgress.slice(this.inProgress.indexOf(parentName)), parentName];
        this.r.report("MIL109", decl.extends.span, `adapters extend each other in a cycle: ${cycle.join(" -> ")}`);
        return undefined;
      }
      // a broken parent has reported its own errors; the variant stays silent
      const parentState = this.resolve(parent);
      return parentState && cloneState(parentState);
    }
    if (decl.on === undefined) return undefined; // the parser has reported the missing `on`
    const baseName = decl.on.name;
    const base = scope.bases.get(baseName);
    if (base === undefined) {
      this.r.report(
        "MIL107",
        decl.on.span,
        `adapter \`${name}\` is on undefined base \`${baseName}\``,
        didYouMean(baseName, [...scope.bases.keys()]),
      );
      return undefined;
    }
    const model = this.bases.get(base.decl);
    if (model === undefined) return undefined;
    const grid = allLayers(model).map(() => EXPERT_MODULES.map(() => ({ enabled: false, ...LORA_DEFAULTS })));
    return { base: model, grid, layers: allLayers(model), routing: { router: ROUTER_DEFAULTS } };
  }

  private applyBody(decl: AdapterDecl, state: AdapterState): AdapterState {
    const errorsBefore = this.r.errorCount;
    const props = decl.body.filter((s): s is Property => s.kind === "Property");
    for (const prop of knownProperties(props, ["layers"], "adapter", this.r)) {
      state.layers = layerList(prop.values, state.base, this.r) ?? state.layers;
    }
    const wideLines: { stmt: ExpertsStmt; writes: Set<string> }[] = [];
    const overrides: { stmt: LayerOverride; layers: number[] }[] = [];
    let routerBlock: RouterDecl | undefined;
    for (const stmt of decl.body) {
      if (stmt.kind === "ExpertsStmt") {
        const writes = this.applyExperts(stmt, allLayers(state.base), state);
        if (writes !== undefined) wideLines.push({ stmt, writes });
      } else if (stmt.kind === "LayerOverride") {
        const layers = layerList(stmt.layers, state.base, this.r);
        if (layers === undefined) continue;
        overrides.push({ stmt, layers });
        for (const line of stmt.body) this.applyExperts(line, layers, state);
      } else if (stmt.kind === "RouterDecl") {
        if (routerBlock !== undefined) {
          this.r.report(
            "MIL105",
            stmt.span,
            `adapter \`${decl.name.name}\` has a second router block (first at line ${routerBlock.span.start.line})`,
            "merge them into one",
          );
          continue;
        }
        routerBlock = stmt;
        state.routing = applyRouter(stmt, state.routing, this.r);
      }
    }
    this.warnOverridden(wideLines);
    this.warnUnusedOverrides(overrides, state.layers);
    // counting experts after a broken line would only repeat its error in other words
    if (this.r.errorCount === errorsBefore) this.checkExpertCounts(decl, state, routerBlock);
    return state;
  }

  /**
   * Applies one `experts` line to the given layers. Returns what it wrote (`module:field`), for spotting
   * lines that later lines override entirely; undefined when the line has errors.
   */
  private applyExperts(stmt: ExpertsStmt, layers: readonly number[], state: AdapterState): Set<string> | undefined {
    const read = this.readExperts(stmt);
    if (read === undefined) return undefined;
    const { modules, options } = read;
    for (const layer of layers) {
      for (const module of modules) {
        const cell = state.grid[layer]![EXPERT_MODULES.indexOf(module)]!;
        Object.assign(cell, options, { enabled: !stmt.off });
      }
    }
    const fields = ["enabled", ...Object.keys(options)];
    return new Set([...modules].flatMap((m) => fields.map((f) => `${m}:${f}`)));
  }

  /** The modules and options of an `experts` line; undefined when it has errors (reported). */
  private readExperts(stmt: ExpertsStmt): { modules: Set<ExpertModule>; options: LoraOptionSet } | undefined {
    const errorsBefore = this.r.errorCount;
    const modules = new Set<ExpertModule>();
    for (const pattern of stmt.patterns) {
      const found = modulesOfPattern(pattern.name, pattern.wildcard);
      if (found !== undefined) {
        for (const m of found) modules.add(m);
        continue;
      }
      const written = pattern.wildcard ? `${pattern.name}.*` : pattern.name;
      const isModule = modulesOfPattern(pattern.name, false) !== undefined;
      this.r.report(
        "MIL102",
        pattern.span,
        isModule ? `\`${pattern.name}\` is a module, not a group` : `unknown expert module \`${written}\``,
        isModule ? `write \`${pattern.name}\`` : didYouMean(written, PATTERN_SPELLINGS),
      );
    }
    const options = this.loraOptions(stmt.properties);
    return this.r.errorCount > errorsBefore ? undefined : { modules, options };
  }

  /** Without a base or parent to build on, the statements' own errors (names, values) are still worth reporting. */
  private checkStatementsAlone(decl: AdapterDecl): void {
    for (const stmt of decl.body) {
      if (stmt.kind === "ExpertsStmt") this.readExperts(stmt);
      else if (stmt.kind === "LayerOverride") stmt.body.forEach((line) => this.readExperts(line));
      else if (stmt.kind === "RouterDecl") applyRouter(stmt, undefined, this.r);
      else knownProperties([stmt], ["layers"], "adapter", this.r);
    }
  }

  private loraOptions(props: readonly Property[]): LoraOptionSet {
    const options: LoraOptionSet = {};
    for (const prop of knownProperties(props, EXPERT_KEYS, "experts", this.r)) {
      if (prop.key.name === "rslora" || prop.key.name === "dora") {
        const value = booleanValue(prop, this.r);
        if (value !== undefined) options[prop.key.name] = value;
        continue;
      }
      const n = numberValue(prop, this.r);
      if (n === undefined) continue;
      if (prop.key.name === "rank") {
        if (!n.integer || n.value < 1) this.r.report("MIL202", n.span, `rank must be a positive integer, got ${n.text}`);
        else if (n.value > MAX_RANK) this.r.report("MIL211", n.span, `rank ${n.text} is above milora's limit of ${MAX_RANK}`);
        else options.rank = n.value;
      } else if (prop.key.name === "alpha") {
        if (n.value > 0) options.alpha = n.value;
        else this.r.report("MIL203", n.span, `alpha must be greater than 0, got ${n.text}`);
      } else {
        if (n.value >= 0 && n.value < 1) options.dropout = n.value;
        else this.r.report("MIL204", n.span, `dropout must be at least 0 and below 1, got ${n.text}`);
      }
    }
    return options;
  }

  private warnOverridden(lines: readonly { stmt: ExpertsStmt; writes: Set<string> }[]): void {
    // from the last line up, so what later lines write is one growing set (linear in the lines)
    const later = new Set<string>();
    lines.toReversed().forEach(({ stmt, writes }) => {
      const overridden = writes.size > 0 && [...writes].every((w) => later.has(w));
      for (const w of writes) later.add(w);
      if (overridden) {
        this.r.report(
          "MIL503",
          stmt.span,
          "this experts line has no effect: later lines override everything it sets",
          "remove it",
        );
      }
    });
  }

  private warnUnusedOverrides(
    overrides: readonly { stmt: LayerOverride; layers: number[] }[],
    used: readonly number[],
  ): void {
    for (const { stmt, layers } of overrides) {
      const usedSet = new Set(used);
      const unused = layers.filter((l) => !usedSet.has(l));
      if (unused.length === 0) continue;
      const first = stmt.layers[0]!;
      const last = stmt.layers[stmt.layers.length - 1]!;
      const span: Span = { file: first.span.file, start: first.span.start, end: last.span.end };
      this.r.report(
        "MIL504",
        span,
        `${unused.length === 1 ? "layer" : "layers"} ${compactLayers(unused)} ${unused.length === 1 ? "is" : "are"} not among the adapter's layers, so this override does nothing there`,
        "add them to the adapter's `layers` line, or drop them here",
      );
    }
  }

  /**
   * No experts at all is an error; so is a top_k larger than the experts some layer enables, and DoRA
   * on some experts only (PEFT's use_dora is one flag per adapter).
   */
  private checkExpertCounts(decl: AdapterDecl, state: AdapterState, routerBlock: RouterDecl | undefined): void {
    const enabled = (layer: number) => EXPERT_MODULES.filter((_, i) => state.grid[layer]![i]!.enabled);
    if (state.layers.every((l) => enabled(l).length === 0)) {
      this.r.report(
        "MIL210",
        decl.name.span,
        `adapter \`${decl.name.name}\` enables no experts in its layers`,
        "add a line such as `experts all { rank 8 }`",
      );
      return;
    }
    const cells = state.layers.flatMap((layer) => EXPERT_MODULES.flatMap((module, i) => (state.grid[layer]![i]!.enabled ? [{ layer, module, dora: state.grid[layer]![i]!.dora }] : [])));
    const withDora = cells.filter((c) => c.dora);
    const without = cells.find((c) => !c.dora);
    if (withDora.length > 0 && without !== undefined) {
      const first = withDora[0]!;
      this.r.report(
        "MIL216",
        decl.name.span,
        `adapter \`${decl.name.name}\` uses DoRA on some experts (layer ${first.layer} ${first.module}) and not on others (layer ${without.layer} ${without.module}); ` +
          "PEFT stores one use_dora per adapter",
        "write `dora true` on an `experts all` line, or make a separate adapter",
      );
    }
    if (state.routing.moe !== undefined) {
      this.checkMoe(decl, state, cells, routerBlock);
      return;
    }
    const selection = state.routing.router?.selection;
    if (selection?.rule !== "top_k") return;
    const short = state.layers.filter((l) => enabled(l).length < selection.k);
    const [layer] = short;
    if (layer === undefined) return;
    const on = enabled(layer);
    const at = routerBlock?.select?.argument?.span ?? decl.name.span;
    const others = short.length > 1 ? ` (and ${short.length - 1} more ${short.length === 2 ? "layer" : "layers"})` : "";
    this.r.report(
      "MIL401",
      at,
      `top_k ${selection.k} is larger than the ${on.length} ${on.length === 1 ? "expert" : "experts"} enabled in layer ${layer}${others}` +
        (on.length > 0 ? `: ${on.join(", ")}` : ""),
      `enable more modules there or lower top_k to ${Math.max(1, on.length)}`,
    );
  }

  /**
   * A per-token baseline's rules: top_k within its experts, a per_module rank that splits evenly into
   * them, a per_ffn adapter with an MLP module to put them in, no DoRA (its magnitude is per module, not
   * per expert), and a stacked rank the kernels take.
   */
  private checkMoe(decl: AdapterDecl, state: AdapterState, cells: readonly { layer: number; module: ExpertModule; dora: boolean }[], routerBlock: RouterDecl | undefined): void {
    const moe = state.routing.moe!;
    const at = routerBlock?.span ?? decl.name.span;
    const name = decl.name.name;
    if (moe.selection.rule === "top_k" && moe.selection.k > moe.experts) {
      this.r.report("MIL401", routerBlock?.select?.argument?.span ?? at, `top_k ${moe.selection.k} is larger than the router's ${moe.experts} experts (num_experts)`, `lower top_k to at most ${moe.experts}, or raise num_experts`);
    }
    const dora = cells.find((c) => c.dora);
    if (dora !== undefined) {
      this.r.report("MIL217", at, `adapter \`${name}\` routes tokens ${moe.placement} but uses DoRA (layer ${dora.layer} ${dora.module}): a DoRA magnitude belongs to a whole module, not to one of its experts`, "drop `dora true`, or use `placement per_layer` (MiDoRA)");
    }
    const rankOf = (c: { layer: number; module: ExpertModule }) => state.grid[c.layer]![EXPERT_MODULES.indexOf(c.module)]!.rank;
    if (moe.placement === "per_module") {
      const odd = cells.find((c) => rankOf(c) % moe.experts !== 0);
      if (odd !== undefined) {
        this.r.report("MIL218", at, `layer ${odd.layer} ${odd.module} has rank ${rankOf(odd)}, which does not split into ${moe.experts} experts of equal rank`, `use a rank that is a multiple of ${moe.experts} (MOELoRA: rank 32, 8 experts of rank 4)`);
      }
    } else {
      if (!cells.some((c) => FFN_MODULES.includes(c.module))) {
        this.r.report("MIL219", at, `adapter \`${name}\` routes per_ffn but enables none of ${FFN_MODULES.join(", ")}: its experts live in the MLP`, "add a line such as `experts mlp.* { rank 8 }`");
      }
      const wide = cells.find((c) => storedRank({ moe }, { module: c.module, rank: rankOf(c) }) > MAX_STACKED_RANK);
      if (wide !== undefined) {
        this.r.report("MIL211", at, `layer ${wide.layer} ${wide.module}: ${moe.experts} experts of rank ${rankOf(wide)} stack to rank ${moe.experts * rankOf(wide)}, above the ${MAX_STACKED_RANK} the LoRA kernels take`, "lower the rank or num_experts");
      }
    }
  }
}

function cloneState(s: AdapterState): AdapterState {
  return {
    base: s.base,
    grid: s.grid.map((row) => row.map((c) => ({ ...c }))),
    layers: [...s.layers],
    routing: s.routing,
  };
}

/** `0..3, 8`: ascending layers with runs collapsed. */
function compactLayers(layers: readonly number[]): string {
  const parts: string[] = [];
  for (let i = 0; i < layers.length;) {
    let j = i;
    while (j + 1 < layers.length && layers[j + 1] === layers[j]! + 1) j++;
    parts.push(j > i ? `${layers[i]}..${layers[j]}` : `${layers[i]}`);
    i = j + 1;
  }
  return parts.join(", ");
}

function toAdapter(decl: AdapterDecl, state: AdapterState): Adapter {
  const experts: ExpertSlot[] = [];
  for (const layer of state.layers) {
    EXPERT_MODULES.forEach((module, i) => {
      const { enabled, dora, ...options } = state.grid[layer]![i]!;
      if (!enabled) return;
      const scaling = options.rslora ? options.alpha / Math.sqrt(options.rank) : options.alpha / options.rank;
      experts.push({ layer, module, ...options, ...(dora ? { dora } : {}), scaling, ...moduleShape(state.base, module) });
    });
  }
  return {
    name: decl.name.name,
    base: state.base,
    ...(decl.extends === undefined ? {} : { extends: decl.extends.name }),
    layers: state.layers,
    experts,
    ...(state.routing.router === undefined ? {} : { router: state.routing.router }),
    ...(state.routing.moe === undefined ? {} : { moe: state.routing.moe }),
    span: decl.span,
  };
}
