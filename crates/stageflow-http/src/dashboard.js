"use strict";
// Signed in by a session cookie (HttpOnly: this script never sees the token): POST /api/session
// with the token once; every request after carries the cookie, and x-stageflow-request (the
// server refuses a cookie without it on anything but a GET: no other site can send that header).
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, credentials: "same-origin", headers: { ...(options.headers || {}), "x-stageflow-request": "dashboard", "Content-Type": "application/json" } });
  if (response.status === 401 || response.status === 403) { document.getElementById("login").style.display = "block"; throw new Error("not signed in"); }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}
document.getElementById("save-token").onclick = async () => {
  const response = await fetch("/api/session", { method: "POST", credentials: "same-origin", headers: { Authorization: "Bearer " + document.getElementById("token").value } });
  if (response.ok) { location.reload(); } else { document.getElementById("notice").textContent = "That token is not one this server knows."; }
};

function bar(done, total, status) {
  const pct = total > 0 ? Math.round((100 * done) / total) : (status === "completed" ? 100 : 0);
  const cls = status === "failed" || status === "cancelled" ? "failed" : pct >= 100 ? "done" : "";
  return `<div class="bar ${cls}" data-pct="${pct}"><span style="width:${pct}%"></span><b>${pct}%</b></div>`;
}

function eta(job) {
  if (job.status !== "processing") return "";
  const stage = job.stages[job.current_stage - 1];
  if (!stage || !stage.created_at || !stage.tasks) return "";
  const done = stage.tasks.completed, total = stage.task_count;
  const elapsed = (Date.now() - new Date(stage.created_at).getTime()) / 1000;
  if (!done || elapsed <= 0) return "";
  return `${Math.max(0, Math.round((total - done) / (done / elapsed)))} s left in stage`;
}

function stageBars(job) {
  return job.stages.map((s) => `<div title="${esc(s.name)}">${esc(s.stage)}. ${esc(s.name)} ${bar(s.tasks ? s.tasks.completed + s.tasks.failed : 0, s.task_count || 0, s.status)}</div>`).join("");
}

async function listView() {
  const jobs = await api("/api/jobs?limit=25");
  const details = await Promise.all(jobs.map((j) => api("/api/jobs/status/" + j.job_id).catch(() => null)));
  const letters = await api("/api/dead-letters?limit=50");
  const rows = details.filter(Boolean).map((job) => `
    <tr class="job" data-job="${esc(job.job_id)}" data-status="${esc(job.status)}">
      <td><a href="#job/${esc(job.job_id)}"><code>${esc(job.job_id.slice(0, 16))}</code></a></td>
      <td>${esc(job.job_type)}</td>
      <td class="status ${esc(job.status)}">${esc(job.status)}</td>
      <td class="overall">${bar(job.progress, 100, job.status)}</td>
      <td>${stageBars(job)}</td>
      <td class="muted">${esc(eta(job))}</td>
    </tr>`).join("");
  const letterRows = letters.map((d) => `
    <tr class="dead-letter" data-task="${esc(d.task_id)}">
      <td><code>${esc(d.task_id)}</code></td><td>${esc(d.job_type)}</td><td class="status ${esc(d.status)}">${esc(d.status)}</td>
      <td class="err">${esc(d.error && (d.error.message || JSON.stringify(d.error)))}</td>
      <td><button class="retry" data-job="${esc(d.job_id)}">Retry job</button></td>
    </tr>`).join("");
  document.getElementById("view").innerHTML = `
    <section><h2>Recent jobs</h2>
      <table><tr><th>job</th><th>type</th><th>status</th><th>progress</th><th>stages</th><th>ETA</th></tr>${rows || '<tr><td colspan="6" class="muted">no jobs yet</td></tr>'}</table></section>
    <section><h2>Dead letters</h2>
      <table><tr><th>task</th><th>job type</th><th>status</th><th>error</th><th></th></tr>${letterRows || '<tr><td colspan="5" class="muted">none</td></tr>'}</table></section>`;
  document.querySelectorAll("button.retry").forEach((b) => b.onclick = async () => {
    b.disabled = true;
    const r = await api(`/api/jobs/${b.dataset.job}/retry`, { method: "POST" });
    b.textContent = `queued ${r.retried_tasks} again`;
    b.classList.add("retried");
    // The list may be drawn again (a live event) before or after this answer: the outcome is
    // also said outside it, where it stays.
    document.getElementById("notice").textContent =
      `job ${b.dataset.job.slice(0, 16)}: queued ${r.retried_tasks} again (${r.job_status})`;
  });
}

// The shown job's result, a page at a time: the `after` of each page reached (null: the first).
const RESULT_PAGE = 100;
let resultJob = null, resultAfters = [null];

function resultSection(job, page) {
  if (!page) return "";
  const shown = resultAfters.length;
  return `
    <section id="result"><h2>Result <span class="muted">${job.result_count} ${job.result_count === 1 ? "entry" : "entries"} · page ${shown}</span></h2>
      <table><tr><th>ordinal</th><th>task key</th><th>result</th></tr>
      ${page.entries.map((e) => `<tr class="result-entry" data-ordinal="${e.ordinal}"><td>${e.ordinal}</td><td><code>${esc(e.task_key)}</code></td>
        <td><code>${esc(JSON.stringify(e.result))}</code></td></tr>`).join("") || '<tr><td colspan="3" class="muted">no entries</td></tr>'}
      </table>
      <p><button id="result-prev" ${shown > 1 ? "" : "disabled"}>previous</button>
         <button id="result-next" ${page.next_after === null ? "disabled" : ""}>next</button></p></section>`;
}

async function jobView(jobId, filter) {
  const [job, tasks] = await Promise.all([api("/api/jobs/status/" + jobId), api("/api/db/tasks/" + jobId)]);
  if (resultJob !== jobId) { resultJob = jobId; resultAfters = [null]; }
  const after = resultAfters[resultAfters.length - 1];
  // Only a completed job has a result (result_count is null until then).
  const page = job.result_count === null || job.result_count === undefined ? null
    : await api(`/api/jobs/${jobId}/result?limit=${RESULT_PAGE}` + (after === null ? "" : `&after=${after}`));
  const shown = tasks.filter((t) => !filter || t.status === filter);
  const byId = Object.fromEntries(tasks.map((t) => [t.task_id, t]));
  const successors = {};
  tasks.forEach((t) => { if (t.predecessor_id) (successors[t.predecessor_id] ||= []).push(t.task_id); });
  const statuses = ["", "queued", "running", "completed", "failed", "dead", "cancelled"];
  document.getElementById("view").innerHTML = `
    <section><h2>Job <code>${esc(job.job_id)}</code></h2>
      <p>${esc(job.job_type)} · <span class="status ${esc(job.status)}">${esc(job.status)}</span> · stage ${job.current_stage}/${job.total_stages} · ${esc(eta(job))}</p>
      ${bar(job.progress, 100, job.status)}
      <table><tr><th>stage</th><th>status</th><th>progress</th><th>queued</th><th>running</th><th>completed</th><th>failed</th><th>cancelled</th></tr>
      ${job.stages.map((s) => `<tr><td>${s.stage}. ${esc(s.name)} <span class="muted">${esc(s.fan_out)}</span></td><td class="status ${esc(s.status)}">${esc(s.status)}</td>
        <td>${bar(s.tasks ? s.tasks.completed + s.tasks.failed : 0, s.task_count || 0, s.status)}</td>
        ${["queued", "running", "completed", "failed", "cancelled"].map((k) => `<td>${s.tasks ? s.tasks[k] : "-"}</td>`).join("")}</tr>`).join("")}
      </table>
      ${job.error ? `<p class="err">${esc(JSON.stringify(job.error))}</p>` : ""}
    </section>${resultSection(job, page)}
    <section><h2>Tasks <select id="filter">${statuses.map((s) => `<option ${s === (filter || "") ? "selected" : ""} value="${s}">${s || "all"}</option>`).join("")}</select></h2>
      <table><tr><th>task</th><th>status</th><th>attempt</th><th>lineage</th><th>result / error</th></tr>
      ${shown.slice(0, 500).map((t) => `<tr class="task" data-task="${esc(t.task_id)}"><td><code>${esc(t.task_id)}</code></td>
        <td class="status ${esc(t.status)}">${esc(t.status)}</td><td>${t.attempt}/${t.max_attempts}</td>
        <td class="muted">${t.predecessor_id ? "← " + esc(t.predecessor_id) : ""} ${(successors[t.task_id] || []).map((s) => "→ " + esc(s)).join(" ")}</td>
        <td class="${t.error ? "err" : ""}"><code>${esc(JSON.stringify(t.error || t.result))}</code></td></tr>`).join("")}
      </table>${shown.length > 500 ? `<p class="muted">${shown.length - 500} more…</p>` : ""}</section>`;
  document.getElementById("filter").onchange = (e) => { location.hash = `#job/${jobId}/${e.target.value}`; };
  if (page) {
    document.getElementById("result-next").onclick = () => { resultAfters.push(page.next_after); render(); };
    document.getElementById("result-prev").onclick = () => { resultAfters.pop(); render(); };
  }
  void byId;
}

let rendering = false, again = false;
async function render() {
  if (rendering) { again = true; return; }
  rendering = true;
  try {
    const [, view, id, filter] = location.hash.split(/[#/]/);
    if (view === "job" && id) await jobView(id, filter); else await listView();
  } catch (e) {
    if (e.message !== "not signed in") document.getElementById("view").innerHTML = `<p class="err">${esc(e.message)}</p>`;
  } finally {
    rendering = false;
    if (again) { again = false; setTimeout(render, 100); }
  }
}
window.addEventListener("hashchange", render);

// Live updates: server-sent events from LISTEN stageflow_events, coalesced to one redraw per 250 ms.
let pending = null;
function connect() {
  const source = new EventSource("/api/events", { withCredentials: true });
  source.onopen = () => { document.getElementById("live").textContent = "live"; };
  source.addEventListener("stageflow", () => { if (!pending) pending = setTimeout(() => { pending = null; render(); }, 250); });
  source.onerror = () => { document.getElementById("live").textContent = "reconnecting…"; };
}
render();
connect();
// Task completions are counted, not announced (an event per task would cost the hot path), so while
// a shown job is processing its counts are re-read every 2 s; an idle page only listens.
setInterval(() => { if (document.querySelector('[data-status="processing"], [data-status="queued"], .status.processing')) render(); }, 2000);
