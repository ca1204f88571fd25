// nbtool: the dashboard's Devices view. Per worker a memory bar (used / budget), a sparkline
// of its memory over the last minutes and its rows/s; per GPU a memory bar and a sparkline
// of its utilisation. Redrawn when the kernel sends rows. An anywidget view: a plain ES
// module, no build step, no libraries (the sparklines are inline SVG).

const SVG = "http://www.w3.org/2000/svg";

function human(n) {
  if (n === null || n === undefined) return "n/a";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function rate(r) {
  if (r.rate === null || r.rate === undefined) return "";
  const busy = r.busy === null || r.busy === undefined ? ""
    : `, busy ${Math.round(100 * Math.min(1, r.busy))}%`;
  return ` · ${Math.round(r.rate).toLocaleString("en-US")} rows/s${busy}`;
}

// A line of `values` (oldest first) from 0 (bottom) to the larger of `top` and their
// largest (top), in a small inline SVG.
function sparkline(values, top, title) {
  const width = 120, height = 18;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "nbtool-spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const label = document.createElementNS(SVG, "title");
  label.textContent = title;
  svg.appendChild(label);
  const pts = (values || []).filter((v) => v !== null && v !== undefined);
  if (pts.length > 0) {
    const scale = Math.max(top || 0, ...pts) || 1;
    const step = pts.length > 1 ? width / (pts.length - 1) : 0;
    const coords = pts.map((v, i) =>
      `${(i * step).toFixed(1)},${(height - 1 - ((height - 2) * v) / scale).toFixed(1)}`);
    if (pts.length === 1) coords.push(`${width},${coords[0].split(",")[1]}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", coords.join(" "));
    line.setAttribute("class", "nbtool-spark-line");
    svg.appendChild(line);
  }
  return svg;
}

function bar(used, inner, scale, over) {
  const track = document.createElement("div");
  track.className = "nbtool-membar-track";
  const outer = document.createElement("div");
  outer.className = "nbtool-membar-process";
  outer.style.width = `${Math.min(100, (100 * (used || 0)) / scale)}%`;
  track.appendChild(outer);
  if (inner !== null) {
    const resident = document.createElement("div");
    resident.className = "nbtool-membar-resident";
    resident.style.width = `${Math.min(100, (100 * (inner || 0)) / scale)}%`;
    if (over) resident.classList.add("over");
    track.appendChild(resident);
  }
  return track;
}

function line(cls, label, ...parts) {
  const row = document.createElement("div");
  row.className = cls;
  const name = document.createElement("span");
  name.className = "nbtool-membar-name";
  name.textContent = label;
  name.title = label;
  row.append(name, ...parts);
  return row;
}

function text(s) {
  const span = document.createElement("span");
  span.className = "nbtool-membar-text";
  span.textContent = s;
  return span;
}

function memoryTitle(r) {
  const h = (r.history || []).filter((v) => v !== null && v !== undefined);
  if (h.length === 0) return `${r.worker}: process memory, no samples yet`;
  return `${r.worker}: process memory over the last minutes, ` +
    `${human(Math.min(...h))} to ${human(Math.max(...h))}`;
}

function draw(model, el) {
  const rows = model.get("rows") || [];
  const gpus = model.get("gpus") || [];
  el.replaceChildren();
  const table = document.createElement("div");
  table.className = "nbtool-membars";
  for (const r of rows) {
    // Models resident (charged to the budget), over the process's total use (lighter).
    const scale = Math.max(r.budget || 1, r.resident || 0, r.used || 0);
    const row = line("nbtool-membar-row", `${r.worker} (${r.device})`,
      bar(r.used, r.resident, scale, (r.resident || 0) > (r.budget || Infinity)),
      // Scaled to its own peak, not the budget: a process far below its budget still
      // shows how it grew and shrank.
      sparkline(r.history, 0, memoryTitle(r)),
      text(`models ${human(r.resident)} of ${human(r.budget)} budget; ` +
        `process ${human(r.used)}` + rate(r) + (r.models ? ` — ${r.models}` : "")));
    row.dataset.worker = r.worker;
    table.appendChild(row);
  }
  if (gpus.length === 0) {
    const none = document.createElement("div");
    none.className = "nbtool-gpu-none";
    none.textContent = "GPUs: none found by NVML (no NVIDIA driver on this machine)";
    table.appendChild(none);
  }
  for (const g of gpus) {
    const util = g.utilization === null || g.utilization === undefined
      ? "n/a" : `${g.utilization}%`;
    const row = line("nbtool-gpu-row", `${g.label} (${g.name})`,
      bar(g.used, null, g.total || 1, false),
      sparkline(g.history, 100, `${g.label}: utilisation %, last minutes`),
      text(`utilisation ${util}; memory ${human(g.used)} of ${human(g.total)}`));
    row.dataset.gpu = g.label;
    table.appendChild(row);
  }
  el.appendChild(table);
}

export default {
  render({ model, el }) {
    draw(model, el);
    model.on("change:rows", () => draw(model, el));
    model.on("change:gpus", () => draw(model, el));
  },
};
