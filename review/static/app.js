// The reading room front end: worklist -> study (viewer + AI findings + report) -> sign.
// Talks to its own origin only (/read/api, /read/dicomweb); the session is an HttpOnly cookie.
const api = (path, options = {}) =>
  fetch(`/read/api${path}`, {
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
let me = null;
let t = {};
let rows = [];
let countText = "";
let selected = 0;
let etag = null;
let study = null;
let draft = null;
let viewer = null;
let priorViewer = null;
let focusFinding = 0;
const main = document.getElementById("main");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const lang = (s) => (me.locale === "zh" ? `<span lang="zh-Hans">${esc(s)}</span>` : esc(s));

function countdown(deadline) {
  const minutes = Math.round((new Date(deadline) - Date.now()) / 60000);
  const n = Math.abs(minutes);
  const key = minutes >= 0 ? "minutes_left" : "minutes_over";
  const forms = t[key];
  const rule = new Intl.PluralRules(me.locale).select(n);
  const text = (forms[rule] || forms.other).replace("{n}", n);
  return `<span class="${minutes < 0 ? "overdue" : ""}">${esc(text)}</span>`;
}

// An absolute time in the reader's locale with its time zone (the deadline is a contract term;
// "in 40 minutes" alone cannot be checked against the agreement).
function when(iso) {
  const fmt = new Intl.DateTimeFormat(me.lang_tag, {
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    timeZoneName: "short",
  });
  return `<time datetime="${esc(iso)}">${esc(fmt.format(new Date(iso)))}</time>`;
}

function age(received) {
  const minutes = Math.round((Date.now() - new Date(received)) / 60000);
  const [n, unit] = minutes < 120 ? [minutes, "minute"] : [Math.round(minutes / 60), "hour"];
  return new Intl.NumberFormat(me.lang_tag, { style: "unit", unit, unitDisplay: "short" }).format(n);
}

// A prior's label: its Study Date when the de-identified data kept one, else when it came in.
function priorLabel(p) {
  const d = /^(\d{4})(\d{2})(\d{2})$/.exec(p.study_date || "");
  return `${d ? esc(`${d[1]}-${d[2]}-${d[3]}`) : when(p.received_at)} ${esc(p.modality)}`;
}

async function loadWorklist() {
  const r = await api("/worklist", { headers: etag ? { "If-None-Match": etag } : {} });
  if (r.status === 401) return (location.href = "/read/login");
  if (r.status === 304 || !r.ok) return false;
  etag = r.headers.get("ETag");
  const body = await r.json();
  rows = body.rows;
  countText = body.count;
  return true;
}

function renderWorklist() {
  study = null;
  const ai = (row) =>
    row.ai_failed
      ? esc(t.ai_failed)
      : row.ai_summary.length
        ? row.ai_summary.map((f) => lang(f.display[me.locale] || f.label)).join(", ")
        : esc(t.ai_none);
  main.innerHTML = `<h2>${esc(t.worklist)} · <span id="count">${esc(countText)}</span></h2>
  <table id="worklist"><thead><tr><th>${esc(t.priority)}</th><th>${esc(t.deadline)}</th>
  <th>${esc(t.modality)}</th><th>${esc(t.body_part)}</th><th>${esc(t.ai)}</th>
  <th>${esc(t.agreement)}</th><th>${esc(t.age)}</th><th>${esc(t.status)}</th></tr></thead><tbody>
  ${rows
    .map(
      (r, i) => `<tr data-id="${r.study_id}" class="${r.priority} ${i === selected ? "selected" : ""}">
      <td class="priority">${esc(r.priority.toUpperCase())}</td><td>${countdown(r.deadline)}<br><small>${when(r.deadline)}</small></td>
      <td>${esc(r.modality)}</td><td>${esc(r.body_part)}</td><td>${ai(r)}</td>
      <td>${esc(r.hospital)}</td><td>${age(r.received_at)}</td>
      <td>${esc(t[r.status] || r.status)}${r.claimed_by ? ` (${esc(r.claimed_by)})` : ""}</td></tr>`,
    )
    .join("")}</tbody></table>`;
  document.querySelectorAll("#worklist tbody tr").forEach((tr) =>
    tr.addEventListener("click", () => openStudy(Number(tr.dataset.id))),
  );
}

// Leaving a study gives it back (another reader may take it); a saved draft stays.
function releaseCurrent() {
  if (study) api(`/studies/${study.study_id}/release`, { method: "POST" });
}

async function openStudy(id) {
  if (study && study.study_id !== id) releaseCurrent();
  const claim = await api(`/studies/${id}/claim`, { method: "POST" });
  if (!claim.ok) {
    alert((await claim.json()).detail);
    return;
  }
  study = await (await api(`/studies/${id}`)).json();
  const editable = study.reports.filter((r) => r.status !== "final").pop();
  const content = editable ? editable.content : {};
  draft = {
    decisions: content.decisions || {},
    added: content.added || [],
    impression: content.impression || "",
    impression_language: content.impression_language || me.locale,
    communications: content.communications || [],
  };
  focusFinding = 0;
  renderStudy();
}

// The study view: the viewer (mounted once per study) beside the report panel, which is
// re-rendered on every decision without touching the viewer (its slice and window stay).
function renderStudy() {
  const s = study;
  main.innerHTML = `<div class="study">
    <section><div class="viewers"><div id="viewer"></div><div id="prior-viewer" hidden></div></div>
      <p id="viewer-status" role="status"></p>
      <p>${esc(t.priors)} (P): ${s.priors.map((p) => `<a href="#" data-prior="${p.study_id}">${priorLabel(p)}</a>`).join(" · ") || "—"}</p>
    </section>
    <aside id="panel"></aside></div>`;
  main.querySelectorAll("a[data-prior]").forEach((a) =>
    a.addEventListener("click", (e) => {
      e.preventDefault();
      togglePrior(Number(a.dataset.prior));
    }),
  );
  renderPanel();
  mountViewer();
}

function renderPanel() {
  const s = study;
  const findings = s.ai_findings
    .map((f, i) => {
      const d = draft.decisions[f.key];
      return `<div class="finding ${d ? d.decision : ""} ${i === focusFinding ? "focus" : ""}" data-i="${i}">
        <b>${lang(f.display[me.locale] || f.label)}</b> ${(f.probability * 100).toFixed(0)}%
        · ${esc(f.model_name)} ${esc(f.model_version)}
        <button data-act="accept" data-key="${esc(f.key)}">${esc(t.accept)} (A)</button>
        <button data-act="reject" data-key="${esc(f.key)}">${esc(t.reject)} (R)</button>
        ${d && d.reason ? `<div>${esc(t.reason)}: ${esc(d.reason)}</div>` : ""}
      </div>`;
    })
    .join("");
  const options = s.template.findings
    .map((f) => `<option value="${esc(f.scheme)}:${esc(f.code)}">${lang(f.term)}${f.critical ? " ⚠" : ""}</option>`)
    .join("");
  const added = draft.added
    .map((a) => {
      const f = s.template.findings.find((x) => x.scheme === a.scheme && x.code === a.code);
      return `<li>${lang(f ? f.term : `${a.scheme}:${a.code}`)}</li>`;
    })
    .join("");
  const critical = criticalOpen();
  const deadline = new Date(new Date(s.received_at).getTime() + s.sla_minutes * 60000).toISOString();
  const panel = document.getElementById("panel");
  panel.innerHTML = `
      <h2>${esc(s.priority.toUpperCase())} · ${esc(s.modality)} · ${esc(s.hospital)}</h2>
      <p>${esc(t.deadline)}: ${countdown(deadline)} · ${when(deadline)}</p>
      <p class="demo">${s.intended_use.map(esc).join("; ")}</p>
      <h3>${esc(t.ai)}</h3>${findings || `<p>${esc(s.ai_state === "failed" ? t.ai_failed : t.ai_none)}</p>`}
      <h3>${esc(s.template.title)}</h3>
      <select id="add">${options}</select> <button id="add-btn">${esc(t.add_finding)}</button>
      <ul id="added">${added}</ul>
      ${critical.length ? `<div class="critical" id="critical">${esc(t.critical)}: ${critical.map((c) => lang(c.term)).join(", ")}
        <label>${esc(t.recipient)} <input id="recipient"></label>
        <label>${esc(t.method)} <select id="method"><option value="phone">phone</option><option value="in_person">in person</option><option value="secure_message">message</option></select></label>
        <button id="communicate">${esc(t.communicate)}</button></div>` : ""}
      <h3>${esc(t.impression)}</h3>
      <textarea id="impression" lang="${esc(me.lang_tag)}">${esc(draft.impression)}</textarea>
      <p><button id="save">${esc(t.save)}</button>
      <button id="sign-preliminary">${esc(t.sign_preliminary)}</button>
      <button id="sign-final">${esc(t.sign_final)} (S)</button></p>
      <p id="result" role="status"></p>`;
  panel.querySelectorAll("button[data-act]").forEach((b) =>
    b.addEventListener("click", () => decide(b.dataset.key, b.dataset.act)),
  );
  document.getElementById("add-btn").addEventListener("click", () => {
    const [scheme, code] = document.getElementById("add").value.split(":");
    keepImpression();
    draft.added.push({ scheme, code });
    renderPanel();
  });
  document.getElementById("communicate")?.addEventListener("click", communicate);
  document.getElementById("save").addEventListener("click", () => save(true));
  document.getElementById("sign-preliminary").addEventListener("click", () => sign("preliminary"));
  document.getElementById("sign-final").addEventListener("click", () => sign("final"));
}

function criticalOpen() {
  const told = new Set(draft.communications.map((c) => c.finding));
  const out = [];
  for (const a of draft.added) {
    const f = study.template.findings.find((x) => x.scheme === a.scheme && x.code === a.code);
    if (f && f.critical && !told.has(`${a.scheme}:${a.code}`)) out.push(f);
  }
  for (const f of study.ai_findings) {
    const tf = study.template.findings.find((x) => x.scheme === f.scheme && x.code === f.code);
    const d = draft.decisions[f.key];
    if (tf && tf.critical && d && d.decision === "accepted" && !told.has(`${f.scheme}:${f.code}`)) out.push(tf);
  }
  return out;
}

function keepImpression() {
  const el = document.getElementById("impression");
  if (el) draft.impression = el.value;
}

function decide(key, act) {
  keepImpression();
  if (act === "accept") draft.decisions[key] = { decision: "accepted" };
  else {
    const reason = prompt(t.reason);
    if (!reason) return;
    draft.decisions[key] = { decision: "rejected", reason };
  }
  // The keyboard's A/R act on the focused finding; deciding it moves the focus to the next.
  const i = study.ai_findings.findIndex((f) => f.key === key);
  if (i === focusFinding) focusFinding = Math.min(i + 1, study.ai_findings.length - 1);
  renderPanel();
}

function communicate() {
  keepImpression();
  const recipient = document.getElementById("recipient").value.trim();
  if (!recipient) return;
  const now = new Date().toISOString();
  for (const f of criticalOpen()) {
    draft.communications.push({
      finding: `${f.scheme}:${f.code}`,
      recipient,
      method: document.getElementById("method").value,
      communicated_at: now,
      received_at: now,
    });
  }
  renderPanel();
}

async function save(show) {
  keepImpression();
  draft.impression_language = me.locale;
  const r = await api(`/studies/${study.study_id}/report`, { method: "PUT", body: JSON.stringify(draft) });
  const body = await r.json();
  if (show || !r.ok) document.getElementById("result").textContent = r.ok ? `✓ v${body.version}` : body.detail;
  return r.ok;
}

async function sign(status) {
  if (!(await save(false))) return;
  const r = await api(`/studies/${study.study_id}/sign?status=${status}`, { method: "POST" });
  const body = await r.json();
  const out = document.getElementById("result");
  out.textContent = r.ok ? `${t.signed}: ${body.status} v${body.version}` : body.detail;
  out.className = r.ok ? "" : "error";
  if (r.ok && status === "final") setTimeout(back, 800);
}

async function mountViewer() {
  const el = document.getElementById("viewer");
  const series = study.series.find((s) => s.modality !== "SR" && s.modality !== "SEG") || study.series[0];
  if (!series) return;
  if (viewer) {
    viewer.destroy?.();
    viewer = null;
  }
  try {
    const { mountViewer } = await import("/read/static/viewer/viewer.js");
    viewer = await mountViewer(el, {
      wadoRsRoot: "/read/dicomweb",
      studyInstanceUID: study.study_uid,
      seriesInstanceUID: series.series_uid,
      markers: study.markers.filter((m) => m.series_uid === series.series_uid),
      segSopInstanceUID: study.seg_sop_instance_uid,
      segSeriesInstanceUID: study.seg_series_instance_uid,
    });
    // The slice position, window and SEG state under the image, kept current as the reader
    // scrolls or windows (Cornerstone dispatches these events on the viewport's element).
    for (const name of ["CORNERSTONE_STACK_NEW_IMAGE", "CORNERSTONE_VOI_MODIFIED"]) {
      el.addEventListener(name, viewerStatus);
    }
    viewerStatus();
    viewer.ready.then(viewerStatus);
  } catch (err) {
    el.textContent = `viewer unavailable: ${err}`;
  }
}

function viewerStatus() {
  const out = document.getElementById("viewer-status");
  if (!out || !viewer) return;
  const s = viewer.getState();
  out.dataset.index = s.index;
  out.dataset.count = s.count;
  out.dataset.sop = s.sopInstanceUID || "";
  out.dataset.seg = s.segLoaded ? (s.segVisible ? "shown" : "hidden") : s.segError ? "failed" : "none";
  const win = s.windowWidth == null ? "" : ` · W ${Math.round(s.windowWidth)} L ${Math.round(s.windowCenter)}`;
  const seg = s.segLoaded ? " · SEG" : s.segError ? ` · SEG: ${s.segError}` : "";
  out.textContent = `${s.index + 1} / ${s.count}${win}${seg}`;
}

// A prior study of the same patient and agreement, in a second viewport beside the current one
// (its detail is fetched through the API, so the view is audited like any other).
async function togglePrior(priorId) {
  const el = document.getElementById("prior-viewer");
  if (!el) return;
  priorViewer?.destroy?.();
  priorViewer = null;
  if (!el.hidden && el.dataset.study === String(priorId)) {
    el.hidden = true;
    el.parentElement.classList.remove("split");
    return;
  }
  const r = await api(`/studies/${priorId}`);
  if (!r.ok) return;
  const prior = await r.json();
  const series = prior.series.find((x) => x.modality !== "SR" && x.modality !== "SEG") || prior.series[0];
  if (!series) return;
  el.hidden = false;
  el.dataset.study = String(priorId);
  el.parentElement.classList.add("split");
  const { mountViewer } = await import("/read/static/viewer/viewer.js");
  priorViewer = await mountViewer(el, {
    wadoRsRoot: "/read/dicomweb",
    studyInstanceUID: prior.study_uid,
    seriesInstanceUID: series.series_uid,
    markers: [],
  });
}

function back() {
  releaseCurrent();
  viewer?.destroy?.();
  priorViewer?.destroy?.();
  viewer = priorViewer = null;
  etag = null;
  loadWorklist().then(renderWorklist);
}

const presets = { 1: "lung", 2: "mediastinum", 3: "bone", 4: "brain" };
document.addEventListener("keydown", (e) => {
  if (study && e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    return sign("final"); // Ctrl+Enter signs from anywhere, the impression included
  }
  if (["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement?.tagName)) return;
  if (!study) {
    if (e.key === "j") selected = Math.min(selected + 1, rows.length - 1);
    else if (e.key === "k") selected = Math.max(selected - 1, 0);
    else if (e.key === "Enter" && rows[selected]) return openStudy(rows[selected].study_id);
    else return;
    renderWorklist();
    return;
  }
  const f = study.ai_findings[focusFinding];
  if (e.key === "Escape") back();
  else if (presets[e.key]) viewer?.setPreset(presets[e.key]);
  else if (e.key === "ArrowDown") (viewer?.scroll(1), e.preventDefault());
  else if (e.key === "ArrowUp") (viewer?.scroll(-1), e.preventDefault());
  else if (e.key === "a" && f) decide(f.key, "accept");
  else if (e.key === "r" && f) decide(f.key, "reject");
  else if (e.key === "s") sign("final");
  else if (e.key === "p" && study.priors.length) togglePrior(study.priors[0].study_id);
  else if (e.key === "i") {
    e.preventDefault(); // focus the impression without typing the "i" into it
    document.getElementById("impression")?.focus();
  }
  else if (e.key === "j" || e.key === "k") {
    const i = rows.findIndex((r) => r.study_id === study.study_id) + (e.key === "j" ? 1 : -1);
    if (rows[i]) openStudy(rows[i].study_id);
  }
});

async function start() {
  const r = await api("/me");
  if (r.status === 401) return (location.href = "/read/login");
  me = await r.json();
  t = me.messages;
  document.documentElement.lang = me.lang_tag;
  document.title = t.title;
  document.getElementById("who").textContent = `${me.username} (${me.observer_id})`;
  document.getElementById("demo").textContent = t.not_for_diagnosis;
  document.getElementById("keys").textContent = t.keys;
  const logout = document.getElementById("logout");
  logout.textContent = t.sign_out;
  logout.addEventListener("click", async () => {
    await api("/logout", { method: "POST" });
    location.href = "/read/login";
  });
  const hash = location.hash.match(/^#\/study\/(\d+)$/);
  await loadWorklist();
  if (hash) return openStudy(Number(hash[1]));
  renderWorklist();
  setInterval(async () => {
    if (!study && (await loadWorklist())) renderWorklist();
  }, 5000);
}
start();
