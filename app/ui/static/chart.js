// A small SVG line chart: one polyline per series, x = training step, y = value; redrawn as points arrive.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 760;
const HEIGHT = 300;
const MARGIN = { top: 12, right: 18, bottom: 38, left: 60 };
const MARKERS_UP_TO = 150; // a dot per point while they stay readable; beyond, the line alone

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** About `count` round tick values covering [min, max]. */
function ticks(min, max, count, integers = false) {
  const span = max - min || Math.abs(max) || 1;
  const rough = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const ratio = rough / magnitude;
  let step = (ratio >= 7.5 ? 10 : ratio >= 3.5 ? 5 : ratio >= 1.5 ? 2 : 1) * magnitude;
  if (integers) step = Math.max(1, Math.round(step));
  const values = [Number((Math.floor(min / step) * step).toPrecision(12))];
  while (values[values.length - 1] < max - step * 1e-9 || values.length < 2) {
    values.push(Number((values[values.length - 1] + step).toPrecision(12)));
  }
  return values; // from at most `min` to at least `max`
}

function label(value) {
  const tiny = value !== 0 && Math.abs(value) < 1e-3;
  return Math.abs(value) >= 1e4 || tiny ? value.toExponential(1) : String(Number(value.toPrecision(4)));
}

export class LineChart {
  /** `series`: [{name, label, color}], drawn in this order. */
  constructor(container, { series, xLabel = "step", empty = "No points yet." }) {
    this.container = container;
    this.series = series;
    this.xLabel = xLabel;
    this.empty = empty;
    this.points = new Map(series.map((s) => [s.name, new Map()])); // name -> step -> value
    this.xMax = 0;
    this.pending = false;
    this.legend = document.createElement("div");
    this.legend.className = "legend";
    this.box = document.createElement("div");
    this.box.className = "chart";
    container.replaceChildren(this.legend, this.box);
    this.render();
  }

  /** Replaces a series' points (`[[step, value], …]`). */
  set(name, pairs) {
    const points = this.points.get(name);
    points.clear();
    for (const [x, y] of pairs) points.set(x, y);
    this.schedule();
  }

  /** Adds one point; a step seen before (a job resumed from a checkpoint) keeps its latest value. */
  add(name, x, y) {
    if (!this.points.has(name) || !Number.isFinite(x) || typeof y !== "number" || !Number.isFinite(y)) return;
    this.points.get(name).set(x, y);
    this.schedule();
  }

  /** The x axis reaches at least this far (the job's total steps), so a running job's curve grows into it. */
  setXMax(x) {
    if (Number.isFinite(x) && x !== this.xMax) {
      this.xMax = x;
      this.schedule();
    }
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    setTimeout(() => {
      this.pending = false;
      this.render();
    }, 0);
  }

  render() {
    const sorted = this.series.map((s) => ({ ...s, points: [...this.points.get(s.name)].sort((a, b) => a[0] - b[0]) }));
    this.legend.replaceChildren(
      ...sorted.map((s) => {
        const item = document.createElement("span");
        item.dataset.series = s.name;
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = s.color;
        const last = s.points[s.points.length - 1];
        item.append(swatch, `${s.label}${last ? ` ${label(last[1])}` : ""} · ${s.points.length} points`);
        return item;
      }),
    );
    const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": this.xLabel });
    const all = sorted.flatMap((s) => s.points);
    if (all.length === 0) {
      root.append(svg("text", { x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle", class: "empty" }, this.empty));
      this.box.replaceChildren(root);
      return;
    }
    const xs = all.map((p) => p[0]);
    const ys = all.map((p) => p[1]);
    // A loop, not Math.max(...xs): spreading a long curve into arguments overflows the stack.
    const most = (values, start) => values.reduce((a, b) => Math.max(a, b), start);
    const least = (values) => values.reduce((a, b) => Math.min(a, b), Infinity);
    const xTicks = ticks(0, most(xs, Math.max(this.xMax, 1)), 8, true);
    const yTicks = ticks(least(ys), most(ys, -Infinity), 5);
    const [x0, x1] = [xTicks[0], xTicks[xTicks.length - 1]];
    const [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
    const plotW = WIDTH - MARGIN.left - MARGIN.right;
    const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
    const px = (x) => MARGIN.left + ((x - x0) / (x1 - x0 || 1)) * plotW;
    const py = (y) => MARGIN.top + (1 - (y - y0) / (y1 - y0 || 1)) * plotH;

    const grid = svg("g", { class: "grid" });
    const axis = svg("g", { class: "axis" });
    for (const y of yTicks) {
      grid.append(svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: py(y), y2: py(y) }));
      axis.append(svg("text", { x: MARGIN.left - 8, y: py(y) + 4, "text-anchor": "end" }, label(y)));
    }
    for (const x of xTicks) {
      grid.append(svg("line", { x1: px(x), x2: px(x), y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom }));
      axis.append(svg("text", { x: px(x), y: HEIGHT - MARGIN.bottom + 16, "text-anchor": "middle" }, label(x)));
    }
    axis.append(svg("text", { x: MARGIN.left + plotW / 2, y: HEIGHT - 4, "text-anchor": "middle" }, this.xLabel));
    root.append(grid, axis);

    for (const s of sorted) {
      if (s.points.length === 0) continue;
      const coordinates = s.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
      root.append(svg("polyline", { class: "series", "data-series": s.name, stroke: s.color, points: coordinates }));
      if (s.points.length <= MARKERS_UP_TO) {
        const dots = svg("g", { "data-markers": s.name, fill: s.color });
        for (const [x, y] of s.points) {
          const dot = svg("circle", { cx: px(x).toFixed(1), cy: py(y).toFixed(1), r: 2.5 });
          dot.append(svg("title", {}, `${s.label} at step ${x}: ${y}`));
          dots.append(dot);
        }
        root.append(dots);
      }
    }
    this.box.replaceChildren(root);
  }
}
