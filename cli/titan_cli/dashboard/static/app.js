"use strict";
// The titan dashboard page: one EventSource for the snapshots, charts from the dashboard's history.
(() => {
  const $ = (s) => document.querySelector(s);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const num = (v, d = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
  const ms = (v) => (v === null || v === undefined ? "–" : v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0));
  const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
  const iso = (s) => (s ? new Date(s).toLocaleTimeString() : "–");
  const bytes = (b) => (b === null || b === undefined ? "–" : b > 1 << 30 ? (b / (1 << 30)).toFixed(1) + " GiB" : (b / (1 << 20)).toFixed(0) + " MiB");
  const put = (sel, html) => { const el = $(sel); if (el._html !== html) { el.innerHTML = html; el._html = html; } };
  const st = (s) => `<span class="st ${esc(s)}">${esc(s)}</span>`;

  let token = sessionStorage.getItem("titan-token") || "";
  let actions = false; // the server allows actions at all
  let unlocked = false;
  let snap = null;
  let selected = null; // a service name, or null for all
  let history = {}; // service -> [[t, calls/s, errors/s, p50, p95, p99]]
  let lastDead = {}; // service -> dead letter count when listed
  const HISTORY = 600;

  // --- token ------------------------------------------------------------------------------------
  async function checkToken(t) {
    const r = await fetch("/api/auth", { method: "POST", headers: { "X-Titan-Token": t } });
    return r.ok;
  }
  function showMode() {
    $("#mode").textContent = !actions ? "read-only" : unlocked ? "actions unlocked" : "actions locked";
    $("#mode").className = "pill" + (unlocked ? " unlocked" : "");
    $("#token").hidden = $("#unlock").hidden = !actions || unlocked;
    renderDetail();
    renderJobs();
  }
  $("#auth").addEventListener("submit", async (e) => {
    e.preventDefault();
    const t = $("#token").value;
    if (await checkToken(t)) {
      token = t; unlocked = true; sessionStorage.setItem("titan-token", t); $("#token").value = "";
    } else {
      $("#token").value = ""; $("#token").placeholder = "wrong token";
    }
    showMode();
  });
  async function act(url, body) {
    const r = await fetch(url, { method: "POST", headers: { "X-Titan-Token": token, "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
    const data = await r.json().catch(() => ({}));
    return { ok: r.ok, status: r.status, data };
  }

  // --- charts -----------------------------------------------------------------------------------
  const axis = { stroke: "#7d8794", grid: { stroke: "#222a33", width: 1 }, ticks: { stroke: "#222a33" } };
  function chart(el, series) {
    const width = () => Math.max(220, el.parentElement.clientWidth - 4);
    const plot = new uPlot({
      width: width(), height: 140, legend: { show: true, live: false }, cursor: { drag: { x: false } },
      scales: { x: { time: true } }, axes: [axis, { ...axis, size: 46 }],
      series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 1.5, spanGaps: true }))],
    }, [[], ...series.map(() => [])], el);
    addEventListener("resize", () => plot.setSize({ width: width(), height: 140 }));
    return plot;
  }
  const rateChart = chart($("#chart-rate"), [["calls/s", "#58a6ff"], ["errors/s", "#f85149"]]);
  const latChart = chart($("#chart-lat"), [["p50", "#3fb950"], ["p95", "#d29922"], ["p99", "#f85149"]]);

  function series() {
    if (selected && history[selected]) return history[selected];
    // All services: rates add up; latency is the worst service's, per refresh.
    const byT = new Map();
    for (const points of Object.values(history)) {
      for (const [t, c, e, p50, p95, p99] of points) {
        const k = Math.round(t);
        const a = byT.get(k) || [k, 0, 0, null, null, null];
        a[1] += c || 0; a[2] += e || 0;
        for (const i of [3, 4, 5]) { const v = [p50, p95, p99][i - 3]; if (v !== null && (a[i] === null || v > a[i])) a[i] = v; }
        byT.set(k, a);
      }
    }
    return [...byT.values()].sort((a, b) => a[0] - b[0]);
  }
  function drawCharts() {
    const pts = series();
    const col = (i) => pts.map((p) => p[i]);
    rateChart.setData([col(0), col(1), col(2)]);
    latChart.setData([col(0), col(3), col(4), col(5)]);
  }

  // --- rendering --------------------------------------------------------------------------------
  function tiles(s) {
    const live = s.workers.filter((w) => !w.gone);
    const sum = (k) => s.services.reduce((a, x) => a + (x[k] || 0), 0);
    const q = (k) => s.services.reduce((a, x) => a + x.queue[k], 0);
    const unhealthy = s.services.filter((x) => x.health.status !== "healthy").length;
    const t = [
      ["services", s.services.length, ""], ["not healthy", unhealthy, unhealthy ? "bad" : ""],
      ["workers", live.length, ""], ["calls/s", sum("calls_s").toFixed(1), ""],
      ["errors/s", sum("errors_s").toFixed(2), sum("errors_s") > 0 ? "bad" : ""],
      ["waiting", q("waiting"), q("waiting") ? "warn" : ""], ["running", q("pending"), ""],
      ["dead letters", q("dead_letters"), q("dead_letters") ? "bad" : ""],
    ];
    put("#tiles", t.map(([n, v, c]) => `<div class="tile ${c}"><b>${esc(v)}</b><span>${esc(n)}</span></div>`).join(""));
  }

  function renderServices() {
    const f = $("#svc-filter").value.toLowerCase();
    const rows = snap.services.filter((x) => !f || x.name.toLowerCase().includes(f)).map((x) => {
      const hosts = Object.entries(x.hosts).map(([h, n]) => `${esc(h)}×${n}`).join(" ");
      const versions = x.versions.map((v) => esc(v.version)).join(", ") || "–";
      const q = x.queue;
      return `<tr data-svc="${esc(x.name)}" class="${x.name === selected ? "sel" : ""}">
        <td><b>${esc(x.name)}</b></td><td>${versions}</td><td>${st(x.health.status)}</td>
        <td class="n">${x.workers}</td><td class="small">${hosts || "–"}</td>
        <td class="n">${x.in_flight}/${x.concurrency}</td><td class="n">${q.waiting}</td><td class="n">${q.pending}</td>
        <td class="n ${q.dead_letters ? "num-bad" : ""}">${q.dead_letters}</td><td class="n">${x.jobs}</td>
        <td class="n">${num(x.calls_s, 1)}</td><td class="n ${x.errors_s ? "num-bad" : ""}">${num(x.errors_s, 2)}</td>
        <td class="n">${ms(x.p50)}</td><td class="n">${ms(x.p95)}</td><td class="n">${ms(x.p99)}</td>
        <td class="muted" title="a breaker lives in each caller's process; the registry does not hold it">${x.breaker ?? "n/a"}</td></tr>`;
    });
    put("#services tbody", rows.join("") || `<tr><td colspan="16" class="muted">no service has registered in this namespace</td></tr>`);
  }
  $("#services tbody").addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-svc]");
    if (!tr) return;
    selected = selected === tr.dataset.svc ? null : tr.dataset.svc;
    lastDead = {};
    renderServices(); renderDetail(); drawCharts();
  });
  $("#svc-filter").addEventListener("input", () => renderServices());

  let deadLetters = { service: null, items: [], message: "" };
  async function loadDeadLetters(name) {
    const r = await fetch(`/api/services/${encodeURIComponent(name)}/dead-letters`);
    deadLetters = { service: name, items: r.ok ? await r.json() : [], message: deadLetters.service === name ? deadLetters.message : "" };
    renderDetail();
  }

  function renderDetail() {
    if (!snap) return;
    const x = selected && snap.services.find((s) => s.name === selected);
    $("#detail-title").textContent = x ? x.name : "All services";
    if (!x) { put("#detail", `<p class="muted">Select a service for its methods, health checks and dead letters.</p>`); return; }
    if (lastDead[x.name] !== x.queue.dead_letters) { lastDead[x.name] = x.queue.dead_letters; loadDeadLetters(x.name); }
    const versions = x.versions.map((v) => `<h3>version ${esc(v.version)} · ${v.workers} worker(s)</h3>` + v.methods.map((m) => {
      const decos = Object.entries(m.decorators || {}).map(([k, o]) => `<span class="deco" title="${esc(JSON.stringify(o))}">@${esc(k)}</span>`).join("");
      return `<div class="method"><code>${esc(m.signature || m.name)}</code>${decos}</div>`;
    }).join("")).join("");
    const checks = (x.health.workers || []).map((w) => {
      const c = Object.entries(w.checks || {}).map(([k, v]) => `${esc(k)}: ${st(typeof v === "object" ? v.status ?? JSON.stringify(v) : v)}`).join(" · ");
      const d = Object.keys(w.details || {}).length ? ` <span class="muted">${esc(JSON.stringify(w.details))}</span>` : "";
      return `<tr><td class="id">${esc(w.worker_id)}</td><td>${esc(w.host)}</td><td>${st(w.status)}</td><td>${c || "–"}${d}</td></tr>`;
    }).join("");
    const canAct = actions; // locked: the server refuses, and the page says so
    const letters = deadLetters.service === x.name ? deadLetters.items : [];
    const dl = letters.map((d) => `<tr><td class="id">${esc(d.id)}</td><td>${esc(d.method)}</td><td class="n">${d.deliveries}</td><td class="err-text">${esc(d.reason)}</td>
      <td><button data-replay="${esc(d.id)}" ${canAct ? "" : "disabled"}>replay</button></td></tr>`).join("");
    put("#detail", `
      <dl class="kv"><dt>description</dt><dd>${esc(x.description) || "–"}</dd>
      <dt>queue</dt><dd>${x.queue.waiting} waiting · ${x.queue.pending} running · ${x.delayed} delayed · ${x.queue.dead_letters} dead-lettered</dd>
      ${x.shards > 1 ? `<dt>shards</dt><dd>${x.queue.shards.map((s, k) => `#${k}: ${s.waiting} waiting · ${s.pending} running · ${s.dead_letters} dead`).join("<br>")}</dd>` : ""}
      <dt>breaker</dt><dd class="muted">not in the registry (each caller keeps its own)</dd></dl>
      ${versions}
      <h3>health</h3><table><tbody>${checks || `<tr><td class="muted">no live worker</td></tr>`}</tbody></table>
      <h3>dead letters (${x.queue.dead_letters})
        <button id="dl-replay" ${canAct && letters.length ? "" : "disabled"}>replay all</button>
        <button id="dl-purge" class="danger" ${canAct && letters.length ? "" : "disabled"}>purge all</button></h3>
      <div id="dl-msg" class="msg">${deadLetters.message}</div>
      <table id="dead-letters"><tbody>${dl || `<tr><td class="muted">none</td></tr>`}</tbody></table>`);
  }
  $("#detail").addEventListener("click", async (e) => {
    const b = e.target.closest("button");
    if (!b || !selected) return;
    let r;
    const base = `/api/services/${encodeURIComponent(selected)}/dead-letters`;
    if (b.dataset.replay) r = await act(`${base}/replay`, { ids: [b.dataset.replay] });
    else if (b.id === "dl-replay") r = await act(`${base}/replay`, {});
    else if (b.id === "dl-purge") { if (!confirm(`Delete every dead letter of ${selected}?`)) return; r = await act(`${base}/purge`, {}); }
    else return;
    deadLetters.message = r.ok ? `<span class="ok">${esc(JSON.stringify(r.data))}</span>` : `<span class="err">refused (${r.status}): ${esc(r.data.error)}</span>`;
    loadDeadLetters(selected);
  });

  function renderWorkers() {
    const f = $("#wrk-filter").value.toLowerCase();
    const all = snap.workers.filter((w) => !f || `${w.service} ${w.host} ${w.id}`.toLowerCase().includes(f));
    all.sort((a, b) => a.gone - b.gone || a.service.localeCompare(b.service) || a.host.localeCompare(b.host) || a.pid - b.pid);
    const shown = all.slice(0, 500);
    $("#wrk-count").textContent = `${snap.workers.filter((w) => !w.gone).length} live` + (all.length > shown.length ? ` · first ${shown.length} of ${all.length} shown` : "");
    put("#workers tbody", shown.map((w) => `<tr class="${w.gone ? "gone" : ""}" data-worker="${esc(w.id)}">
      <td>${esc(w.service)}</td><td class="id">${esc(w.id)}</td><td>${esc(w.host)}</td><td class="n">${w.pid}</td><td>${esc(w.version)}</td>
      <td>${w.gone ? st("gone") : st(w.status)}</td><td>${st(w.health)}</td>
      <td class="n">${w.in_flight}/${w.concurrency}</td><td class="n calls">${w.calls}</td><td class="n ${w.errors ? "num-bad" : ""}">${w.errors}</td>
      <td class="n">${w.cpu === null ? "–" : num(w.cpu, 0) + "%"}</td><td class="n">${bytes(w.rss)}</td>
      <td class="n">${w.gone ? "gone " + clock(w.gone_at) : num(w.age, 1) + " s ago"}</td></tr>`).join("")
      || `<tr><td colspan="13" class="muted">no worker</td></tr>`);
  }
  $("#wrk-filter").addEventListener("input", () => renderWorkers());

  function renderJobs() {
    if (!snap) return;
    const j = snap.jobs;
    const states = ["queued", "running", "retrying", "done", "failed", "dead", "cancelled"];
    put("#job-counts tbody", Object.entries(j.services).map(([name, c]) => `<tr><td>${esc(name)}</td><td class="n">${c.total}</td>` +
      states.map((s) => `<td class="n ${(s === "failed" || s === "dead") && c.states[s] ? "num-bad" : ""}">${c.states[s] || 0}</td>`).join("") + "</tr>").join("")
      || `<tr><td colspan="9" class="muted">no jobs</td></tr>`);
    const canAct = actions;
    put("#jobs-latest tbody", j.latest.map((x) => `<tr data-job="${esc(x.id)}"><td class="id"><a href="#" data-show="${esc(x.id)}">${esc(x.id)}</a></td><td>${esc(x.method)}</td>
      <td>${st(x.state)}</td><td class="n">${x.attempts}</td><td>${iso(x.submitted)}</td><td class="id">${esc(x.worker || "–")}</td>
      <td class="err-text">${esc(x.error ? x.error.type + ": " + x.error.message : "")}</td>
      <td>${x.state === "queued" ? `<button data-cancel="${esc(x.id)}" ${canAct ? "" : "disabled"}>cancel</button>` : ""}</td></tr>`).join("")
      || `<tr><td colspan="8" class="muted">none</td></tr>`);
    put("#jobs-failed tbody", j.failed.map((x) => `<tr><td class="id"><a href="#" data-show="${esc(x.id)}">${esc(x.id)}</a></td><td>${esc(x.method)}</td><td>${st(x.state)}</td>
      <td>${iso(x.finished)}</td><td class="err-text">${esc(x.error ? x.error.type + ": " + x.error.message : "")}</td></tr>`).join("")
      || `<tr><td colspan="5" class="muted">none</td></tr>`);
    put("#schedules tbody", j.schedules.map((x) => `<tr><td>${esc(x.service)}.<b>${esc(x.method)}</b></td><td>${esc(x.schedule)}</td>
      <td>${clock(x.last)}</td><td>${clock(x.next)}</td><td>${x.state ? st(x.state) : "–"}${x.error ? ` <span class="err-text">${esc(x.error)}</span>` : ""}</td>
      <td class="id">${esc(x.worker || "–")}</td></tr>`).join("") || `<tr><td colspan="6" class="muted">no periodic methods</td></tr>`);
  }
  async function showJob(id) {
    $("#job-id").value = id;
    const r = await fetch(`/api/jobs/${encodeURIComponent(id)}`);
    const d = await r.json().catch(() => ({}));
    put("#job-detail", r.ok
      ? `<dl class="kv" id="job-kv">${Object.entries(d).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${k === "state" ? st(v) : esc(typeof v === "object" && v !== null ? JSON.stringify(v) : v ?? "–")}</dd>`).join("")}</dl>`
      : `<div class="msg err">${esc(d.error || r.status)}</div>`);
  }
  $("#job-find").addEventListener("submit", (e) => { e.preventDefault(); const id = $("#job-id").value.trim(); if (id) showJob(id); });
  document.querySelector(".jobs").addEventListener("click", async (e) => {
    const a = e.target.closest("[data-show]");
    if (a) { e.preventDefault(); showJob(a.dataset.show); return; }
    const b = e.target.closest("[data-cancel]");
    if (b) {
      const r = await act(`/api/jobs/${encodeURIComponent(b.dataset.cancel)}/cancel`);
      put("#job-detail", `<div class="msg ${r.ok ? "ok" : "err"}">${r.ok ? (r.data.cancelled ? "cancelled " : "not cancelled (it started) ") + esc(b.dataset.cancel) : "refused (" + r.status + "): " + esc(r.data.error)}</div>`);
    }
  });

  function renderEvents() {
    put("#events", snap.events.slice(0, 80).map((e) => `<li><span class="muted mono">${clock(e.at)}</span><span class="ev-${esc(e.kind)}${e.detail === "Redis reachable" ? " up" : ""}">${esc(e.kind)}</span>
      <span>${esc(e.service)}${e.worker ? ` <span class="mono muted">${esc(e.worker)}</span>` : ""} ${esc(e.detail)}</span></li>`).join("") || `<li class="muted">nothing yet</li>`);
  }

  function renderStatus(serverUp) {
    const r = snap && snap.redis;
    const banner = $("#banner");
    if (!serverUp) {
      $("#conn").className = "pill bad"; $("#conn").textContent = "dashboard unreachable";
      banner.hidden = false; banner.textContent = "The dashboard server does not answer; retrying…";
    } else if (!r.ok) {
      $("#conn").className = "pill bad"; $("#conn").textContent = "Redis unreachable";
      banner.hidden = false;
      banner.textContent = `Redis unreachable since ${clock(r.since)} (${r.error}); what you see is from before. Retrying…`;
    } else {
      $("#conn").className = "pill ok"; $("#conn").textContent = "live";
      banner.hidden = true;
    }
  }

  function onSnapshot(s) {
    snap = s;
    $("#namespace").textContent = s.namespace;
    $("#redis-url").textContent = s.redis.url;
    if (s.cost && s.cost.commands !== undefined) $("#cost").textContent = `last read: ${s.cost.commands} commands, ${s.cost.round_trips} round trips, ${s.cost.ms} ms`;
    renderStatus(true);
    if (!s.redis.ok) return; // keep the last known state on the page
    for (const x of s.services) {
      const pts = (history[x.name] = history[x.name] || []);
      const last = pts[pts.length - 1];
      if (!last || last[0] < s.at - 1e-3) pts.push([s.at, x.calls_s, x.errors_s, x.p50, x.p95, x.p99]);
      while (pts.length && s.at - pts[0][0] > HISTORY) pts.shift();
    }
    tiles(s); renderServices(); renderDetail(); renderWorkers(); renderJobs(); renderEvents(); drawCharts();
  }

  async function start() {
    const info = await (await fetch("/api/info")).json();
    actions = info.actions;
    if (actions && token) unlocked = await checkToken(token);
    showMode();
    history = await (await fetch("/api/history")).json();
    const source = new EventSource("/api/stream");
    source.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
    source.addEventListener("error", () => renderStatus(false));
  }
  start().catch(() => { renderStatus(false); setTimeout(() => location.reload(), 3000); });
})();
