// `milora/pictures`: milora's pictures as plain SVG strings, made without a browser. A compiled
// package's route() result (one `{ layer, gates }` per layer) or the engine's and server's routing
// (`{ layer, position?, experts }`) draws as it is: `routingSvg([{ title: "bob", routing }])`.
export { MODULE_LABELS, cellFill, isTokenRouting, moduleUseSvg, routingSvg, type ModuleUsePanel, type RoutingDecision, type RoutingPanel } from "./heatmap.ts";
export { SERIES_COLOURS, barChartSvg, lineChartSvg, type BarChart, type LineChart, type LineSeries } from "./charts.ts";
