// tpo report: renders the prompt list from the embedded JSON. Every piece of run data goes
// through textContent or setAttribute, never innerHTML, so answers cannot inject markup.
(function () {
  "use strict";

  var DATA = JSON.parse(document.getElementById("tpo-data").textContent);
  var RUNS = DATA.runs;
  var PROMPTS = DATA.prompts;
  var SVGNS = "http://www.w3.org/2000/svg";

  // Candidate tuples: [id, text, score, step, parent_id, origin, score_error, finish_reason]
  var C_ID = 0, C_TEXT = 1, C_SCORE = 2, C_STEP = 3, C_PARENT = 4, C_ORIGIN = 5, C_ERR = 6, C_FINISH = 7;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function svgEl(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, String(attrs[k]));
    return e;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "–";
    var a = Math.abs(x);
    return a !== 0 && (a >= 1e5 || a < 1e-3) ? x.toExponential(2) : x.toFixed(3);
  }

  function signed(x) { return x === null || x === undefined ? "–" : (x >= 0 ? "+" : "") + fmt(x); }
  function shortId(id) { return id ? String(id).slice(0, 8) : "–"; }

  function oneLine(s, n) {
    s = String(s || "").replace(/\s+/g, " ").trim();
    return s.length > n ? s.slice(0, n - 1) + "…" : s;
  }

  function lastUser(p) {
    for (var i = p.m.length - 1; i >= 0; i--) if (p.m[i][0] === "user") return p.m[i][1] || "";
    return "";
  }

  function swatch(color) {
    var s = svgEl("svg", { width: 12, height: 12, "class": "swatch", "aria-hidden": "true" });
    s.appendChild(svgEl("rect", { width: 12, height: 12, rx: 2, fill: color }));
    return s;
  }

  function textBlock(label, text, open) {
    var d = el("details", "textblock");
    if (open) d.open = true;
    var s = el("summary");
    s.appendChild(el("b", null, label));
    s.appendChild(el("span", "preview", " " + oneLine(text, 110)));
    d.appendChild(s);
    d.appendChild(el("pre", "text", text));
    return d;
  }

  // ------------------------------------------------------------------ the list

  var list = document.getElementById("list");
  var search = document.getElementById("search");
  var onlyFailed = document.getElementById("only-failed");
  var sortSel = document.getElementById("sort");
  var count = document.getElementById("count");
  var rows = [];
  var haystacks = null;
  var emptyNote = el("div", "empty-note", "No prompt matches.");
  emptyNote.hidden = true;

  function firstEntry(p) {
    for (var k = 0; k < p.r.length; k++) if (p.r[k]) return p.r[k];
    return null;
  }

  function anyFailed(p) {
    for (var k = 0; k < p.r.length; k++) if (p.r[k] && p.r[k].st === "failed") return true;
    return false;
  }

  function buildRow(p, index) {
    var d = el("details", "prompt");
    d.id = "prompt-" + index;
    d.setAttribute("data-id", p.id);
    var s = el("summary");
    s.appendChild(el("span", "pid", p.id));
    s.appendChild(el("span", "ptext", oneLine(lastUser(p), 200)));
    var chips = el("span", "chips");
    p.r.forEach(function (r, k) {
      if (!r) return;
      var chip = el("span", "chip " + r.st, r.st === "failed" ? "failed" : fmt(r.sc));
      chip.style.borderColor = RUNS[k].color;
      chip.title = RUNS[k].label + ": " + (r.st === "failed" ? (r.err || "failed") : "final reward " + fmt(r.sc));
      chips.appendChild(chip);
    });
    var first = firstEntry(p);
    if (first && first.g !== null && first.g !== undefined) {
      var g = el("span", "chip gain" + (first.g > 0 ? " up" : ""), signed(first.g));
      g.title = "final reward minus the best initial sample (" + RUNS[p.r.indexOf(first)].label + ")";
      chips.appendChild(g);
    }
    s.appendChild(chips);
    d.appendChild(s);
    d.addEventListener("toggle", function () {
      if (d.open && !d.getAttribute("data-built")) {
        d.setAttribute("data-built", "1");
        d.appendChild(buildBody(p, index));
      }
    });
    return d;
  }

  function buildBody(p, index) {
    var body = el("div", "body");
    var conv = el("div", "conv");
    p.m.forEach(function (m) {
      var box = el("div", "msg");
      box.appendChild(el("div", "role", m[0]));
      box.appendChild(el("pre", "text", m[1]));
      conv.appendChild(box);
    });
    body.appendChild(conv);
    p.r.forEach(function (r, k) {
      if (r) body.appendChild(buildRun(r, k, index));
    });
    return body;
  }

  // ------------------------------------------------------------------ one prompt in one run

  function buildRun(r, k, index) {
    var run = RUNS[k];
    var sec = el("section", "run");
    sec.style.borderLeftColor = run.color;
    var h = el("h3");
    h.appendChild(swatch(run.color));
    h.appendChild(el("span", null, run.label));
    h.appendChild(el("span", "badge " + r.st, r.st));
    sec.appendChild(h);

    var byId = {};
    r.c.forEach(function (c) { byId[c[C_ID]] = c; });
    var u = r.u;
    var facts = el("p", "facts");
    function fact(label, value) {
      facts.appendChild(document.createTextNode(label + " "));
      facts.appendChild(el("b", null, value));
      facts.appendChild(document.createTextNode(" · "));
    }
    fact("final reward", fmt(r.sc));
    fact("gain over the best initial sample", signed(r.g));
    fact("answers", String(r.c.length));
    fact("policy calls", String(u[0]));
    fact("sequences", String(u[1]));
    fact("tokens", String(u[2] + u[3]));
    fact("answers scored", String(u[4]));
    facts.appendChild(document.createTextNode(u[5].toFixed(2) + " s"));
    sec.appendChild(facts);
    if (r.stop) sec.appendChild(el("p", "facts", "Stopped early: " + r.stop));
    if (r.err) sec.appendChild(el("div", "error", r.err));

    var prefix = "c-" + index + "-" + k + "-";
    if (r.best && byId[r.best]) {
      var fin = el("div", "final");
      fin.appendChild(el("h4", null, "Final answer · " + shortId(r.best) + " · reward " + fmt(byId[r.best][C_SCORE])));
      fin.appendChild(el("pre", "text", byId[r.best][C_TEXT]));
      sec.appendChild(fin);
    }
    if (r.c.length) sec.appendChild(lineage(r, byId, prefix, run.color));
    r.s.forEach(function (st) { sec.appendChild(buildStep(st, r, byId, prefix)); });
    return sec;
  }

  function stepTitle(st) {
    if (st.n === 0) return "Step 0 · initial samples";
    if (st.fr) return "Step " + st.n + " · revision (fell back: the chosen and rejected answers were the same)";
    if (st.k === "tpo") return "Step " + st.n + " · TPO: chosen against rejected";
    return "Step " + st.n + " · " + st.k + ": chosen alone";
  }

  function candLabel(id, byId) {
    var c = byId[id];
    return shortId(id) + (c ? " (" + fmt(c[C_SCORE]) + ")" : "");
  }

  function buildStep(st, r, byId, prefix) {
    var box = el("div", "step");
    box.appendChild(el("h4", null, stepTitle(st) + (st.b !== null && st.b !== undefined ? " · best so far " + fmt(st.b) : "")));
    if (st.ch || st.rj) {
      var pair = el("p", "pair");
      if (st.ch) {
        pair.appendChild(document.createTextNode("chosen "));
        pair.appendChild(el("span", "mono chosen", candLabel(st.ch, byId)));
      }
      if (st.rj) {
        pair.appendChild(document.createTextNode("  ·  rejected "));
        pair.appendChild(el("span", "mono rejected", candLabel(st.rj, byId)));
      }
      box.appendChild(pair);
    }
    if (st.cr !== null && st.cr !== undefined) box.appendChild(textBlock("Critique (textual loss)", st.cr));
    if (st.fb !== null && st.fb !== undefined) box.appendChild(textBlock("Feedback (textual gradient)", st.fb));

    var seen = {};
    st.ids.forEach(function (id) {
      var c = byId[id];
      var row = el("details", "cand-row" + (id === r.best ? " is-final" : ""));
      if (!seen[id]) row.id = prefix + id;
      var s = el("summary");
      s.appendChild(el("span", "mono", shortId(id) + (id === r.best ? " ★" : "")));
      if (!c) {
        s.appendChild(el("span", "origin", "(not in the store)"));
        row.appendChild(s);
        box.appendChild(row);
        return;
      }
      s.appendChild(el("span", "score", c[C_SCORE] === null ? "not scored" : fmt(c[C_SCORE])));
      var how = c[C_ORIGIN];
      if (c[C_PARENT]) how += " ← " + shortId(c[C_PARENT]);
      if (c[C_STEP] !== st.n) how += " · repeat of a step " + c[C_STEP] + " answer";
      else if (seen[id]) how += " · repeated";
      if (c[C_FINISH] && c[C_FINISH] !== "stop") how += " · finish: " + c[C_FINISH];
      s.appendChild(el("span", "origin", how));
      s.appendChild(el("span", "preview", oneLine(c[C_TEXT], 140)));
      row.appendChild(s);
      if (c[C_ERR]) row.appendChild(el("div", "error", "Could not be scored: " + c[C_ERR]));
      row.appendChild(el("pre", "text", c[C_TEXT]));
      box.appendChild(row);
      seen[id] = true;
    });

    var notes = el("ul", "step-notes");
    var ex = st.ex || {};
    Object.keys(ex).forEach(function (kind) {
      if (kind !== "tagged" && ex[kind]) notes.appendChild(el("li", null, ex[kind] + " rewrite(s) taken by the '" + kind + "' fallback (answer tags missing or unclosed)"));
    });
    (st.fl || []).forEach(function (f) { notes.appendChild(el("li", "fail", f)); });
    if (st.tr && st.tr.length) notes.appendChild(el("li", null, "shortened to fit the context window: " + st.tr.join(", ")));
    if (notes.childNodes.length) box.appendChild(notes);
    return box;
  }

  // Every answer as a dot (x: step, y: reward), a line from the answer it was rewritten from.
  function lineage(r, byId, prefix, color) {
    var wrap = el("div", "lineage");
    var W = 640, H = 210, ml = 48, mr = 14, mt = 12, mb = 36;
    var maxStep = 0, lo = Infinity, hi = -Infinity, unscored = 0;
    r.c.forEach(function (c) {
      maxStep = Math.max(maxStep, c[C_STEP]);
      if (c[C_SCORE] === null) { unscored++; return; }
      lo = Math.min(lo, c[C_SCORE]);
      hi = Math.max(hi, c[C_SCORE]);
    });
    r.s.forEach(function (st) { maxStep = Math.max(maxStep, st.n); });
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
    var pad = (hi - lo) * 0.08;
    lo -= pad; hi += pad;
    var ph = H - mt - mb - (unscored ? 16 : 0), pw = W - ml - mr;
    var chosen = {}, rejected = {};
    r.s.forEach(function (st) { if (st.ch) chosen[st.ch] = true; if (st.rj) rejected[st.rj] = true; });
    var perStep = {};
    r.c.forEach(function (c) { (perStep[c[C_STEP]] = perStep[c[C_STEP]] || []).push(c[C_ID]); });
    function px(c) {
      var col = perStep[c[C_STEP]], i = col.indexOf(c[C_ID]);
      var base = maxStep === 0 ? ml + pw / 2 : ml + 20 + (c[C_STEP] / maxStep) * (pw - 40);
      return base + (i - (col.length - 1) / 2) * 5;
    }
    function py(c) {
      return c[C_SCORE] === null ? H - mb + 4 : mt + ph - ((c[C_SCORE] - lo) / (hi - lo)) * ph;
    }
    var svg = svgEl("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-label": "answers by step and reward, with lineage" });
    [lo + pad, (lo + hi) / 2, hi - pad].forEach(function (t) {
      var y = mt + ph - ((t - lo) / (hi - lo)) * ph;
      svg.appendChild(svgEl("line", { x1: ml, x2: W - mr, y1: y, y2: y, stroke: "#eaeef2" }));
      var label = svgEl("text", { x: ml - 6, y: y + 4, "text-anchor": "end" });
      label.textContent = fmt(t);
      svg.appendChild(label);
    });
    for (var s = 0; s <= maxStep; s++) {
      var x = maxStep === 0 ? ml + pw / 2 : ml + 20 + (s / maxStep) * (pw - 40);
      var t = svgEl("text", { x: x, y: H - 8, "text-anchor": "middle" });
      t.textContent = "step " + s;
      svg.appendChild(t);
    }
    if (unscored) {
      var ut = svgEl("text", { x: ml - 6, y: H - mb + 8, "text-anchor": "end" });
      ut.textContent = "unscored";
      svg.appendChild(ut);
    }
    var finalPath = {};
    for (var id = r.best; id && byId[id] && !finalPath[id]; id = byId[id][C_PARENT]) finalPath[id] = true;
    r.c.forEach(function (c) {
      var parent = c[C_PARENT] && byId[c[C_PARENT]];
      if (!parent) return;
      var onPath = finalPath[c[C_ID]] && finalPath[parent[C_ID]];
      svg.appendChild(svgEl("line", { x1: px(parent), y1: py(parent), x2: px(c), y2: py(c), "class": "edge" + (onPath ? " to-final" : "") }));
    });
    r.c.forEach(function (c) {
      var cls = "cand";
      if (c[C_ID] === r.best) cls += " final";
      else if (chosen[c[C_ID]]) cls += " chosen";
      else if (rejected[c[C_ID]]) cls += " rejected";
      var dot;
      if (c[C_SCORE] === null) {
        dot = svgEl("path", { d: "M" + (px(c) - 4) + "," + (py(c) - 4) + "l8,8m0,-8l-8,8", "class": "unscored" });
      } else {
        dot = svgEl("circle", { cx: px(c), cy: py(c), r: c[C_ID] === r.best ? 6 : 4.5, fill: color, "class": cls });
      }
      var title = svgEl("title", {});
      title.textContent = shortId(c[C_ID]) + " · step " + c[C_STEP] + " · " + (c[C_SCORE] === null ? "not scored" : "reward " + fmt(c[C_SCORE])) +
        (c[C_PARENT] ? " · from " + shortId(c[C_PARENT]) : "") + " — " + oneLine(c[C_TEXT], 80);
      dot.appendChild(title);
      dot.addEventListener("click", function () {
        var row = document.getElementById(prefix + c[C_ID]);
        if (!row) return;
        row.open = true;
        row.classList.add("flash");
        row.scrollIntoView({ block: "center" });
        setTimeout(function () { row.classList.remove("flash"); }, 1200);
      });
      svg.appendChild(dot);
    });
    wrap.appendChild(svg);
    wrap.appendChild(el("p", "lineage-key",
      "Each dot is an answer; a line joins a rewrite to the answer it improved. Green: the final answer and its ancestry; " +
      "dark ring: chosen at some step; red ring: rejected. Click a dot to open the answer."));
    return wrap;
  }

  // ------------------------------------------------------------------ search, filter, sort

  function buildHaystacks() {
    haystacks = PROMPTS.map(function (p) {
      var parts = [p.id];
      p.m.forEach(function (m) { parts.push(m[1]); });
      p.r.forEach(function (r) {
        if (!r) return;
        r.c.forEach(function (c) { parts.push(c[C_TEXT]); });
        if (r.err) parts.push(r.err);
      });
      return parts.join("\n").toLowerCase();
    });
  }

  function applyFilter() {
    var q = search.value.trim().toLowerCase();
    if (q && !haystacks) buildHaystacks();
    var failedOnly = onlyFailed.checked;
    var shown = 0;
    for (var i = 0; i < PROMPTS.length; i++) {
      var ok = (!q || haystacks[i].indexOf(q) !== -1) && (!failedOnly || anyFailed(PROMPTS[i]));
      rows[i].hidden = !ok;
      if (ok) shown++;
    }
    emptyNote.hidden = shown !== 0;
    list.setAttribute("data-query", q);
    count.textContent = "Showing " + shown + " of " + PROMPTS.length + " prompt" + (PROMPTS.length === 1 ? "" : "s");
  }

  function sortKey(p, how) {
    var r = firstEntry(p);
    if (!r) return null;
    return how.indexOf("gain") === 0 ? r.g : r.sc;
  }

  function applySort() {
    var how = sortSel.value;
    var order = PROMPTS.map(function (_, i) { return i; });
    if (how !== "id") {
      var dir = how.slice(-4) === "desc" ? -1 : 1;
      order.sort(function (a, b) {
        var ka = sortKey(PROMPTS[a], how), kb = sortKey(PROMPTS[b], how);
        if (ka === null || ka === undefined) return kb === null || kb === undefined ? a - b : 1;
        if (kb === null || kb === undefined) return -1;
        return ka === kb ? a - b : (ka < kb ? -dir : dir);
      });
    }
    var frag = document.createDocumentFragment();
    order.forEach(function (i) { frag.appendChild(rows[i]); });
    frag.appendChild(emptyNote);
    list.appendChild(frag);
  }

  var timer = null;
  search.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(applyFilter, 120);
  });
  onlyFailed.addEventListener("change", applyFilter);
  sortSel.addEventListener("change", applySort);
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "/" && document.activeElement !== search) {
      ev.preventDefault();
      search.focus();
    }
  });

  var frag = document.createDocumentFragment();
  PROMPTS.forEach(function (p, i) {
    var row = buildRow(p, i);
    rows.push(row);
    frag.appendChild(row);
  });
  frag.appendChild(emptyNote);
  list.textContent = "";
  list.appendChild(frag);
  applyFilter();
  document.documentElement.setAttribute("data-ready", "1");
})();
