// nbtool: memory per worker, as bars (used / budget), redrawn when the kernel sends rows.
// An anywidget view: a plain ES module, no build step.

function human(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function draw(model, el) {
  const rows = model.get("rows") || [];
  el.replaceChildren();
  const table = document.createElement("div");
  table.className = "nbtool-membars";
  for (const r of rows) {
    const row = document.createElement("div");
    row.className = "nbtool-membar-row";
    row.dataset.worker = r.worker;
    const name = document.createElement("span");
    name.className = "nbtool-membar-name";
    name.textContent = `${r.worker} (${r.device})`;
    const track = document.createElement("div");
    track.className = "nbtool-membar-track";
    // Models resident (charged to the budget), over the process's total use (lighter).
    const scale = Math.max(r.budget || 1, r.resident || 0, r.used || 0);
    const process = document.createElement("div");
    process.className = "nbtool-membar-process";
    process.style.width = `${Math.min(100, (100 * (r.used || 0)) / scale)}%`;
    track.appendChild(process);
    const resident = document.createElement("div");
    resident.className = "nbtool-membar-resident";
    resident.style.width = `${Math.min(100, (100 * (r.resident || 0)) / scale)}%`;
    if ((r.resident || 0) > (r.budget || Infinity)) resident.classList.add("over");
    track.appendChild(resident);
    const text = document.createElement("span");
    text.className = "nbtool-membar-text";
    text.textContent = `models ${human(r.resident)} of ${human(r.budget)} budget; ` +
      `process ${human(r.used)}` + (r.models ? ` — ${r.models}` : "");
    row.append(name, track, text);
    table.appendChild(row);
  }
  el.appendChild(table);
}

export default {
  render({ model, el }) {
    draw(model, el);
    model.on("change:rows", () => draw(model, el));
  },
};
