// Billing page actions. Requests are same-origin, so the Airflow UI's _token cookie
// authenticates them exactly like the page itself. Data is written with textContent only.
"use strict";

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function postJson(url, body, headers) {
  const r = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json", ...(headers || {}) },
    body: JSON.stringify(body || {}),
  });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const d = data && data.detail;
    throw new Error(`${r.status}: ${typeof d === "string" ? d : JSON.stringify(d || r.statusText)}`);
  }
  return data;
}

// The Airflow UI's base: this page is <base>/billing/ui.
const uiBase = new URL("../", window.location.href);

function say(el, parts) {
  el.replaceChildren();
  for (const p of parts) {
    if (typeof p === "string") el.append(document.createTextNode(p));
    else el.append(p);
  }
}

function reconcileNow(form) {
  const button = form.querySelector("button");
  const out = document.getElementById("reconcile-result");
  // One key per intent: kept while the request is in flight, so a repeat is the same run.
  if (!form.dataset.key) form.dataset.key = uuid();
  const key = form.dataset.key;
  const period = form.elements.period.value.trim();
  button.disabled = true;
  say(out, ["Starting a reconcile run…"]);
  postJson("reconcile/runs", { period }, { "Idempotency-Key": key })
    .then((run) => {
      const link = document.createElement("a");
      link.href = new URL(run.url, uiBase).toString();
      link.target = "_top";
      link.textContent = run.dag_run_id;
      link.dataset.testid = "reconcile-run-link";
      const state = document.createElement("span");
      state.className = "badge";
      state.dataset.testid = "reconcile-run-state";
      state.textContent = run.state;
      say(out, [run.created ? "Started run " : "Already started: run ", link, " · state ", state,
                ` · period ${run.conf.period || "(DAG default)"}`]);
      delete form.dataset.key; // the next click is a new intent
      pollState(run.api_url, state);
    })
    .catch((err) => { say(out, [`Could not start the run: ${err.message}`]); out.className = "error"; })
    .finally(() => { button.disabled = false; });
}

function pollState(apiUrl, el, tries = 0) {
  if (tries > 60 || ["success", "failed"].includes(el.textContent)) return;
  setTimeout(() => {
    fetch(new URL(apiUrl.replace(/^\//, ""), uiBase), { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((run) => { if (run && run.state) el.textContent = run.state; })
      .catch(() => {})
      .finally(() => pollState(apiUrl, el, tries + 1));
  }, 5000);
}

function retry(button) {
  const key = button.dataset.key;
  const out = button.parentElement.querySelector(".result");
  button.disabled = true;
  say(out, ["retrying…"]);
  postJson(`stripe/parked/${encodeURIComponent(key)}/retry`, {})
    .then((res) => {
      const r = res.result || {};
      say(out, [res.still_parked ? `still parked (${r.parked || 0} parked again)` : `sent (${r.sent || 0} sent, ${r.adopted || 0} adopted)`]);
      if (res.still_parked) button.disabled = false;
    })
    .catch((err) => { say(out, [err.message]); out.className = "result error"; button.disabled = false; });
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("reconcile-form");  // absent on Admin → Health
  if (form) form.addEventListener("submit", (ev) => { ev.preventDefault(); reconcileNow(form); });
  for (const b of document.querySelectorAll("button.retry")) {
    b.addEventListener("click", () => retry(b));
  }
  // Prepaid credits of one org: a navigation (the CSP's form-action 'none' blocks form posts)
  const credits = document.getElementById("credits-form");
  if (credits) credits.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const url = new URL(window.location.href);
    url.searchParams.set("org", credits.elements.org.value.trim());
    window.location.assign(url.toString());
  });
  document.getElementById("refresh").addEventListener("click", (ev) => {
    ev.preventDefault(); window.location.reload();
  });
});
