// easysft dashboard page: hash routes #/ (runs), #/run/<id>, #/compare/<id>,<id>...
// Text from run files is always inserted as text (never as HTML). Charts are uPlot (static/uPlot.iife.min.js).
"use strict";

const $view = document.getElementById("view");
let teardown = [];            // callbacks that stop the current view's timers and event streams

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

const q = encodeURIComponent;
function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  const abs = Math.abs(value);
  return abs !== 0 && (abs < 1e-3 || abs >= 1e5) ? value.toExponential(2) : value.toFixed(digits);
}
function fmtTime(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}
function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}
function badge(status) { return el("span", { class: `badge ${status}`, "data-status": status }, status); }

// ---------------------------------------------------------------------------------------------- curves
// Which curves a set of metrics.jsonl records holds: train keys, then every numeric eval_*/probe_* key.
const TRAIN_CURVES = [["lr", "learning rate"], ["tokens_per_s", "tokens / s"], ["grad_norm", "grad norm"]];
const SKIP_EVAL = new Set(["step", "epoch", "eval_num_tokens", "event"]);

function isTrain(r) { return typeof r.loss === "number" && r.event === undefined; }
function isEval(r) { return r.eval_loss !== undefined || Object.keys(r).some(k => k.startsWith("eval_") || k.startsWith("probe_")); }

function curveKeys(records) {
  const evalKeys = new Set();
  for (const r of records) {
    if (!isEval(r) || isTrain(r)) continue;
    for (const [k, v] of Object.entries(r)) {
      if (!SKIP_EVAL.has(k) && k !== "eval_loss" && (typeof v === "number" || v === null)) evalKeys.add(k);
    }
  }
  const charts = [{ key: "loss", title: "loss (train, eval)" }];
  if (evalKeys.has("eval_ppl")) charts.push({ key: "eval_ppl", title: "eval perplexity" });
  [...evalKeys].filter(k => k !== "eval_ppl").sort().forEach(k => charts.push({ key: k, title: k }));
  for (const [key, title] of TRAIN_CURVES) {
    if (records.some(r => isTrain(r) && typeof r[key] === "number")) charts.push({ key, title });
  }
  return charts;
}

// Points (step, value) of one named curve; "loss" is the training curve, "eval_loss" the eval one.
function points(records, key) {
  const out = [];
  const trainKey = key === "loss" || TRAIN_CURVES.some(c => c[0] === key);
  for (const r of records) {
    if (typeof r.step !== "number" || (trainKey ? !isTrain(r) : isTrain(r))) continue;
    if (typeof r[key] === "number") out.push([r.step, r[key]]);
  }
  return out;
}

// uPlot wants one shared x array: merge the steps of every series, null where a series has no point.
function align(seriesPoints) {
  const steps = [...new Set(seriesPoints.flatMap(ps => ps.map(p => p[0])))].sort((a, b) => a - b);
  const index = new Map(steps.map((s, i) => [s, i]));
  const columns = seriesPoints.map(ps => {
    const column = new Array(steps.length).fill(null);
    for (const [s, v] of ps) column[index.get(s)] = v;
    return column;
  });
  return [steps, ...columns];
}

function axisLabel(v) {
  if (v === null || v === undefined) return "";
  const abs = Math.abs(v);
  return abs !== 0 && (abs < 1e-2 || abs >= 1e5) ? v.toExponential(1) : String(+v.toPrecision(4));
}

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

class Chart {
  // One titled uPlot chart; update(data) keeps it in place. data-points / data-last-step expose what it draws.
  constructor(parent, title, seriesNames, key) {
    this.box = el("div", { class: "chart", "data-chart": key }, el("div", { class: "title" }, title));
    parent.append(this.box);
    this.seriesNames = seriesNames;
    this.logScale = key.endsWith("_ppl");
    this.plot = null;
  }
  update(data) {
    const n = data[0].length;
    this.box.setAttribute("data-points", String(data.slice(1).reduce((sum, col) => sum + col.filter(v => v !== null).length, 0)));
    this.box.setAttribute("data-last-step", n ? String(data[0][n - 1]) : "");
    if (this.plot) { this.plot.setData(data); return; }
    const width = Math.max(360, this.box.clientWidth - 14);
    const series = [{ label: "step" }, ...this.seriesNames.map((name, i) => ({
      label: name, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
      points: { show: (u, si) => u.data[si].filter(v => v !== null).length < 40 },
    }))];
    // perplexity spans orders of magnitude (e^loss): a log axis keeps the late, small changes visible
    const y = this.logScale ? { distr: 3 } : {};
    this.plot = new uPlot({ width, height: 220, series, scales: { x: { time: false }, y },
      axes: [{ label: "step" }, { size: 64, values: (u, splits) => splits.map(axisLabel) }], legend: { show: true } }, data, this.box);
  }
}

// Charts of one run, re-laid out when a new kind of curve appears (e.g. the first eval record).
class RunCharts {
  constructor(parent) { this.parent = parent; this.layout = ""; this.charts = {}; }
  update(records) {
    const keys = curveKeys(records);
    const layout = keys.map(k => k.key).join(",");
    if (layout !== this.layout) {
      this.parent.replaceChildren();
      this.charts = {};
      for (const k of keys) {
        const names = k.key === "loss" ? ["train loss", "eval loss"] : [k.key];
        this.charts[k.key] = new Chart(this.parent, k.title, names, k.key);
      }
      this.layout = layout;
    }
    for (const k of keys) {
      const series = k.key === "loss" ? [points(records, "loss"), points(records, "eval_loss")] : [points(records, k.key)];
      this.charts[k.key].update(align(series));
    }
  }
}

// ---------------------------------------------------------------------------------------------- runs list
async function showRuns() {
  const selected = new Set();
  const table = el("table", { id: "runs" });
  const compare = el("button", { class: "primary", id: "compare", disabled: true,
    onclick: () => { location.hash = "#/compare/" + [...selected].map(q).join(","); } }, "Compare selected");
  $view.replaceChildren(el("h1", {}, "Runs"), el("p", { class: "muted" }, "Every easysft output folder under the dashboard's folders; the list refreshes every 2 s."), table, compare);
  async function refresh() {
    const { runs } = await getJSON("/api/runs");
    const head = el("tr", {}, ["", "run", "status", "model", "data", "steps", "last loss", "best eval loss", "started", "wall time"].map(h => el("th", {}, h)));
    const rows = runs.map(r => el("tr", { "data-run": r.id },
      el("td", {}, el("input", { type: "checkbox", checked: selected.has(r.id) || null, onchange: e => {
        e.target.checked ? selected.add(r.id) : selected.delete(r.id);
        compare.disabled = selected.size < 2; } })),
      el("td", {}, el("a", { href: "#/run/" + q(r.id), title: r.path }, r.id.includes("/") ? r.id.split("/").slice(1).join("/") : r.name)),
      el("td", { title: r.error || "" }, badge(r.status)),
      el("td", {}, r.model || ""), el("td", {}, r.data || ""),
      el("td", { class: "num" }, `${fmt(r.steps_done)} / ${r.total_steps ? fmt(r.total_steps) : "?"}`),
      el("td", { class: "num" }, fmt(r.last_loss)),
      el("td", { class: "num" }, r.best_eval ? `${fmt(r.best_eval.value)} @${r.best_eval.step}` : ""),
      el("td", {}, fmtTime(r.started)), el("td", { class: "num" }, fmtDuration(r.wall_seconds))));
    table.replaceChildren(head, ...rows);
    if (!runs.length) table.append(el("tr", {}, el("td", { colspan: 10, class: "muted" }, "no runs yet")));
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);
  teardown.push(() => clearInterval(timer));
}

// ---------------------------------------------------------------------------------------------- one run
function kvTable(obj) {
  return el("table", { class: "kv" }, Object.keys(obj).sort().map(k =>
    el("tr", {}, el("td", {}, k), el("td", {}, typeof obj[k] === "object" && obj[k] !== null ? JSON.stringify(obj[k]) : fmt(obj[k], 6)))));
}

function summaryLine(s) {
  return [badge(s.status), ` step ${fmt(s.steps_done)} / ${s.total_steps ? fmt(s.total_steps) : "?"}`,
    s.last_loss !== null ? ` · loss ${fmt(s.last_loss)}` : "",
    s.best_eval ? ` · best eval loss ${fmt(s.best_eval.value)} (step ${s.best_eval.step})` : "",
    ` · ${s.model || ""}`, s.wall_seconds ? ` · ${fmtDuration(s.wall_seconds)}` : "",
    s.error ? el("div", { class: "error" }, s.error) : null];
}

async function showRun(id) {
  const detail = await getJSON("/api/run?id=" + q(id));
  const summary = el("div", { id: "summary" }, summaryLine(detail.summary));
  const charts = el("div", { class: "charts", id: "charts" });
  $view.replaceChildren(el("h1", {}, id), el("div", { class: "muted" }, detail.summary.path), summary,
    el("h2", {}, "Curves"), charts,
    el("h2", {}, "Chat"), chatPanel(id, detail.chat_models),
    el("h2", {}, "Eval predictions"), predictionsPanel(id, detail.prediction_steps),
    el("h2", {}, "Data report"), dataReport(detail.data_report),
    el("h2", {}, "Checkpoints"), checkpointsTable(detail.checkpoints),
    el("h2", {}, "Resolved config (train_config.json)"), detail.config && Object.keys(detail.config).length ? kvTable(detail.config) : el("p", { class: "muted" }, "no train_config.json"));
  const runCharts = new RunCharts(charts);
  let records = (await getJSON("/api/metrics?id=" + q(id))).records;
  runCharts.update(records);
  const source = new EventSource(`/api/events?id=${q(id)}&from=${records.length}`);
  source.addEventListener("metrics", e => {
    const msg = JSON.parse(e.data);
    records = records.slice(0, msg.from).concat(msg.records);
    runCharts.update(records);
  });
  source.addEventListener("reset", () => { records = []; });
  source.addEventListener("summary", e => summary.replaceChildren(...summaryLine(JSON.parse(e.data))));
  source.onopen = () => { document.getElementById("conn").textContent = "live"; };
  source.onerror = () => { document.getElementById("conn").textContent = "reconnecting..."; };
  teardown.push(() => { source.close(); document.getElementById("conn").textContent = ""; });
}

function checkpointsTable(list) {
  if (!list.length) return el("p", { class: "muted" }, "no checkpoints (train with --save_steps N)");
  return el("table", { id: "checkpoints" }, el("tr", {}, ["checkpoint", "complete", "reason", "size", "saved"].map(h => el("th", {}, h))),
    list.map(c => el("tr", {}, el("td", {}, c.name), el("td", {}, c.complete ? "yes" : "no (save interrupted)"),
      el("td", {}, c.reason || ""), el("td", { class: "num" }, `${(c.bytes / 1e6).toFixed(1)} MB`), el("td", {}, fmtTime(c.saved_at)))));
}

// ---------------------------------------------------------------------------------------------- data report
function histogram(title, hist) {
  if (!hist || !hist.counts || !hist.counts.length) return null;
  const w = 300, h = 110, pad = 18, max = Math.max(...hist.counts), bw = (w - 2 * pad) / hist.counts.length;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h + 16);
  hist.counts.forEach((c, i) => {
    const bar = document.createElementNS(ns, "rect");
    const bh = max ? (c / max) * (h - 10) : 0;
    bar.setAttribute("x", pad + i * bw + 1); bar.setAttribute("y", h - bh); bar.setAttribute("width", Math.max(1, bw - 2));
    bar.setAttribute("height", bh); bar.setAttribute("fill", "#60a5fa");
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${hist.edges[i]}-${hist.edges[i + 1] - 1} tokens: ${c}`;
    bar.append(tip); svg.append(bar);
  });
  for (const [x, text, anchor] of [[pad, hist.edges[0], "start"], [w - pad, hist.edges[hist.edges.length - 1], "end"]]) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x); label.setAttribute("y", h + 13); label.setAttribute("font-size", "11");
    label.setAttribute("text-anchor", anchor); label.textContent = String(text); svg.append(label);
  }
  return el("div", { class: "hist" }, el("div", { class: "muted" }, title), svg);
}

function splitTables(name, s) {
  if (!s) return null;
  const skipped = Object.entries(s.skipped || {}).filter(([, n]) => n);
  return el("div", { "data-split": name },
    el("h3", {}, `${name}: ${fmt(s.kept)} samples kept of ${fmt(s.rows)} rows`),
    el("table", {}, [["skipped", s.skipped_total], ["truncated prompts", s.truncated_prompts], ["truncated answers", s.truncated_answers],
      ["tokens", s.num_tokens], ["supervised tokens", s.num_supervised_tokens], ["supervised share", s.supervised_share]]
      .map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, fmt(v))))),
    skipped.length ? el("table", { class: "skips" }, el("tr", {}, el("th", {}, "skipped because"), el("th", { class: "num" }, "rows"), el("th", {}, "first offending row")),
      skipped.map(([reason, n]) => el("tr", {}, el("td", {}, reason), el("td", { class: "num" }, fmt(n)), el("td", {}, (s.first_skipped || {})[reason] || "")))) : null,
    el("table", { class: "lengths" }, el("tr", {}, ["tokens", "p50", "p90", "p99", "max"].map(h => el("th", { class: h === "tokens" ? "" : "num" }, h))),
      ["prompt_tokens", "answer_tokens", "sample_tokens"].filter(k => s[k]).map(k => el("tr", {}, el("td", {}, k.replace("_tokens", "")),
        ["p50", "p90", "p99", "max"].map(p => el("td", { class: "num" }, fmt(s[k][p])))))),
    el("div", {}, ["prompt", "answer", "sample"].map(k => histogram(`${k} tokens${k === "sample" ? " (after truncation)" : " (before truncation)"}`, s[`${k}_tokens_hist`]))));
}

function dataReport(report) {
  if (!report) return el("p", { class: "muted" }, "no data_report.json");
  return el("div", { id: "data-report" },
    el("p", {}, `template ${typeof report.template === "string" ? report.template : JSON.stringify(report.template)} · max_prompt_len ${report.max_prompt_len} · max_ans_len ${report.max_ans_len}`),
    splitTables("train", report.train), report.eval && report.eval.rows ? splitTables("eval", report.eval) : null,
    report.sources && report.sources.length > 1 ? el("table", {}, el("tr", {}, ["source", "layout", "eval from", "train kept", "eval kept"].map(h => el("th", {}, h))),
      report.sources.map(s => el("tr", {}, el("td", {}, s.name), el("td", {}, s.layout), el("td", {}, s.eval_origin), el("td", { class: "num" }, fmt(s.train.kept)), el("td", { class: "num" }, fmt(s.eval.kept))))) : null);
}

// ---------------------------------------------------------------------------------------------- predictions
function predictionsPanel(id, steps) {
  if (!steps.length) return el("p", { class: "muted" }, "no eval_predictions/ in this run");
  const body = el("div", {});
  const pick = el("select", { id: "prediction-step", onchange: () => load(pick.value) }, steps.map(s => el("option", { value: s }, `step ${s}`)));
  pick.value = String(steps[steps.length - 1]);
  async function load(step) {
    const data = await getJSON(`/api/predictions?id=${q(id)}&step=${step}`);
    const norm = t => t.trim().replace(/\s+/g, " ");
    body.replaceChildren(el("p", { class: "muted" }, `${data.total} rows${data.total > data.rows.length ? `, first ${data.rows.length} shown` : ""}`),
      el("table", { class: "preds", id: "predictions" }, el("tr", {}, ["#", "prompt", "reference", "prediction"].map(h => el("th", {}, h))),
        data.rows.map((r, i) => el("tr", { class: norm(r.prediction) === norm(r.reference) ? "match" : "miss" },
          el("td", { class: "num" }, i + 1), el("td", {}, r.prompt), el("td", {}, r.reference), el("td", { class: "pred" }, r.prediction)))));
  }
  load(pick.value);
  return el("div", {}, el("label", {}, "eval step ", pick), body);
}

// ---------------------------------------------------------------------------------------------- chat
function parseEvents(buffer, onEvent) {
  // Split a text/event-stream buffer into complete events; returns the unfinished rest.
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
    let name = "message", data = "";
    for (const line of frame.split("\n")) {
      if (line.startsWith("event: ")) name = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (data) onEvent(name, JSON.parse(data));
  }
  return buffer;
}

function chatPanel(id, models) {
  if (!models.length) return el("p", { class: "muted" }, "nothing to chat with yet: no final model and no complete checkpoint");
  const history = [];
  const transcript = el("div", { class: "transcript", id: "transcript" });
  const pick = el("select", { id: "chat-model", onchange: () => { history.length = 0; transcript.replaceChildren(); } },
    models.map(m => el("option", { value: m.key }, m.label)));
  const input = el("input", { id: "chat-input", placeholder: "Type a message and press Enter" });
  const send = el("button", { class: "primary", id: "chat-send" }, "Send");
  const fields = { system: el("input", { id: "chat-system", placeholder: "saved one" }),
    max_new_tokens: el("input", { type: "number", min: 1, placeholder: "saved" }),
    do_sample: el("select", {}, el("option", { value: "" }, "saved"), el("option", { value: "true" }, "true"), el("option", { value: "false" }, "false")),
    temperature: el("input", { type: "number", step: "0.05", placeholder: "saved" }),
    top_p: el("input", { type: "number", step: "0.05", placeholder: "saved" }),
    top_k: el("input", { type: "number", placeholder: "saved" }),
    repetition_penalty: el("input", { type: "number", step: "0.05", placeholder: "saved" }),
    seed: el("input", { type: "number", value: 1234 }) };
  function generation() {
    const out = {};
    for (const k of ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"]) if (fields[k].value !== "") out[k] = Number(fields[k].value);
    if (fields.do_sample.value) out.do_sample = fields.do_sample.value === "true";
    return out;
  }
  async function ask() {
    const text = input.value.trim();
    if (!text) return;
    input.value = ""; send.disabled = true;
    const answer = el("span", { class: "answer" });
    const turn = el("div", { class: "turn assistant" }, el("b", {}, "assistant: "), answer);
    transcript.append(el("div", { class: "turn user" }, el("b", {}, "you: "), text), turn);
    const response = await fetch("/api/chat", { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id, model: pick.value, text, history, system: fields.system.value || null, generation: generation(), seed: Number(fields.seed.value || 1234) }) });
    if (!response.ok) { turn.append(el("div", { class: "error" }, `HTTP ${response.status}`)); send.disabled = false; return; }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    turn.setAttribute("data-state", "streaming");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, data) => {
        if (name === "token") { answer.textContent += data.text; answer.setAttribute("data-pieces", String(Number(answer.getAttribute("data-pieces") || 0) + 1)); }
        else if (name === "done") { answer.textContent = data.answer; history.push({ role: "user", content: text }, { role: "assistant", content: data.answer }); turn.setAttribute("data-state", "done"); }
        else if (name === "error") { turn.append(el("div", { class: "error" }, data.message)); turn.setAttribute("data-state", "error"); }
      });
      transcript.scrollTop = transcript.scrollHeight;
    }
    send.disabled = false;
  }
  send.addEventListener("click", ask);
  input.addEventListener("keydown", e => { if (e.key === "Enter") ask(); });
  const reset = el("button", { onclick: () => { history.length = 0; transcript.replaceChildren(); } }, "Reset");
  return el("div", { class: "chatbox" },
    el("div", {}, el("label", {}, "model ", pick), " ", reset, transcript, el("div", { class: "chatform" }, input, send),
      el("p", { class: "muted" }, "Prompts are rendered with the run's saved template, exactly as `easysft chat` does; one model is loaded at a time (the first answer waits for it to load).")),
    el("div", { class: "settings" }, el("b", {}, "generation (empty = saved)"), Object.entries(fields).map(([k, f]) => el("label", {}, k, f))));
}

// ---------------------------------------------------------------------------------------------- compare
async function showCompare(ids) {
  const data = await getJSON("/api/compare?ids=" + ids.map(q).join(","));
  const charts = el("div", { class: "charts", id: "compare-charts" });
  const keys = new Map();
  for (const run of data.runs) for (const k of curveKeys(run.records)) keys.set(k.key, k);
  if (keys.has("loss")) keys.set("eval_loss", { key: "eval_loss", title: "eval loss" });
  $view.replaceChildren(el("h1", {}, "Compare"), el("p", {}, data.runs.map((r, i) => el("span", { style: `color:${COLORS[i % COLORS.length]};margin-right:16px` }, "■ ", r.id))),
    charts, el("h2", {}, "Config differences"),
    data.config_diff.length ? el("table", { class: "diff", id: "config-diff" }, el("tr", {}, el("th", {}, "key"), data.runs.map(r => el("th", {}, r.id))),
      data.config_diff.map(d => el("tr", {}, el("td", {}, d.key), d.values.map(v => el("td", {}, v === null ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v))))))
      : el("p", { class: "muted" }, "the configs are identical"));
  for (const k of keys.values()) {
    const chart = new Chart(charts, k.key === "loss" ? "train loss" : k.title, data.runs.map(r => r.id), k.key);
    chart.update(align(data.runs.map(r => points(r.records, k.key))));
  }
}

// ---------------------------------------------------------------------------------------------- router
async function route() {
  teardown.forEach(stop => stop()); teardown = [];
  const hash = location.hash.replace(/^#\/?/, "");
  try {
    if (hash.startsWith("run/")) await showRun(decodeURIComponent(hash.slice(4)));
    else if (hash.startsWith("compare/")) await showCompare(hash.slice(8).split(",").filter(Boolean).map(decodeURIComponent));
    else await showRuns();
  } catch (err) {
    $view.replaceChildren(el("p", { class: "error" }, String(err)), el("a", { href: "#/" }, "back to the runs"));
  }
}
window.addEventListener("hashchange", route);
route();
