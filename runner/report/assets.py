"""The report page's static parts: the HTML skeleton, its CSS and its JavaScript.

The Content-Security-Policy in the skeleton is the page's own guard: it forbids every
network fetch (scripts, styles, images, fonts, frames, XHR) beyond inline code and
images from ``data:`` URIs or the page's own directory. Plain ``<a href>`` navigation
to an output's URL is a click, not a load, and stays allowed.

The script reads the gallery JSON, fills the state and endpoint filters, and renders one
page of cards at a time. ``#gallery-count`` carries ``data-matching`` and
``data-rendered`` for tests; the URL hash (``#state=failed&endpoint=…&q=…``) presets
the filters, so a link can point at the failures of one endpoint.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data: 'self' file:">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
{body}
<script type="application/json" id="gallery-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

CSS = """
:root { --fg:#1d232a; --muted:#5b6672; --line:#dde2e7; --bg:#f6f7f9; --card:#fff;
  --est:#b8c4d0; --estd:#4a7fb5; --bill:#e08a2e; --ok:#2f8f4e; --bad:#c0392b; --wait:#8a6d1c; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1240px; padding: 20px 24px 60px; color: var(--fg);
  background: var(--bg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); }
code { font: 12px ui-monospace, Menlo, Consolas, monospace; }
.meta, .note { color: var(--muted); margin: 4px 0; }
.warn { color: var(--bad); font-weight: 600; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px;
  margin-top: 16px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 12px; }
.tile b { display: block; font-size: 20px; }
.tile span { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; background: var(--card); margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.chart { width: 100%; max-width: 820px; display: block; font-size: 12px; background: var(--card);
  border: 1px solid var(--line); border-radius: 8px; padding: 6px; }
.chart text { fill: var(--fg); }
.chart .est { fill: var(--est); }
.chart .estd { fill: var(--estd); }
.chart .bill { fill: var(--bill); }
.charts { display: grid; gap: 10px; }
.chart .title { font-weight: 600; }
.chart .axis, .chart .legend, .chart .empty { fill: var(--muted); font-size: 11px; }
.chart .grid { stroke: var(--line); stroke-width: 1; }
.chart .bar { fill: var(--estd); }
.chart .line { fill: none; stroke: var(--bill); stroke-width: 2; }
.chart .line-key, .chart .dot { fill: var(--bill); }
.chart .ref { stroke: var(--estd); stroke-width: 1.5; stroke-dasharray: 6 4; }
.chart .ref-key { fill: var(--estd); }
.chart .s0 { fill: #c0392b; } .chart .s1 { fill: #e08a2e; } .chart .s2 { fill: #8a6d1c; }
.chart .s3 { fill: #7d5ba6; } .chart .s4 { fill: #4a7fb5; } .chart .s5 { fill: #98a2ad; }
tr.inv.warn td.status { color: var(--bad); font-weight: 600; }
tr.inv.ok td.status { color: var(--ok); }
.pair { display: flex; gap: 6px; margin-bottom: 8px; }
.pair figure { flex: 1 1 50%; margin: 0; }
.pair figcaption { color: var(--muted); font-size: 11px; margin-top: 2px; }
.pair .pics { margin-bottom: 0; }
.controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 8px 0; }
.controls select, .controls input, .controls button { font: inherit; padding: 3px 6px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px;
  overflow-wrap: anywhere; font-size: 12.5px; }
.card.failed, .card.invalid, .card.cancelled { border-color: #e7b3ad; }
.pics { display: flex; flex-wrap: wrap; gap: 4px; margin-bottom: 8px; }
.pics > * { flex: 1 1 45%; }
.pics img { width: 100%; height: 170px; object-fit: contain; background: #eceff2;
  border-radius: 4px; display: block; }
.ph { height: 170px; display: flex; align-items: center; justify-content: center;
  text-align: center;
  background: repeating-linear-gradient(45deg, #eef0f3, #eef0f3 8px, #e4e8ec 8px, #e4e8ec 16px);
  color: var(--muted); border-radius: 4px; padding: 8px; }
.head { display: flex; justify-content: space-between; gap: 6px; align-items: baseline; }
.head b { font-size: 13.5px; }
.badge { border-radius: 10px; padding: 0 8px; font-size: 11px; color: #fff;
  background: var(--wait); }
.badge.completed { background: var(--ok); }
.badge.failed, .badge.invalid, .badge.cancelled { background: var(--bad); }
.where, .ep, .kv { color: var(--muted); }
.prompt { margin: 6px 0; }
.err { color: var(--bad); margin-top: 6px; }
.kv span { display: inline-block; margin-right: 8px; }
"""

JS = r"""
(function () {
  "use strict";
  var doc = JSON.parse(document.getElementById("gallery-data").textContent);
  var cards = doc.cards, size = doc.pageSize, page = 0;
  function $(id) { return document.getElementById(id); }
  var fState = $("f-state"), fEndpoint = $("f-endpoint"), fText = $("f-text");
  var grid = $("cards"), count = $("gallery-count");

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function tally(key) {
    var out = {};
    cards.forEach(function (c) { out[c[key]] = (out[c[key]] || 0) + 1; });
    return out;
  }
  function options(select, values, counts) {
    values.forEach(function (v) {
      var o = el("option", null, (v || "(no endpoint)") + " (" + counts[v] + ")");
      o.value = v;
      select.appendChild(o);
    });
  }
  var states = tally("s"), endpoints = tally("e");
  options(fState, doc.states.filter(function (s) { return states[s]; }), states);
  options(fEndpoint, Object.keys(endpoints).sort(), endpoints);

  function matches(c) {
    var q = fText.value.trim().toLowerCase();
    if (fState.value && c.s !== fState.value) return false;
    if (fEndpoint.value && c.e !== fEndpoint.value) return false;
    return !q || c.r.toLowerCase().indexOf(q) >= 0 || c.p.toLowerCase().indexOf(q) >= 0;
  }
  function link(href, child) {
    var a = el("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.appendChild(child);
    return a;
  }
  function picture(c, im) {
    var box;
    if (im.t) {
      box = el("img");
      box.src = im.t;
      box.alt = c.p;
      box.loading = "lazy";
      if (im.z) box.title = im.z;
    } else {
      box = el("div", "ph", (im.n || "no image") + (im.u ? " · open URL" : ""));
    }
    var href = im.h || im.u;
    return href ? link(href, box) : box;
  }
  function kv(pairs) {
    var row = el("div", "kv");
    pairs.forEach(function (p) { row.appendChild(el("span", null, p[0] + "=" + p[1])); });
    return row;
  }
  function figure(cls, caption, pics) {
    var fig = el("figure", cls);
    fig.appendChild(pics);
    fig.appendChild(el("figcaption", null, caption));
    return fig;
  }
  function card(c) {
    var node = el("article", "card " + c.s);
    node.setAttribute("data-state", c.s);
    var pics = el("div", "pics");
    if (!c.imgs.length) pics.appendChild(el("div", "ph", c.s === "completed" ? "no output" : c.s));
    c.imgs.forEach(function (im) { pics.appendChild(picture(c, im)); });
    if (c.i && c.i.length) {
      // An edit: its input images (before) beside its outputs (after).
      var before = el("div", "pics");
      c.i.forEach(function (im) {
        var pic = picture(c, im);
        pic.title = im.f + ": " + im.v;
        before.appendChild(pic);
      });
      var pair = el("div", "pair");
      pair.appendChild(figure("before", "before · " + c.i.map(function (im) {
        return im.f; }).join(", "), before));
      pair.appendChild(figure("after", "after", pics));
      node.appendChild(pair);
    } else {
      node.appendChild(pics);
    }
    var head = el("div", "head");
    head.appendChild(el("b", null, c.r));
    head.appendChild(el("span", "badge " + c.s, c.s));
    node.appendChild(head);
    node.appendChild(el("div", "where", c.w + (c.c ? " · " + c.c : "")));
    node.appendChild(el("div", "ep", c.e));
    if (c.p) node.appendChild(el("div", "prompt", c.p));
    var facts = c.k.slice();
    if (c.d !== null) facts.unshift(["seed", c.d]);
    if (facts.length) node.appendChild(kv(facts));
    if (c.l.length) node.appendChild(el("div", "kv", "LoRAs: " + c.l.join(", ")));
    if (c.m.length) node.appendChild(kv(c.m));
    if (c.x) node.appendChild(el("div", "err", c.x));
    return node;
  }
  function render() {
    var hits = cards.filter(matches);
    var pages = Math.max(1, Math.ceil(hits.length / size));
    page = Math.max(0, Math.min(page, pages - 1));
    var shown = hits.slice(page * size, (page + 1) * size);
    grid.textContent = "";
    shown.forEach(function (c) { grid.appendChild(card(c)); });
    count.setAttribute("data-matching", hits.length);
    count.setAttribute("data-rendered", shown.length);
    count.textContent = hits.length + " of " + cards.length + " cards match" +
      (shown.length ? "; showing " + (page * size + 1) + "–" + (page * size + shown.length) : "");
    $("page").textContent = " page " + (page + 1) + " of " + pages + " ";
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
  }
  function fromHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    if (params.has("state")) fState.value = params.get("state");
    if (params.has("endpoint")) fEndpoint.value = params.get("endpoint");
    if (params.has("q")) fText.value = params.get("q");
    page = Math.max(0, (parseInt(params.get("page"), 10) || 1) - 1);
  }
  function toHash() {
    var params = new URLSearchParams();
    if (fState.value) params.set("state", fState.value);
    if (fEndpoint.value) params.set("endpoint", fEndpoint.value);
    if (fText.value) params.set("q", fText.value);
    if (page) params.set("page", page + 1);
    try { history.replaceState(null, "", "#" + params.toString()); } catch (e) { /* file: */ }
  }
  function refilter() { page = 0; render(); toHash(); }
  fState.addEventListener("change", refilter);
  fEndpoint.addEventListener("change", refilter);
  fText.addEventListener("input", refilter);
  $("prev").addEventListener("click", function () { page -= 1; render(); toHash(); });
  $("next").addEventListener("click", function () { page += 1; render(); toHash(); });
  fromHash();
  render();
})();
"""
