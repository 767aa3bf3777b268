// DOM builders of the RefDiff node views: the token strip of RefDiffGenerativeMap and the proposal gallery of
// RefDiffFuseSelect. Pure functions of the data the nodes send (their "refdiff_tokens" / "refdiff_proposals"
// ui output) and of the node's current widget values; no side effect at import time.

export const STYLE_ID = "refdiff-view-style";

const CSS = `
.refdiff-panel { box-sizing: border-box; height: 100%; overflow: hidden; font: 11px/1.3 sans-serif;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222); border-radius: 6px; padding: 4px; }
.refdiff-panel * { box-sizing: border-box; }
.refdiff-empty { opacity: 0.7; padding: 4px 2px; }
.refdiff-head { display: flex; gap: 6px; align-items: center; white-space: nowrap; overflow: hidden;
  height: 20px; }
.refdiff-head .refdiff-title { overflow: hidden; text-overflow: ellipsis; flex: 1 1 auto; }
.refdiff-head button { flex: 0 0 auto; font: inherit; padding: 0 6px; height: 18px; cursor: pointer;
  color: inherit; background: var(--comfy-menu-bg, #353535); border: 1px solid var(--border-color, #555);
  border-radius: 4px; }
.refdiff-pending { color: #ffcc4d; }
.refdiff-row { display: flex; gap: 3px; overflow-x: auto; overflow-y: hidden; padding: 1px 0; height: 76px; }
.refdiff-token, .refdiff-proposal { flex: 0 0 auto; display: flex; flex-direction: column; align-items: center;
  padding: 2px; margin: 0; cursor: pointer; color: inherit; font: inherit; background: transparent;
  border: 2px solid transparent; border-radius: 5px; }
.refdiff-token { width: 54px; height: 72px; }
.refdiff-token img, .refdiff-proposal img { width: 48px; height: 48px; object-fit: contain; display: block;
  background: #000; border-radius: 3px; }
.refdiff-proposal img { width: 58px; height: 58px; }
.refdiff-token .refdiff-word { max-width: 50px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  margin-top: 1px; }
.refdiff-token:hover, .refdiff-proposal:hover { border-color: var(--border-color, #777); }
.refdiff-token.refdiff-root { border-color: #ffcc4d; background: rgba(255, 204, 77, 0.12); }
.refdiff-token.refdiff-root .refdiff-word { font-weight: bold; color: #ffcc4d; }
.refdiff-token.refdiff-parse-root:not(.refdiff-root) { border-style: dashed; border-color: #8a8a8a; }
.refdiff-token.refdiff-wanted:not(.refdiff-root), .refdiff-proposal.refdiff-wanted:not(.refdiff-chosen) {
  outline: 2px dashed #ffcc4d; outline-offset: -2px; }
.refdiff-grid { display: flex; flex-wrap: wrap; gap: 3px; overflow-y: auto; padding: 2px 0; }
.refdiff-proposal { width: 66px; height: 118px; }
.refdiff-proposal.refdiff-chosen { border-color: #4dd0ff; background: rgba(77, 208, 255, 0.14); }
.refdiff-proposal .refdiff-scores { width: 100%; text-align: center; margin-top: 1px; white-space: nowrap;
  overflow: hidden; font-size: 10px; line-height: 12px; }
.refdiff-proposal .refdiff-rank { font-weight: bold; }
.refdiff-proposal.refdiff-chosen .refdiff-rank { color: #4dd0ff; }
`;

/** Adds the views' stylesheet to the document once. */
export function ensureStyle(doc = document) {
  if (doc.getElementById(STYLE_ID)) return;
  const style = doc.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  doc.head.appendChild(style);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(x, signed = false) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "–";
  const s = x.toFixed(3);
  return signed && x >= 0 ? "+" + s : s;
}

/** The lines of a multi-line override value, one per image of a batch of `batch`. */
export function overrideLines(value, batch) {
  const lines = String(value ?? "").split(/\r?\n/).map((l) => l.trim());
  if (lines.length === batch) return lines;
  if (lines.length === 1) return Array(batch).fill(lines[0]);
  return Array(batch).fill("");
}

/** The token_override value after choosing `choice` ("" = the parse's root) for image `image`. */
export function nextOverride(current, choice, image, batch, shared) {
  if (batch <= 1 || shared) return choice;
  const lines = overrideLines(current, batch);
  lines[image] = choice;
  return lines.every((l) => l === lines[0]) ? lines[0] : lines.join("\n");
}

/** The override value the strip of image `image` currently asks for (from the widget value). */
export function wantedOverride(current, image, batch) {
  return overrideLines(current, batch)[image] ?? "";
}

/** Height in pixels the token strip needs for `views` (one row per image). */
export function stripHeight(views) {
  if (!views || !views.length) return 30;
  return 8 + views.length * (20 + 76);
}

/**
 * The token strip: per image a row of small heatmaps, one per word, the root marked.
 * state: { current: token_override widget value or null when it is not a widget, thumbURL(ref),
 *          onPick(view, value) }
 */
export function renderTokenStrip(root, views, state) {
  root.replaceChildren();
  if (!views || !views.length) {
    root.appendChild(el("div", "refdiff-empty", "Run the graph to see the attention map of every word here."));
    return;
  }
  const shared = views.every((v) => v.text === views[0].text);
  for (const view of views) {
    const batch = view.batch ?? views.length;
    const wanted = state.current === null ? view.override : wantedOverride(state.current, view.image, batch);
    const pending = state.current !== null && wanted !== view.override;
    const head = el("div", "refdiff-head");
    const r = view.root;
    const how = r.source === "token_override" ? "token_override" : r.source === "root_word" ?
      "root_word of the parse" : "the parser's root";
    const prefix = batch > 1 ? `[${view.image}] ` : "";
    const title = el("span", "refdiff-title", `${prefix}c = "${r.label}" · token ${r.position}`);
    title.title = `"${view.text}": c is the map of token ${r.position} "${r.token}" (${how}). Click a word to ` +
      "read c from its map instead; click the root again to go back." +
      (state.current === null ? " (token_override is connected to a link: set it there)" : "");
    head.appendChild(title);
    if (pending) head.appendChild(el("span", "refdiff-pending", "queue to apply"));
    if (state.current !== null && (wanted !== "" || view.override !== "")) {
      const reset = el("button", "refdiff-reset", `root: ${view.parse_root}`);
      reset.title = "Use the parse's root word again (clears token_override)";
      reset.addEventListener("click", (e) => {
        e.stopPropagation();
        state.onPick(view, nextOverride(state.current, "", view.image, batch, shared));
      });
      head.appendChild(reset);
    }
    root.appendChild(head);
    const row = el("div", "refdiff-row");
    row.dataset.image = String(view.image);
    for (const token of view.tokens) {
      const cell = el("button", "refdiff-token");
      cell.type = "button";
      cell.dataset.word = token.word;
      cell.dataset.position = String(token.position);
      cell.dataset.override = token.override;
      if (token.root) cell.classList.add("refdiff-root");
      if (token.parse_root) cell.classList.add("refdiff-parse-root");
      if (pending && (wanted === "" ? token.parse_root : wanted === token.override)) {
        cell.classList.add("refdiff-wanted");
      }
      cell.title = `"${token.word}": tokens ${token.positions.join(", ")}` +
        (token.root ? " — c is read from this word" : "") + (token.parse_root ? " — the parse's root" : "");
      const img = el("img");
      img.alt = token.word;
      img.loading = "lazy";
      img.src = state.thumbURL(token.thumb);
      cell.appendChild(img);
      cell.appendChild(el("span", "refdiff-word", (token.root ? "★ " : "") + token.word));
      if (state.current !== null) {
        cell.addEventListener("click", (e) => {
          e.stopPropagation();
          const choice = token.parse_root ? "" : token.override;
          state.onPick(view, nextOverride(state.current, choice, view.image, batch, shared));
        });
      }
      row.appendChild(cell);
    }
    if (view.more > 0) row.appendChild(el("span", "refdiff-empty", `+${view.more} more`));
    root.appendChild(row);
  }
}

const CELL_W = 69; // proposal cell width + gap
const CELL_H = 121; // proposal cell height + gap
const GRID_PAD = 4; // the grid's padding above and below its cells

/** Proposal cells per row at a node width of `width` (widget margins and panel padding left out). */
export function cellsPerRow(width) {
  return Math.max(1, Math.floor((width - 28 + 3) / CELL_W));
}

function galleryRows(view, perRow) {
  return Math.min(3, Math.max(1, Math.ceil((view.items.length + (view.more > 0 ? 1 : 0)) / perRow)));
}

/** Height in pixels the gallery needs at a node width of `width` (at most 3 rows visible per image). */
export function galleryHeight(views, width) {
  if (!views || !views.length) return 30;
  const perRow = cellsPerRow(width);
  let h = 8;
  for (const v of views) h += 20 + galleryRows(v, perRow) * CELL_H + GRID_PAD;
  return h;
}

function formula(weights, spatial) {
  const g = weights.generative;
  const d = weights.discriminative;
  let s;
  if (g !== null && d !== null) s = `s = ${g}·G + ${d}·D`;
  else s = g !== null ? "s = G" : "s = D";
  // RefDiffSpatial's scores: the fused score plus the spatial terms the words said
  if (spatial) s += spatial.length ? ` + ${spatial.join(" + ")}` : " (no spatial term)";
  return s;
}

/** The spatial terms of one proposal as tooltip lines: the fused score before them and each contribution. */
function termLines(item) {
  if (!item.terms) return "";
  const names = Object.keys(item.terms);
  return `\nbase (before the terms) = ${fmt(item.base, true)}` +
    names.map((k) => `\n${k} ${fmt(item.terms[k], true)}`).join("");
}

function termSum(item) {
  return Object.values(item.terms).reduce((a, b) => a + (b ?? 0), 0);
}

/**
 * The proposal gallery: per image the proposals ranked by fused score, scores on each, the chosen one
 * highlighted. state: { pin: pin_index widget value or null when it is not a widget, width, thumbURL(ref),
 * onPin(value) }
 */
export function renderGallery(root, views, state) {
  root.replaceChildren();
  if (!views || !views.length) {
    root.appendChild(el("div", "refdiff-empty", "Run the graph to see the ranked proposals here."));
    return;
  }
  const perRow = cellsPerRow(state.width);
  for (const view of views) {
    const batch = view.batch ?? views.length;
    const pending = state.pin !== null && state.pin !== view.pin_index;
    const head = el("div", "refdiff-head");
    const prefix = batch > 1 ? `[${view.image}] ` : "";
    const chosen = view.chosen >= 0 ? `p${view.chosen}${view.pinned ? " (pinned)" : " (best score)"}` : "none";
    const title = el("span", "refdiff-title",
      `${prefix}${view.count} proposals · ${formula(view.weights, view.spatial)}${view.pinned ? " · pinned" : ""}`);
    title.title = `${view.count} ${view.source} proposals ranked by fused score ` +
      `${formula(view.weights, view.spatial)}; ` +
      `output: ${chosen}. Click a proposal to pin it as the output (pin_index); click it again, or ` +
      "\"by score\", to select by score." +
      (state.pin === null ? " (pin_index is connected to a link: set it there)" : "");
    head.appendChild(title);
    if (pending) head.appendChild(el("span", "refdiff-pending", "queue to apply"));
    if (state.pin !== null && state.pin >= 0) {
      const reset = el("button", "refdiff-reset", "by score");
      reset.title = "Select by fused score again (pin_index = -1)";
      reset.addEventListener("click", (e) => {
        e.stopPropagation();
        state.onPin(-1);
      });
      head.appendChild(reset);
    }
    root.appendChild(head);
    const grid = el("div", "refdiff-grid");
    grid.dataset.image = String(view.image);
    grid.style.maxHeight = `${galleryRows(view, perRow) * CELL_H + GRID_PAD}px`;
    for (const item of view.items) {
      const cell = el("button", "refdiff-proposal");
      cell.type = "button";
      cell.dataset.index = String(item.index);
      cell.dataset.rank = String(item.rank);
      if (item.chosen) cell.classList.add("refdiff-chosen");
      if (pending && state.pin === item.index) cell.classList.add("refdiff-wanted");
      cell.title = `proposal ${item.index}, rank ${item.rank} of ${view.count}, area ${item.area} px\n` +
        `fused s = ${fmt(item.fused, true)}\ns_G = ${fmt(item.generative, true)}\n` +
        `s_D = ${fmt(item.discriminative, true)}` + termLines(item) +
        (item.chosen ? "\nchosen" : "");
      const img = el("img");
      img.alt = `proposal ${item.index}`;
      img.loading = "lazy";
      img.src = state.thumbURL(item.thumb);
      cell.appendChild(img);
      const scores = el("div", "refdiff-scores");
      scores.appendChild(el("div", "refdiff-rank", `#${item.rank} · p${item.index}${item.chosen ? " ✓" : ""}`));
      scores.appendChild(el("div", "refdiff-fused", `s ${fmt(item.fused, true)}`));
      if (item.terms) {  // spatial terms applied: the base score and the terms' sum (each in the tooltip)
        scores.appendChild(el("div", "refdiff-base", `b ${fmt(item.base, true)}`));
        scores.appendChild(el("div", "refdiff-terms", `+t ${fmt(termSum(item), true)}`));
      } else {
        scores.appendChild(el("div", "refdiff-g", `G ${fmt(item.generative, true)}`));
        scores.appendChild(el("div", "refdiff-d", `D ${fmt(item.discriminative, true)}`));
      }
      cell.appendChild(scores);
      if (state.pin !== null) {
        cell.addEventListener("click", (e) => {
          e.stopPropagation();
          state.onPin(state.pin === item.index ? -1 : item.index);
        });
      }
      grid.appendChild(cell);
    }
    if (view.more > 0) grid.appendChild(el("span", "refdiff-empty", `+${view.more} more`));
    root.appendChild(grid);
  }
}
