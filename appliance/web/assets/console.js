// homescale web console: plain DOM, no framework, no inline script (the CSP forbids it).
// Data only ever enters the page as text (textContent), never as HTML.
"use strict";

const state = { csrf: "", role: "", view: "nodes", overview: null, policyMode: "" };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k === "class") e.className = v;
    else if (v === true) e.setAttribute(k, "");
    else if (v !== false && v != null) e.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c != null) e.append(c instanceof Node ? c : String(c));
  return e;
}

function flash(message, error) {
  const f = $("#flash");
  f.textContent = message;
  f.className = error ? "error" : "";
  f.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { f.hidden = true; }, error ? 12000 : 4000);
}

async function call(method, path, body) {
  const headers = { "X-CSRF-Token": state.csrf };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let obj = {};
  try { obj = text ? JSON.parse(text) : {}; } catch { obj = { detail: text }; }
  if (!r.ok) {
    const err = new Error(obj.detail || `HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return obj;
}
const api = (method, path, body) => call(method, "api/v1" + path, body);

async function act(what, fn) {
  try {
    await fn();
    flash(what + ": done");
    await refresh();
  } catch (e) {
    flash(what + ": " + e.message, true);
  }
}

const when = (iso) => {
  if (!iso || iso.startsWith("0001-")) return "never";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
};
const EXIT = ["0.0.0.0/0", "::/0"];

// ---------------------------------------------------------------- nodes

function nodeCard(n) {
  const name = n.givenName || n.name;
  const owner = n.user ? n.user.name : "";
  const routes = (n.availableRoutes || []).filter((r) => !EXIT.includes(r));
  const approved = new Set(n.approvedRoutes || []);
  const offersExit = EXIT.every((r) => (n.availableRoutes || []).includes(r));
  const isExit = EXIT.every((r) => approved.has(r));
  const fact = (label, value) => el("span", {}, label + " ", el("b", {}, value || "—"));

  const rename = el("form", { class: "rename", on: { submit: (ev) => {
    ev.preventDefault();
    const v = ev.target.elements.name.value.trim();
    act(`rename ${name}`, () => api("POST", `/node/${n.id}/rename/${encodeURIComponent(v)}`));
  } } }, el("input", { name: "name", value: name, "aria-label": "new name", required: true }),
  el("button", { class: "secondary" }, "Rename"));

  const actions = el("div", { class: "actions" }, rename);
  if (state.role === "admin") {
    actions.append(el("form", { class: "tags", on: { submit: (ev) => {
      ev.preventDefault();
      const tags = ev.target.elements.tags.value.split(/[\s,]+/).filter(Boolean);
      act(`tags of ${name}`, () => api("POST", `/node/${n.id}/tags`, { tags }));
    } } }, el("input", { name: "tags", value: (n.tags || []).join(", "), placeholder: "tag:server" }),
    el("button", { class: "secondary" }, "Set tags")));
    if (routes.length || offersExit) {
      const boxes = routes.map((r) => el("label", {}, el("input", {
        type: "checkbox", value: r, checked: approved.has(r), class: "route" }), " " + r));
      if (offersExit) boxes.push(el("label", { class: "exit" }, el("input", {
        type: "checkbox", class: "exit-node", checked: isExit }), " exit node"));
      actions.append(el("form", { class: "routes", on: { submit: (ev) => {
        ev.preventDefault();
        const f = ev.target;
        const chosen = [...f.querySelectorAll("input.route:checked")].map((i) => i.value);
        if (f.querySelector("input.exit-node")?.checked) chosen.push(...EXIT);
        act(`routes of ${name}`, () => api("POST", `/node/${n.id}/approve_routes`, { routes: chosen }));
      } } }, ...boxes, el("button", { class: "secondary" }, "Approve routes")));
    }
    if (n.approved === false) actions.append(el("button", { on: { click: () =>
      act(`approve ${name}`, () => api("POST", `/node/${n.id}/approve`)) } }, "Approve device"));
  }
  actions.append(
    el("button", { class: "secondary", on: { click: () =>
      act(`expire ${name}`, () => api("POST", `/node/${n.id}/expire`, {})) } }, "Expire"),
    el("button", { class: "danger", on: { click: () => {
      if (confirm(`Delete node ${name}? It must sign in again to rejoin.`))
        act(`delete ${name}`, () => api("DELETE", `/node/${n.id}`));
    } } }, "Delete"));

  // While someone edits a card, live refreshes leave it alone (renderNodes); acting on
  // it (a submit or a button) hands it back to them.
  const edited = (ev) => { ev.currentTarget.dataset.dirty = "1"; };
  const acted = (ev) => { delete ev.currentTarget.dataset.dirty; };
  return el("article", { class: "node", "data-id": n.id, "data-name": name,
    on: { input: edited, change: edited, submit: acted, click: (ev) => {
      if (ev.target.closest("button")) acted(ev);
    } } },
    el("div", { class: "node-head" },
      el("span", { class: "dot" + (n.online ? " on" : ""), title: n.online ? "online" : "offline" }),
      el("span", { class: "node-name" }, name),
      el("span", { class: "status" }, n.online ? "online" : "offline"),
      n.approved === false ? el("span", { class: "tag" }, "awaiting approval") : null,
      ...(n.tags || []).map((t) => el("span", { class: "tag" }, t))),
    el("div", { class: "facts" },
      fact("MagicDNS", n.magicDns),
      fact("addresses", (n.ipAddresses || []).join(", ")),
      fact("user", owner),
      fact("OS", [n.os, n.osVersion].filter(Boolean).join(" ")),
      fact("client", n.clientVersion),
      fact("DERP", n.derpRegion ? `region ${n.derpRegion}` +
        (n.derpLatencyMs != null ? ` (${n.derpLatencyMs} ms)` : "") : ""),
      fact("last seen", n.online ? "now" : when(n.lastSeen)),
      fact("expires", when(n.expiry)),
      fact("routes", [...routes.map((r) => r + (approved.has(r) ? " ✓" : " (not approved)")),
        ...(offersExit ? ["exit node" + (isExit ? " ✓" : " (not approved)")] : [])].join(", "))),
    actions);
}

function renderNodes() {
  const nodes = state.overview ? state.overview.nodes : [];
  $("#node-count").textContent = `${nodes.filter((n) => n.online).length} of ${nodes.length} online`;
  const editing = new Map([...document.querySelectorAll("#nodes article[data-dirty]")]
    .map((a) => [a.dataset.id, a]));
  $("#nodes").replaceChildren(...nodes.map((n) => editing.get(String(n.id)) || nodeCard(n)));
  if (!nodes.length) $("#nodes").append(el("p", {}, "No nodes yet. Create a pre-auth key and run tailscale up --login-server " + state.serverUrl));
}

// ---------------------------------------------------------------- users

function renderUsers() {
  const users = state.overview ? state.overview.users : [];
  if ($("#users").contains(document.activeElement)) return;  // someone is typing a new name
  $("#users").replaceChildren(...users.map((u) => el("tr", {},
    el("td", {}, u.id), el("td", {}, u.name), el("td", {}, u.displayName || ""), el("td", {}, u.email || ""),
    el("td", {}, el("form", { class: "rename-user", on: { submit: (ev) => {
      ev.preventDefault();
      const v = ev.target.elements.name.value.trim();
      act(`rename user ${u.name}`, () => api("POST", `/user/${u.id}/rename/${encodeURIComponent(v)}`));
    } } }, el("input", { name: "name", value: u.name, "aria-label": "new name", required: true }),
    el("button", { class: "secondary" }, "Rename")),
    el("button", { class: "danger", on: { click: () => {
      if (confirm(`Delete user ${u.name}?`)) act(`delete user ${u.name}`, () => api("DELETE", `/user/${u.id}`));
    } } }, "Delete")))));
  const sel = $("#key-create select[name=user]");
  const keep = sel.value;
  sel.replaceChildren(el("option", { value: "" }, "(none: tagged)"),
    ...users.map((u) => el("option", { value: u.id }, u.name)));
  if (keep) sel.value = keep;
}

// ---------------------------------------------------------------- pre-auth keys

async function renderKeys() {
  const { preAuthKeys } = await api("GET", "/preauthkey");
  $("#keys").replaceChildren(...preAuthKeys.map((k) => el("tr", {},
    el("td", {}, k.id), el("td", {}, k.user ? k.user.name : ""), el("td", {}, el("code", {}, k.key)),
    el("td", {}, [k.reusable && "reusable", k.ephemeral && "ephemeral", k.used && "used"].filter(Boolean).join(", ")),
    el("td", {}, (k.aclTags || []).join(", ")), el("td", {}, when(k.expiration)),
    el("td", {}, el("button", { class: "secondary", on: { click: () =>
      act(`expire key ${k.id}`, () => api("POST", "/preauthkey/expire", { id: k.id })) } }, "Expire"),
    state.role === "admin" ? el("button", { class: "danger", on: { click: () =>
      act(`delete key ${k.id}`, () => api("DELETE", `/preauthkey?id=${k.id}`)) } }, "Delete") : null))));
}

function copyFrom(input) {
  input.select();
  (navigator.clipboard ? navigator.clipboard.writeText(input.value) : Promise.reject())
    .then(() => flash("copied"), () => { document.execCommand && document.execCommand("copy"); });
}

// ---------------------------------------------------------------- API keys, pending, audit

async function renderApiKeys() {
  const { apiKeys } = await api("GET", "/apikey");
  $("#apikeys").replaceChildren(...apiKeys.map((k) => el("tr", {},
    el("td", {}, k.id), el("td", {}, el("code", {}, k.prefix)), el("td", {}, when(k.createdAt)),
    el("td", {}, when(k.expiration)), el("td", {}, when(k.lastSeen)),
    el("td", {}, el("button", { class: "secondary", on: { click: () =>
      act(`expire API key ${k.prefix}`, () => api("POST", "/apikey/expire", { id: k.id })) } }, "Expire"),
    el("button", { class: "danger", on: { click: () =>
      act(`delete API key ${k.prefix}`, () => api("DELETE", `/apikey/?id=${k.id}`)) } }, "Delete")))));
}

function pendingCard(p) {
  const actions = el("div", { class: "actions" });
  if (p.kind === "login") {
    actions.append(el("form", { class: "register", on: { submit: (ev) => {
      ev.preventDefault();
      const user = ev.target.elements.user.value.trim();
      act(`register ${p.hostname}`, () => api("POST", "/auth/register", { user, authId: p.authId }));
    } } }, el("input", { name: "user", placeholder: "for user", required: true, "aria-label": "user" }),
    el("button", {}, "Register")),
    el("button", { class: "danger", on: { click: () =>
      act(`reject ${p.hostname}`, () => api("POST", "/auth/reject", { authId: p.authId })) } }, "Reject"));
  } else if (p.kind === "device-approval") {
    actions.append(el("button", { on: { click: () =>
      act(`approve ${p.hostname}`, () => api("POST", `/node/${p.nodeId}/approve`)) } }, "Approve"),
    el("button", { class: "danger", on: { click: () =>
      act(`reject ${p.hostname}`, () => api("POST", `/node/${p.nodeId}/reject`)) } }, "Reject"));
  } else if (p.kind === "ssh-check") {
    actions.append(el("button", { on: { click: () =>
      act(`approve SSH ${p.hostname}`, () => api("POST", "/auth/approve", { authId: p.authId })) } }, "Approve"));
  }
  return el("article", { class: "node pending", "data-kind": p.kind, "data-name": p.hostname },
    el("div", { class: "node-head" }, el("span", { class: "node-name" }, p.hostname || "(unnamed)"),
      el("span", { class: "tag" }, p.kind), p.user ? el("span", {}, "user " + p.user) : null,
      el("span", { class: "muted" }, "since " + when(p.createdAt))),
    el("div", { class: "facts" }, el("span", {}, "machine key ", el("b", {}, p.machineKey || ""))),
    actions);
}

async function renderPending() {
  const { pending } = await api("GET", "/auth");
  $("#pending").replaceChildren(...(pending.length ? pending.map(pendingCard)
    : [el("p", {}, "Nothing is waiting: no logins, SSH checks or device approvals.")]));
}

async function renderHealth() {
  const h = await call("GET", "health");
  const fact = (label, value) => el("span", {}, label + " ", el("b", {}, value));
  const cert = h.certificate.notAfter
    ? `${when(h.certificate.notAfter)} (${h.certificate.daysLeft} days)` : "none (TLS off or by a proxy)";
  $("#health-summary").replaceChildren(
    fact("database", h.database ? "reachable" : "UNREACHABLE"),
    fact("nodes", `${h.online} of ${h.nodes} online`),
    fact("quarantined rows", String(h.quarantined)),
    fact("policy", h.policy),
    fact("embedded DERP", h.derp.embedded ? `on (region ${h.derp.region})` : "off"),
    fact("STUN", h.derp.stun || "off"),
    fact("certificate expires", cert));
  $("#health-regions").replaceChildren(...h.derp.regions.map((r) => el("tr", {},
    el("td", {}, r.id), el("td", {}, r.code), el("td", {}, r.name),
    el("td", {}, r.relays.join(", ")), el("td", {}, `${r.homeOf} nodes`))));
  $("#health-metrics").replaceChildren(...Object.entries(h.metrics).map(([k, v]) =>
    el("tr", {}, el("td", {}, el("code", {}, k)), el("td", {}, String(v)))));
}

async function renderAudit() {
  const { entries } = await call("GET", "audit");
  $("#audit").replaceChildren(...entries.map((a) => el("tr", {},
    el("td", {}, when(a.time)), el("td", {}, a.who), el("td", {}, a.action),
    el("td", {}, a.target), el("td", { class: a.outcome === "ok" ? "" : "bad" }, a.outcome))));
}

// ---------------------------------------------------------------- policy

async function loadPolicy() {
  const text = $("#policy-text");
  const file = state.policyMode !== "database";
  $("#policy-mode").textContent = file
    ? `policy.mode is file: this is ${state.policyPath || "the policy file"}, read-only here. Edit that file on the server; homescale reloads it when it changes (or on SIGHUP).`
    : "policy.mode is database: Save stores the policy and it takes effect at once.";
  text.readOnly = file;
  $("#policy-save").hidden = file;
  try {
    text.value = (await api("GET", "/policy")).policy;
  } catch (e) {
    if (e.status === 404) text.value = ""; else throw e;
  }
  highlight(0);
}

// HuJSON highlighting: strings (keys apart), numbers, true/false/null, comments.
const TOKENS = /("(?:[^"\\\n]|\\.)*"?)(\s*:)?|(\/\/[^\n]*|\/\*[\s\S]*?(?:\*\/|$))|(-?\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b)|\b(true|false|null)\b/g;

function highlight(badLine) {
  const text = $("#policy-text").value;
  const out = [];
  const lines = text.split("\n");
  lines.forEach((line, i) => {
    const span = el("span", { class: i + 1 === badLine ? "hl-bad" : null });
    let last = 0;
    for (const m of line.matchAll(TOKENS)) {
      if (m.index > last) span.append(line.slice(last, m.index));
      const cls = m[1] ? (m[2] ? "hl-key" : "hl-str") : m[3] ? "hl-com" : m[4] ? "hl-num" : "hl-kw";
      span.append(el("span", { class: cls }, m[1] || m[0]));
      if (m[1] && m[2]) span.append(m[2]);
      last = m.index + m[0].length;
    }
    span.append(line.slice(last));
    out.push(span, i < lines.length - 1 ? "\n" : "\n ");
  });
  $("#policy-highlight").replaceChildren(...out);
  $("#policy-highlight").scrollTop = $("#policy-text").scrollTop;
}

async function policyPreview() {
  const policy = $("#policy-text").value;
  try {
    const { nodes } = await call("POST", "policy/preview", { policy });
    const table = $("#policy-reach");
    table.querySelector("tbody").replaceChildren(...nodes.map((n) => el("tr", { "data-node": n.node },
      el("td", {}, n.node),
      el("td", {}, n.from.length ? n.from.map((f) => `${f.node} (${f.ports.join(", ")})`).join("; ")
        : "nobody"))));
    table.hidden = false;
    showPolicyResult(true, "Preview of the draft (nothing saved): who may open connections to each node.");
  } catch (e) {
    $("#policy-reach").hidden = true;
    showPolicyResult(false, e.message);
  }
}

function showPolicyResult(ok, message) {
  const out = $("#policy-result");
  out.hidden = false;
  out.className = ok ? "" : "error";
  out.textContent = message;
  const m = /\(line (\d+)\)/.exec(message);
  highlight(!ok && m ? Number(m[1]) : 0);
  if (!ok && m) {  // put the cursor on the named line
    const text = $("#policy-text");
    const line = Number(m[1]);
    const lines = text.value.split("\n");
    const start = lines.slice(0, line - 1).reduce((a, l) => a + l.length + 1, 0);
    text.focus();
    text.setSelectionRange(start, start + (lines[line - 1] || "").length);
    out.dataset.line = String(line);
  }
}

async function policyAction(save) {
  const policy = $("#policy-text").value;
  try {
    if (save) await api("PUT", "/policy", { policy });
    else await api("POST", "/policy/check", { policy });
    showPolicyResult(true, save ? "Saved: the policy is in force." : "The policy is valid and its tests pass.");
  } catch (e) {
    showPolicyResult(false, e.message);
  }
}

// ---------------------------------------------------------------- views, live updates

const renderers = {
  nodes: renderNodes, users: renderUsers, keys: renderKeys, apikeys: renderApiKeys,
  pending: renderPending, audit: renderAudit, health: renderHealth, policy: async () => {},
};

async function refresh() {
  try {
    state.overview = await call("GET", "overview");
    renderUsers();
    await renderers[state.view]();
  } catch (e) {
    if (e.status === 401) return showSignIn(e.message);
    flash(e.message, true);
  }
}

function show(view) {
  if (!renderers[view]) view = "nodes";
  state.view = view;
  document.querySelectorAll(".view").forEach((s) => { s.hidden = s.id !== "view-" + view; });
  document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  if (view === "policy") loadPolicy().catch((e) => flash(e.message, true));
  else refresh();
}

let pendingRefresh = null;
function live() {
  const es = new EventSource("events");
  es.addEventListener("hello", () => $("#live").classList.remove("off"));
  es.addEventListener("change", () => {
    clearTimeout(pendingRefresh);
    pendingRefresh = setTimeout(() => { if (state.view !== "policy") refresh(); }, 150);
  });
  es.onerror = () => {
    $("#live").classList.add("off");
    if (!state.csrf) es.close();
  };
  state.events = es;
}

function showSignIn(message) {
  state.csrf = "";
  if (state.events) state.events.close();
  document.querySelectorAll(".view").forEach((s) => { s.hidden = true; });
  $("#tabs").hidden = true;
  $("#signout").hidden = true;
  $("#whoami").textContent = "";
  $("#signin").hidden = false;
  if (message) $("#signin-hint").textContent = message;
}

async function start() {
  let s;
  try {
    s = await call("GET", "session");
  } catch (e) {
    $("#signin-oidc").hidden = !/identity provider/.test(e.message);
    return showSignIn(e.message.replace(/^sign in first: /, ""));
  }
  Object.assign(state, { csrf: s.csrf, role: s.role, policyMode: s.policyMode,
    policyPath: s.policyPath, serverUrl: s.serverUrl });
  $("#whoami").textContent = `${s.who} (${s.role})`;
  $("#tabs").hidden = false;
  $("#signout").hidden = false;
  document.querySelectorAll("[data-admin]").forEach((e) => { e.hidden = s.role !== "admin"; });
  live();
  show(location.hash.slice(1) || "nodes");
}

window.addEventListener("hashchange", () => show(location.hash.slice(1)));
document.addEventListener("DOMContentLoaded", () => {
  $("#signout").addEventListener("click", async () => {
    try { await call("POST", "logout"); } catch (e) { /* signed out either way */ }
    showSignIn("Signed out.");
  });
  $("#policy-check").addEventListener("click", () => policyAction(false));
  $("#policy-save").addEventListener("click", () => policyAction(true));
  $("#policy-preview").addEventListener("click", policyPreview);
  $("#policy-text").addEventListener("input", () => highlight(0));
  $("#policy-text").addEventListener("scroll", () => {
    $("#policy-highlight").scrollTop = $("#policy-text").scrollTop;
  });
  $("#user-create").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = ev.target.elements.name.value.trim();
    act(`create user ${name}`, () => api("POST", "/user", { name })).then(() => ev.target.reset());
  });
  $("#key-create").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target.elements;
    const body = {
      user: f.user.value || undefined, reusable: f.reusable.checked, ephemeral: f.ephemeral.checked,
      expiration: new Date(Date.now() + Number(f.hours.value || 24) * 3600e3).toISOString(),
      aclTags: f.tags.value.split(/[\s,]+/).filter(Boolean),
    };
    try {
      const { preAuthKey } = await api("POST", "/preauthkey", body);
      $("#new-key-value").value = preAuthKey.key;
      $("#new-key").hidden = false;
      const { svg } = await call("POST", "qr", { text: preAuthKey.key });
      $("#new-key-qr").src = svg;
      $("#new-key-qr").hidden = false;
      await refresh();
    } catch (e) { flash("create key: " + e.message, true); }
  });
  $("#new-key-copy").addEventListener("click", () => copyFrom($("#new-key-value")));
  $("#apikey-create").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const days = Number(ev.target.elements.days.value || 90);
    try {
      const { apiKey } = await api("POST", "/apikey", { expiration: new Date(Date.now() + days * 864e5).toISOString() });
      $("#new-apikey-value").value = apiKey;
      $("#new-apikey").hidden = false;
      await refresh();
    } catch (e) { flash("create API key: " + e.message, true); }
  });
  $("#new-apikey-copy").addEventListener("click", () => copyFrom($("#new-apikey-value")));
  start();
});
