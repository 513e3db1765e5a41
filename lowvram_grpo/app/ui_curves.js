// The app's curves, drawn in the browser from a store of metric rows per run.
//
// Runs as the js_on_load of the hidden #curve-data component: its value is an update from
// dashboard.curve_delta (JSON) holding only the rows the page does not have yet. Rows are kept
// in window.lvgCurves, so a redraw (new rows, smoothing, another run selection) needs nothing
// from the server. Colours are fixed per series (its place in the curve's list) or, when runs
// are overlaid, per run (its place in the selection), so they never change between redraws.
// Each <svg> carries its axis domain and plot box as data-* attributes, so tests can map the
// drawn points back to values.
const store = window.lvgCurves = window.lvgCurves || {runs: {}, selected: [], curves: [], smooth: 0, seq: -1};
const PALETTE = ["#1f6feb", "#d9480f", "#2b8a3e", "#9c36b5", "#c2255c", "#0b7285", "#5c940d", "#e67700"];
const DASHES = ["", "6 3", "2 3", "8 3 2 3"];
const W = 480, H = 230, M = {left: 56, right: 12, top: 10, bottom: 30};

function apply(update) {
  if (!update || update.seq === undefined || update.seq === store.seq) return draw();
  store.seq = update.seq;
  store.curves = update.curves || store.curves;
  store.selected = update.selected || store.selected;
  for (const [name, part] of Object.entries(update.runs || {})) {
    let run = store.runs[name];
    if (!run || part.start === 0) run = store.runs[name] = {n: 0, cols: {}};
    if (part.start !== run.n) continue;  // a gap: the next full update repairs it
    const width = part.rows.length;
    for (const key of Object.keys(run.cols)) if (!part.keys.includes(key)) run.cols[key].push(...Array(width).fill(null));
    part.keys.forEach((key, k) => {
      const col = run.cols[key] || (run.cols[key] = Array(run.n).fill(null));
      for (const row of part.rows) col.push(row[k]);
    });
    run.n += width;
  }
  draw();
}

function smooth(values) {  // TensorBoard's debiased exponential moving average
  const a = store.smooth;
  if (!a) return values;
  let last = 0, weight = 0;
  return values.map(v => { last = last * a + (1 - a) * v; weight = weight * a + (1 - a); return last / weight; });
}

function seriesOf(curve, run) {
  if (curve.series) return curve.series.filter(key => run.cols[key]);
  return Object.keys(run.cols).filter(k => k.startsWith(curve.prefix) && k.endsWith(curve.suffix) && k !== curve.prefix)
    .sort();
}

function label(curve, key) {
  return curve.prefix ? key.slice(curve.prefix.length, key.length - curve.suffix.length || undefined) : key;
}

function linesOf(curve) {
  const lines = [], overlay = store.selected.length > 1;
  store.selected.forEach((name, r) => {
    const run = store.runs[name];
    if (!run) return;
    seriesOf(curve, run).forEach((key, s) => {
      const steps = [], values = [], band = [];
      run.cols[key].forEach((v, i) => {
        const step = run.cols.step[i];
        if (v === null || step === null) return;
        steps.push(step); values.push(v);
        if (curve.band && s === 0 && run.cols[curve.band]) band.push(run.cols[curve.band][i]);
      });
      if (!values.length) return;
      const shown = smooth(values);
      const name_ = (overlay ? name + " · " : "") + label(curve, key);
      lines.push({run: name, key, name: name_, steps, values, shown,
                  band: band.length === values.length && band.every(b => b !== null) ? smooth(band) : null,
                  color: PALETTE[(overlay ? r : s) % PALETTE.length],
                  dash: overlay ? DASHES[s % DASHES.length] : ""});
    });
  });
  return lines;
}

const fmt = v => Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : +v.toPrecision(4) + "";
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

// Axis ticks at round values (1, 2 or 5 times a power of ten) inside [lo, hi], about `count`
// of them (d3's rule), labelled with just the digits their spacing needs: 0.2, 0.4, not 0.1969.
function niceTicks(lo, hi, minStep = 0, count = 5) {
  const raw = (hi - lo) / count, power = 10 ** Math.floor(Math.log10(raw)), error = raw / power;
  const factor = error >= Math.sqrt(50) ? 10 : error >= Math.sqrt(10) ? 5 : error >= Math.sqrt(2) ? 2 : 1;
  const step = Math.max(minStep, factor * power);
  const values = [];
  // Bounded as well as by `hi`: where step is lost in lo's last digits, i + 1 == i.
  for (let i = Math.ceil(lo / step); i * step <= hi + step * 1e-9 && values.length < 4 * count; i++) values.push(i * step);
  const magnitude = Math.max(Math.abs(lo), Math.abs(hi));
  const stepDigit = Math.floor(Math.log10(step) + 1e-9);
  if (magnitude < 1e-3 || magnitude >= 1e5) {  // 5.0e-4, 1.05e-3: as many digits as the spacing shows
    const digits = Math.max(0, Math.floor(Math.log10(magnitude)) - stepDigit);
    return {values, label: v => v === 0 ? "0" : v.toExponential(digits)};
  }
  return {values, label: v => v.toFixed(Math.max(0, -stepDigit))};
}

function domain(lo, hi) {
  // A span below a billionth of the values is a flat line: a smoothed constant wobbles in its
  // last digits, and ticks spaced that finely would never reach the top (i * step stops growing).
  if (!(hi - lo > Math.max(Math.abs(lo), Math.abs(hi)) * 1e-9)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

function svgFor(curve, lines) {
  let xs = [], ys = [];
  for (const l of lines) {
    xs.push(...l.steps); ys.push(...l.shown);
    if (l.band) l.shown.forEach((v, i) => ys.push(v - l.band[i], v + l.band[i]));
  }
  const [x0, x1] = xs.length > 1 && Math.max(...xs) > Math.min(...xs) ? [Math.min(...xs), Math.max(...xs)]
    : domain(Math.min(...xs), Math.max(...xs));
  const [y0, y1] = domain(Math.min(...ys), Math.max(...ys));
  const pw = W - M.left - M.right, ph = H - M.top - M.bottom;
  const X = s => M.left + (s - x0) / (x1 - x0) * pw, Y = v => M.top + (y1 - v) / (y1 - y0) * ph;
  let out = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(curve.title)}" data-xmin="${x0}" data-xmax="${x1}"` +
    ` data-ymin="${y0}" data-ymax="${y1}" data-left="${M.left}" data-top="${M.top}" data-width="${pw}" data-height="${ph}">`;
  const yTicks = niceTicks(y0, y1);
  for (const v of yTicks.values) {
    const y = Y(v).toFixed(1);
    out += `<line class="grid" x1="${M.left}" x2="${W - M.right}" y1="${y}" y2="${y}"/>` +
      `<text class="tick" x="${M.left - 4}" y="${y}" text-anchor="end" dominant-baseline="middle">${yTicks.label(v)}</text>`;
  }
  const xTicks = niceTicks(x0, x1, 1);  // steps are whole numbers
  for (const s of xTicks.values)
    out += `<text class="tick" x="${X(s).toFixed(1)}" y="${H - 12}" text-anchor="middle">${xTicks.label(s)}</text>`;
  out += `<text class="tick" x="${W - M.right}" y="${H - 1}" text-anchor="end">step</text>`;
  for (const l of lines) {
    if (!l.band) continue;
    const upper = l.steps.map((s, i) => `${X(s).toFixed(2)},${Y(l.shown[i] + l.band[i]).toFixed(2)}`);
    const lower = l.steps.map((s, i) => `${X(s).toFixed(2)},${Y(l.shown[i] - l.band[i]).toFixed(2)}`).reverse();
    out += `<polygon class="band" data-series="${esc(l.key)}" fill="${l.color}" points="${upper.concat(lower).join(" ")}"/>`;
  }
  for (const l of lines) {
    const pts = l.steps.map((s, i) => `${X(s).toFixed(2)},${Y(l.shown[i]).toFixed(2)}`).join(" ");
    out += `<polyline class="line" data-run="${esc(l.run)}" data-series="${esc(l.key)}" stroke="${l.color}"` +
      ` stroke-dasharray="${l.dash}" points="${pts}"/>`;
    if (l.steps.length === 1) out += `<circle cx="${X(l.steps[0])}" cy="${Y(l.shown[0])}" r="3" fill="${l.color}"/>`;
  }
  out += `<line class="cursor" y1="${M.top}" y2="${M.top + ph}" x1="-10" x2="-10"/></svg>`;
  return out;
}

function draw(tries = 0) {
  const root = document.getElementById("curve-grid");
  if (!root) {  // the grid is a sibling component that may mount a moment later
    if (tries < 50) setTimeout(() => draw(tries + 1), 100);
    return;
  }
  const html = [], drawn = [];  // drawn: each figure's lines, for its hover (smoothed once)
  for (const curve of store.curves) {
    const lines = linesOf(curve);
    if (!lines.length && curve.id !== "reward") continue;  // a metric this run does not log
    drawn.push(lines);
    const legend = lines.map(l => `<span class="key"><i style="background:${l.color}"></i>${esc(l.name)}</span>`).join("");
    html.push(`<figure class="curve" id="curve-${curve.id}"><figcaption>${esc(curve.title)}</figcaption>` +
      (lines.length ? svgFor(curve, lines) : `<p class="empty">No steps yet: the curve starts after the first step.</p>`) +
      `<div class="legend">${legend}</div><div class="tip" hidden></div></figure>`);
  }
  root.innerHTML = html.join("") || "<p class='empty'>No run selected.</p>";
  root.querySelectorAll("figure.curve").forEach((fig, i) => {
    const svg = fig.querySelector("svg");
    if (svg) hover(fig, svg, drawn[i]);
  });
}

function hover(fig, svg, lines) {  // values of every line at the nearest step, under the pointer
  const tip = fig.querySelector(".tip"), cursor = svg.querySelector(".cursor"), d = svg.dataset;
  svg.addEventListener("mousemove", ev => {
    const box = svg.getBoundingClientRect(), scale = W / box.width;
    const x = (ev.clientX - box.left) * scale;
    const step = +d.xmin + (x - d.left) / d.width * (d.xmax - d.xmin);
    let rows = [], at = null;
    for (const l of lines) {
      let best = 0;
      l.steps.forEach((s, i) => { if (Math.abs(s - step) < Math.abs(l.steps[best] - step)) best = i; });
      at = l.steps[best];
      rows.push(`<span style="color:${l.color}">■</span> ${esc(l.name)}: <b>${fmt(l.values[best])}</b>` +
        (store.smooth ? ` (smoothed ${fmt(l.shown[best])})` : "") + (l.band ? ` ± ${fmt(l.band[best])}` : ""));
    }
    if (at === null) return;
    const cx = +d.left + (at - d.xmin) / (d.xmax - d.xmin) * d.width;
    cursor.setAttribute("x1", cx); cursor.setAttribute("x2", cx);
    tip.innerHTML = `step ${at}<br>` + rows.join("<br>");
    tip.hidden = false;
    tip.style.left = Math.min(ev.clientX - fig.getBoundingClientRect().left + 12, fig.clientWidth - 180) + "px";
  });
  svg.addEventListener("mouseleave", () => { tip.hidden = true; cursor.setAttribute("x1", -10); cursor.setAttribute("x2", -10); });
}

store.setSmooth = v => { store.smooth = Math.min(Math.max(+v || 0, 0), 0.99); draw(); };
store.apply = apply;
const read = () => { try { apply(JSON.parse(props.value || "null")); } catch (e) { console.error("curves:", e); } };
read();
watch("value", read);
