// The page of `milora serve`: polls /ui/state once a second and draws it with uPlot (served by the
// server from node_modules). Routing heatmaps are SVG from the server (/ui/routing/ID.svg,
// /ui/use.svg), fetched once per request and inlined so that their cells' data attributes stay readable.
// Plain browser JavaScript, no build step; text from the server goes in through textContent only.
"use strict";

const COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9"];
const POLL_MS = 1000;
const charts = {};
window.miloraCharts = charts;
window.miloraState = null;

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits));

function makeChart(id, series, options = {}) {
  const el = $(id);
  const width = Math.max(320, el.clientWidth || 460);
  const opts = {
    width,
    height: 200,
    legend: { show: true },
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true }, y: { range: (_u, min, max) => [Math.min(0, min), Math.max(1, max * 1.1)] } },
    axes: [{}, { size: 56 }],
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        stroke: COLOURS[i % COLOURS.length],
        width: 2,
        dash: i === 1 ? [6, 3] : undefined,
        points: { show: options.points ?? false, size: 6, fill: COLOURS[i % COLOURS.length] },
        ...(options.points ? { paths: () => null } : {}),
        value: (_u, v) => fmt(v, options.digits ?? 1),
      })),
    ],
  };
  const chart = new uPlot(opts, [[], ...series.map(() => [])], el);
  charts[el.dataset.chart] = chart;
  return chart;
}

function setChart(name, data) {
  const chart = charts[name];
  chart.setData(data);
  const el = chart.root.parentElement;
  el.dataset.points = String(data[0].length);
  el.dataset.last = JSON.stringify(data.slice(1).map((s) => (s.length ? s[s.length - 1] : null)));
}

function setList(dl, pairs) {
  dl.replaceChildren(
    ...pairs.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      dd.dataset.key = k;
      return [dt, dd];
    }),
  );
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

async function fetchText(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.text();
}

const shownRequests = new Set();
let useDecisions = -1;

async function drawRequests(state) {
  const box = $("requests");
  const ids = new Set(state.requests.map((r) => r.id));
  if (state.requests.length > 0) box.querySelector(".empty")?.remove();
  for (const article of [...box.querySelectorAll(".request")]) {
    if (!ids.has(Number(article.dataset.request))) {
      shownRequests.delete(Number(article.dataset.request));
      article.remove();
    }
  }
  // Oldest of the new first, each put in front: the newest ends up first.
  for (const r of [...state.requests].reverse()) {
    if (shownRequests.has(r.id)) continue;
    shownRequests.add(r.id);
    const article = document.createElement("article");
    article.className = "request";
    article.dataset.request = String(r.id);
    article.dataset.tenant = r.tenant;
    article.dataset.completionTokens = String(r.completionTokens);
    article.dataset.routingKind = r.routingKind;
    const h = document.createElement("h3");
    h.textContent = `#${r.id} ${r.tenant}`;
    const p = document.createElement("p");
    p.textContent = `${r.promptTokens} prompt + ${r.completionTokens} tokens · ${r.finish} · TTFT ${fmt(r.ttftMs)} ms · TPOT ${fmt(r.tpotMs)} ms`;
    const picture = document.createElement("div");
    picture.className = "heatmap";
    article.append(h, p, picture);
    box.prepend(article);
    if (r.routingKind === "none") {
      picture.textContent = "no routing (base model or plain LoRA)";
      article.dataset.ready = "true";
    } else {
      fetchText(`/ui/routing/${r.id}.svg`)
        .then((svg) => {
          picture.innerHTML = svg; // the server's own SVG: every text in it is escaped
          article.dataset.ready = "true";
        })
        .catch(() => (picture.textContent = "routing no longer available"));
    }
  }
  const decisions = state.use.reduce((n, u) => n + u.decisions, 0);
  if (decisions !== useDecisions && decisions > 0) {
    useDecisions = decisions;
    const svg = await fetchText("/ui/use.svg");
    const use = $("module-use");
    use.innerHTML = svg;
    use.dataset.decisions = String(decisions);
  }
}

function draw(state) {
  window.miloraState = state;
  $("base-name").textContent = `· ${state.base.name}`;
  setList($("base"), [
    ["model", state.base.name],
    ["context", `${state.base.ctx} positions`],
    ["vocabulary", String(state.base.vocabSize)],
    ["tokenizer", state.base.tokenizer ? "yes" : "no (token ids only)"],
    ["up", `${Math.round((state.now - state.startedAt) / 1000)} s`],
  ]);
  const tokensBy = new Map(state.tenants.map((t) => [t.name, t.tokens]));
  const body = $("adapters").querySelector("tbody");
  body.replaceChildren(
    ...state.adapters.map((a) => {
      const tr = document.createElement("tr");
      tr.dataset.adapter = a.name;
      tr.dataset.resident = String(a.resident);
      tr.append(cell(a.name), cell(a.resident ? "yes" : "no"), cell(a.routing), cell(String(tokensBy.get(a.name) ?? 0)));
      return tr;
    }),
  );
  const { total, running, queued } = state.slots;
  const meter = $("slot-meter");
  meter.querySelector(".fill").style.width = `${(100 * running) / total}%`;
  meter.setAttribute("aria-valuemax", String(total));
  meter.setAttribute("aria-valuenow", String(running));
  $("slots-text").textContent = `${running} of ${total} in use · ${queued} queued`;
  setList($("totals"), [
    ["tokens", String(state.totals.generatedTokens)],
    ["steps", String(state.totals.steps)],
    ["tokens/s", fmt(state.totals.tokensPerSecond)],
    ["rejected", String(state.totals.rejected)],
  ]);
  const s = state.samples;
  setChart("throughput", [s.t, s.tokensPerSecond]);
  setChart("slots", [s.t, s.running, s.queued]);
  const l = state.latency;
  setChart("ttft", [l.t, l.ttftMs]);
  setChart("tpot", [l.t, l.tpotMs]);
  return drawRequests(state);
}

async function poll() {
  const status = $("status");
  try {
    const r = await fetch("/ui/state", { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error(`status ${r.status}`);
    await draw(await r.json());
    status.dataset.state = "live";
    status.textContent = `live · ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    status.dataset.state = "error";
    status.textContent = `no answer from the server (${e.message})`;
  }
  setTimeout(poll, POLL_MS);
}

window.addEventListener("DOMContentLoaded", () => {
  makeChart("chart-throughput", [{ label: "tokens/s" }]);
  makeChart("chart-slots", [{ label: "slots in use" }, { label: "queued" }], { digits: 0 });
  makeChart("chart-ttft", [{ label: "TTFT ms" }], { points: true });
  makeChart("chart-tpot", [{ label: "TPOT ms" }], { points: true, digits: 2 });
  poll();
});
