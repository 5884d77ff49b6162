// Baker's dashboard. Everything on the page is built with DOM calls and textContent: no value
// from the directory is ever parsed as HTML. The table comes from the watch stream
// (GET /v1/watch?v=2, read with a streaming fetch); ambassadors, maintenance and the history
// are read once a second, and at once after each change.
'use strict';

const POLL_MS = 1000;
const RETRY_MS = 1000;
const EVENTS_SHOWN = 200;

const body = document.body;
const TOKEN_REQUIRED = body.dataset.tokenRequired === 'true';
// Reads need a token too (BAKER_READ=token): nothing is shown until one that reads is given.
const READ_TOKEN_REQUIRED = body.dataset.readTokenRequired === 'true';
const TOKEN_KEY = 'baker.token';

const S = {
  index: null,
  services: {},
  routes: {},
  ambassadors: [],
  traffic: {},
  // When each ambassador last reported, in this browser's clock.
  reported: {},
  // Each service's drains ({instances: {id: drain}, versions: {version: drain}}), from the
  // watch stream (or GET /v1/maintenance while polling).
  drains: {},
  // Whether the directory has the maintenance API (GET /v1/maintenance answers).
  maintenanceApi: false,
  events: null,
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  canWrite: !TOKEN_REQUIRED,
  canRead: !READ_TOKEN_REQUIRED,
  // What the token given may do, as the directory says (name, role, scope).
  grant: null,
  started: false,
  live: 'connecting',
};

// ---- small DOM helpers -------------------------------------------------------------------

/** An element with attributes, and children: nodes, or strings that become text nodes. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'onclick') e.addEventListener('click', v);
    else if (k === 'text') e.textContent = String(v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fmtAge(ms) {
  if (!(ms >= 0)) return '-';
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

function fmtCount(n) {
  n = Number(n) || 0;
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

function fmtTime(ms) {
  const d = new Date(ms);
  return isNaN(d) ? '-' : d.toLocaleTimeString([], { hour12: false });
}

const PALETTE = ['#3d7be0', '#1f9d55', '#d9822b', '#8e5bd6', '#d64583', '#1b9aaa', '#7a8b2a', '#c0562f'];

/** A colour for a version or route target, the same wherever it is shown. */
function colour(name) {
  let h = 0;
  for (const c of String(name)) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

// ---- talking to the directory ------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (S.token) h.Authorization = `Bearer ${S.token}`;
  return h;
}

/** A call of the API; resolves to the decoded answer, or throws an Error with its message. */
async function api(method, path, payload) {
  const init = { method, headers: headers(), cache: 'no-store' };
  if (method !== 'GET') init.headers['X-Baker-Origin'] = 'ui';
  if (payload !== undefined) {
    init.body = JSON.stringify(payload);
    init.headers['Content-Type'] = 'application/json';
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const err = new Error((json && json.error) || `${method} ${path}: ${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return json;
}

let watchAbort = null;

/** Follows the watch stream forever, reconnecting (with a fresh snapshot) when it ends. */
async function watch() {
  for (;;) {
    if (!S.canRead) {
      // The token that read was taken back: nothing is read until another is given.
      await sleep(POLL_MS);
      continue;
    }
    watchAbort = new AbortController();
    try {
      const resp = await fetch('/v1/watch?v=2', {
        headers: headers(), cache: 'no-store', signal: watchAbort.signal,
      });
      if (resp.status === 401 || resp.status === 503) {
        // A watch token is needed, or every watch slot is taken: read the table instead.
        setLive('polling', resp.status === 401
          ? 'the watch stream needs a token: reading the table every second'
          : 'the directory has no free watch slot: reading the table every second');
        await pollTable();
        await sleep(POLL_MS);
        continue;
      }
      if (!resp.ok || !resp.body) throw new Error(`watch answered ${resp.status}`);
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (line && !apply(JSON.parse(line))) {
            watchAbort.abort();
            throw new Error('missed a change: resyncing');
          }
        }
      }
    } catch (_) {
      /* reconnect below */
    }
    setLive('reconnecting', 'the watch stream ended: reconnecting');
    await sleep(RETRY_MS);
  }
}

/** Applies one line of the watch stream; false when a change was missed. */
function apply(ev) {
  if (ev.type === 'snapshot') {
    S.services = ev.services || {};
    S.routes = ev.routes || {};
    S.drains = ev.maintenance || {};
    S.index = ev.index;
    setLive('live', 'following the watch stream');
  } else if (ev.type === 'ping') {
    if (ev.index !== S.index) return false;
    return true;
  } else {
    if (typeof ev.prev === 'number' && ev.prev !== S.index) return false;
    S.index = ev.index;
    if (ev.type === 'upsert' || ev.type === 'remove') {
      const inst = ev.instance;
      const list = (S.services[inst.service] || []).filter((i) => i.id !== inst.id);
      if (ev.type === 'upsert') list.push(inst);
      list.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
      if (list.length) S.services[inst.service] = list;
      else delete S.services[inst.service];
    } else if (ev.type === 'route') {
      if (ev.route) S.routes[ev.service] = ev.route;
      else delete S.routes[ev.service];
    } else if (ev.type === 'maintenance') {
      S.drains[ev.service] = ev.maintenance || {};
      restate(ev.service);
    }
    poke();
  }
  render();
  return true;
}

/** Gives a service's instances the state their drains say (after a maintenance change). */
function restate(service) {
  for (const inst of S.services[service] || []) {
    const d = drainIn(S.drains[service], inst);
    inst.state = d ? 'draining' : 'up';
    inst.reason = d && d.reason ? d.reason : null;
  }
}

/** Reads the table without the watch stream. */
async function pollTable() {
  try {
    const [svc, routes] = await Promise.all([api('GET', '/v1/services'), api('GET', '/v1/routes')]);
    S.services = svc.services || {};
    S.routes = routes.routes || {};
    S.index = Math.max(svc.index, routes.index);
    render();
  } catch (_) { /* shown by the live pill */ }
}

let pokeTimer = null;
let pokeWake = null;

/** Reads ambassadors, maintenance and history now rather than at the next tick. */
function poke() {
  if (pokeWake) pokeWake();
}

/** Reads the soft state (ambassadors) and the operator's state (maintenance, history). */
async function poll() {
  for (;;) {
    if (S.canRead) {
      await Promise.all([pollAmbassadors(), pollMaintenance(), pollEvents()]);
      render();
    }
    await new Promise((r) => {
      pokeWake = r;
      pokeTimer = setTimeout(r, POLL_MS);
    });
    clearTimeout(pokeTimer);
    pokeWake = null;
  }
}

async function pollAmbassadors() {
  try {
    const a = await api('GET', '/v1/ambassadors');
    S.ambassadors = a.ambassadors || [];
    S.traffic = a.traffic || {};
    const now = Date.now();
    S.reported = {};
    for (const amb of S.ambassadors) S.reported[amb.id] = now - amb.age_ms;
  } catch (_) { /* kept as it was */ }
}

async function pollMaintenance() {
  try {
    const m = await api('GET', '/v1/maintenance');
    S.maintenanceApi = true;
    if (S.live === 'polling') {
      // Without the watch stream, the drains come from here: {"maintenance": [entries]}.
      const drains = {};
      for (const d of m.maintenance || []) {
        const svc = drains[d.service] || (drains[d.service] = { instances: {}, versions: {} });
        if (d.id) svc.instances[d.id] = d;
        else if (d.version) svc.versions[d.version] = d;
      }
      S.drains = drains;
    }
  } catch (e) {
    if (e.status === 404) S.maintenanceApi = false;
  }
}

async function pollEvents() {
  try {
    const e = await api('GET', `/v1/events?limit=${EVENTS_SHOWN}`);
    S.events = e.events || [];
  } catch (e) {
    if (e.status === 404) S.events = null;
  }
}

// ---- what the state means -----------------------------------------------------------------

/** The drain of `inst` in a service's drains: its own, else its version's; or null. */
function drainIn(m, inst) {
  if (!m) return null;
  return (m.instances && m.instances[inst.id]) || (m.versions && m.versions[inst.version]) || null;
}

/** The drain that applies to an instance, or null. */
function drainOf(service, inst) {
  const d = drainIn(S.drains[service], inst);
  if (d) return d;
  if (inst.state === 'draining') return { reason: inst.reason || null };
  return null;
}

/** Whether an instance is drained by its own id (so undrain applies to it), not its version. */
function ownDrain(service, inst) {
  const m = S.drains[service];
  if (m && m.instances && m.instances[inst.id]) return true;
  return !drainIn(m, inst) && inst.state === 'draining';
}

/** How the live ambassadors see one server: counts by HAProxy state. */
function healthOf(service, id) {
  const states = {};
  let seen = 0;
  for (const a of S.ambassadors) {
    if (!a.live) continue;
    for (const s of a.report.servers || []) {
      if (s.service === service && s.id === id) {
        states[s.state] = (states[s.state] || 0) + 1;
        seen += 1;
      }
    }
  }
  return { states, seen };
}

function trafficOf(service, id) {
  return (S.traffic[service] && S.traffic[service][id]) || null;
}

/** A route target names another service (`barker`, `barker@2`) rather than a version. */
function crossService(target, service) {
  return target.includes('@') || (target !== service && Object.hasOwn(S.services, target) && !/^[0-9]/.test(target));
}

// ---- rendering ----------------------------------------------------------------------------

let renderQueued = false;

function render() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => {
    renderQueued = false;
    draw();
  }, 30);
}

/**
 * Makes `parent`'s children the nodes of `items` ({key, sig, build}), keeping every existing
 * child whose key and signature are unchanged: a node under the pointer or the keyboard is
 * not replaced unless what it shows changed, so a click is never lost to a refresh.
 */
function patch(parent, items) {
  const old = new Map();
  for (const c of parent.children) if (c.dataset.key !== undefined) old.set(c.dataset.key, c);
  const nodes = items.map((it) => {
    const o = old.get(it.key);
    if (o && o.dataset.sig === it.sig) return o;
    const n = it.build();
    n.dataset.key = it.key;
    n.dataset.sig = it.sig;
    return n;
  });
  const current = [...parent.children];
  const sameKeys = current.length === nodes.length
    && current.every((c, i) => c.dataset.key === nodes[i].dataset.key);
  if (!sameKeys) {
    parent.replaceChildren(...nodes);
    return;
  }
  current.forEach((c, i) => {
    if (c !== nodes[i]) c.replaceWith(nodes[i]);
  });
}

function draw() {
  const now = Date.now();
  $('index').textContent = S.index === null ? '-' : String(S.index);
  const names = [...new Set([...Object.keys(S.services), ...Object.keys(S.routes)])].sort();
  let instances = 0;
  let draining = 0;
  for (const name of names) {
    for (const inst of S.services[name] || []) {
      instances += 1;
      if (drainOf(name, inst)) draining += 1;
    }
  }
  let requests = 0;
  for (const per of Object.values(S.traffic)) for (const t of Object.values(per)) requests += t.requests || 0;
  const live = S.ambassadors.filter((a) => a.live);
  $('n-services').textContent = String(names.length);
  $('n-instances').textContent = String(instances);
  $('n-draining').textContent = String(draining);
  $('n-ambassadors').textContent = `${live.filter((a) => a.caught_up).length}/${live.length}`;
  $('n-ambassadors-label').textContent = 'ambassadors caught up';
  $('n-requests').textContent = fmtCount(requests);
  drawServices(names);
  drawAmbassadors();
  drawHistory();
  tick(now);
}

/** Refreshes the ages shown, which change with the clock rather than with the state. */
function tick(now) {
  for (const e of document.querySelectorAll('[data-since]')) {
    e.textContent = fmtAge(Math.max(0, now - Number(e.dataset.since)));
  }
  fitLabels();
}

function drawServices(names) {
  const box = $('services');
  if (!names.length) {
    patch(box, [{
      key: 'empty',
      sig: '',
      build: () => el('p', { class: 'empty' }, 'No service has a live instance or a route yet.'),
    }]);
    return;
  }
  patch(box, names.map((name) => ({
    key: `service:${name}`,
    sig: '',
    build: () => el('div', { class: 'service', 'data-service': name }),
  })));
  for (const card of box.children) fillCard(card, card.dataset.service);
}

function routeBar(segments) {
  const bar = el('div', { class: 'bar' });
  const total = segments.reduce((n, s) => n + s.share, 0);
  if (!total) {
    bar.append(el('span', { class: 'none' }, 'no instance'));
    return bar;
  }
  for (const s of segments) {
    if (!s.share) continue;
    const pct = (100 * s.share) / total;
    const seg = el('span', {
      class: s.dead ? 'seg dead' : 'seg', title: s.title, 'data-long': s.long || null, 'data-short': s.long ? s.label : null,
    }, s.label);
    seg.style.width = `${pct}%`;
    seg.style.background = s.dead ? 'repeating-linear-gradient(45deg,#b9c1cc,#b9c1cc 5px,#cfd5dd 5px,#cfd5dd 10px)' : colour(s.key);
    bar.append(seg);
  }
  return bar;
}

/** Shows each segment's long label (`v3: no instance`) where it fits, its short one elsewhere. */
function fitLabels() {
  for (const seg of document.querySelectorAll('.seg[data-long]')) {
    if (!seg.clientWidth) continue;
    if (seg.textContent !== seg.dataset.long) seg.textContent = seg.dataset.long;
    if (seg.scrollWidth > seg.clientWidth) seg.textContent = seg.dataset.short;
  }
}

/** How a route target reads on the bar: `v2` for a version, as written for another service. */
function targetLabel(target) {
  return /^[0-9]/.test(target) ? `v${target}` : target;
}

function routeSegments(service, route) {
  const live = new Set((S.services[service] || []).map((i) => i.version));
  return Object.entries(route).map(([target, pct]) => {
    const dead = !crossService(target, service) && !live.has(target);
    return {
      key: target,
      share: Number(pct) || 0,
      label: `${targetLabel(target)} ${pct}%`,
      long: dead ? `${targetLabel(target)}: no instance` : null,
      dead,
      title: dead ? `${target}: ${pct}% (no live instance of this version)` : `${target}: ${pct}%`,
    };
  });
}

/** A list as people write it: `a`, `a and b`, `a, b and c`. */
function listText(items) {
  return items.length < 2 ? items.join('') : `${items.slice(0, -1).join(', ')} and ${items.at(-1)}`;
}

/** Whether a route target has an instance that takes requests (live and not drained). */
function serves(service, target) {
  let svc = service;
  let version = target;
  if (crossService(target, service)) {
    [svc, version] = target.split('@');
    if (version === undefined || version === '*') version = null;
  }
  return (S.services[svc] || []).some((i) => (version === null || i.version === version) && !drainOf(svc, i));
}

/**
 * What happens to the shares of a route that go to versions with no live instance, as the
 * ambassadors plan it (docs/ambassador.md, "Canary splits and weights"): such a share goes to
 * the route's targets that have a serving (live, undrained) instance, in proportion to theirs;
 * when none has, the route is set aside and every serving instance takes requests by its
 * weight; with none at all, HAProxy has no server for the request and answers 503. Null when
 * every share has a live instance.
 */
function deadShareNote(service, route) {
  const segs = routeSegments(service, route).filter((s) => s.share > 0);
  const dead = segs.filter((s) => s.dead);
  if (!dead.length) return null;
  const deadPct = dead.reduce((n, s) => n + s.share, 0);
  const what = dead.length === 1
    ? `version ${dead[0].key}, which has no live instance`
    : `versions ${listText(dead.map((s) => s.key))}, which have no live instance`;
  const head = `${deadPct} % of ${service}'s traffic is routed to ${what}`;
  const takers = segs.filter((s) => !s.dead && serves(service, s.key));
  if (takers.length) {
    const total = takers.reduce((n, s) => n + s.share, 0);
    const shares = takers.map((s) => `${targetLabel(s.key)} ${Math.round((100 * s.share) / total)} %`);
    return `${head}: the ambassadors give that share to the route's other targets in proportion `
      + `(${listText(shares)}) until one of its instances registers.`;
  }
  if ((S.services[service] || []).some((i) => !drainOf(service, i))) {
    return `${head}: no target of the route has a serving instance, so the route is set aside and `
      + `every serving instance of ${service} takes requests by its weight until one registers.`;
  }
  return `${head}: no instance of ${service} takes requests, so they fail (503) until one registers.`;
}

function weightSegments(service) {
  const byVersion = {};
  for (const i of S.services[service] || []) {
    // A draining instance takes no new requests: it has no share.
    if (!drainOf(service, i)) byVersion[i.version] = (byVersion[i.version] || 0) + i.weight;
  }
  const total = Object.values(byVersion).reduce((a, b) => a + b, 0);
  return Object.entries(byVersion).map(([v, w]) => ({
    key: v,
    share: w,
    label: `${targetLabel(v)} ${Math.round((100 * w) / total)}%`,
    title: `version ${v}: weight ${w} of ${total}`,
  }));
}

function serviceHead(name) {
  const list = S.services[name] || [];
  const route = S.routes[name];
  const note = route ? deadShareNote(name, route) : null;
  return el('div', { class: 'service-head' },
    el('span', { class: 'service-name' }, name),
    el('span', { class: 'muted' }, `${list.length} instance${list.length === 1 ? '' : 's'}`),
    el('div', { class: 'route' },
      el('span', { class: 'muted route-note' }, route ? 'route' : 'by weight'),
      routeBar(route ? routeSegments(name, route) : weightSegments(name))),
    el('button', {
      class: 'small',
      type: 'button',
      'data-action': 'route',
      'data-service': name,
      disabled: !S.canWrite,
      title: S.canWrite ? 'change the split' : 'read-only: unlock changes with the token',
      onclick: () => openRoute(name),
    }, 'Edit route'),
    note ? el('p', { class: 'dead-note' }, note) : null);
}

function fillCard(card, name) {
  const list = S.services[name] || [];
  const route = S.routes[name] || null;
  const maintenance = S.maintenanceApi;
  const headSig = JSON.stringify([list.map((i) => [i.version, i.weight, Boolean(drainOf(name, i))]), route,
    S.canWrite, Object.keys(S.services)]);
  const items = [{ key: 'head', sig: headSig, build: () => serviceHead(name) }];
  if (!list.length) {
    items.push({
      key: 'empty',
      sig: '',
      build: () => el('p', { class: 'empty' }, 'No live instance: the route waits for one.'),
    });
  } else {
    items.push({ key: 'table', sig: String(maintenance), build: () => instanceTable(maintenance) });
  }
  patch(card, items);
  const tbody = card.querySelector('tbody');
  if (!tbody) return;
  patch(tbody, list.map((inst) => {
    const sig = JSON.stringify([inst, drainOf(name, inst), ownDrain(name, inst), healthOf(name, inst.id),
      trafficOf(name, inst.id), S.canWrite]);
    return { key: inst.id, sig, build: () => instanceRow(name, inst, maintenance) };
  }));
}

const AGE_MEANS = 'how long it has been in the directory (since its first registration, or since its '
  + 'container was found); the CLI\'s SEEN is when the directory last heard of it';

const ZONE_MEANS = 'the zone it runs in: its registrar\'s BAKER_ZONE, its container\'s or swarm '
  + 'service\'s baker.zone label, its swarm node\'s baker.zone label, or the BAKER_ZONE of the '
  + 'directory that found its container';

function instanceTable(maintenance) {
  return el('div', { class: 'scroll' }, el('table', { class: 'stack' },
    el('thead', {}, el('tr', {},
      el('th', {}, 'Instance'), el('th', {}, 'Version'), el('th', { class: 'num' }, 'Weight'),
      el('th', {}, 'State'), el('th', {}, 'Health (ambassadors)'),
      el('th', { class: 'num' }, 'Requests'), el('th', { class: 'num' }, 'Errors'),
      el('th', {}, 'Source'), el('th', { title: ZONE_MEANS }, 'Zone'),
      el('th', { class: 'num', title: AGE_MEANS }, 'Age'),
      maintenance ? el('th', {}, '') : null)),
    el('tbody')));
}

function instanceRow(service, inst, maintenance) {
  const drain = drainOf(service, inst);
  const health = healthOf(service, inst.id);
  const traffic = trafficOf(service, inst.id);
  let healthCell;
  if (!health.seen) {
    healthCell = el('span', { class: 'muted', title: 'no live ambassador serves it' }, '-');
  } else {
    const n = health.seen;
    const st = health.states;
    if (st.down) healthCell = el('span', { class: 'pill pill-bad' }, `down on ${st.down}/${n}`);
    else if (st.maint) healthCell = el('span', { class: 'pill pill-warn' }, `maint on ${st.maint}/${n}`);
    else if (st.drain) healthCell = el('span', { class: 'pill pill-warn' }, `drain on ${st.drain}/${n}`);
    else healthCell = el('span', { class: 'pill pill-ok' }, `up on ${st.up || 0}/${n}`);
  }
  const state = drain
    ? el('span', {}, el('span', { class: 'pill pill-warn' }, 'draining'),
      drain.reason ? el('span', { class: 'reason', title: 'reason' }, drain.reason) : null)
    : el('span', { class: 'pill pill-ok' }, 'up');
  let action = null;
  if (maintenance) {
    const own = drain && ownDrain(service, inst);
    action = el('td', { class: 'action', 'data-label': '' }, el('button', {
      class: 'small',
      type: 'button',
      'data-action': drain ? 'undrain' : 'drain',
      'data-service': service,
      'data-id': inst.id,
      disabled: !S.canWrite || (drain && !own),
      title: !S.canWrite ? 'read-only: unlock changes with the token'
        : drain && !own ? `drained with its version ${inst.version}` : null,
      onclick: () => (drain ? undrain(service, inst.id) : openDrain(service, inst.id)),
    }, drain ? 'Undrain' : 'Drain'));
  }
  // `since` is when it joined the directory; 0 (or none) from a directory older than it.
  const since = Number(inst.since) > 0 ? Number(inst.since) : null;
  return el('tr', { class: drain ? 'draining' : null, 'data-id': inst.id },
    el('td', { class: 'name', 'data-label': 'Instance' }, el('strong', {}, inst.id), ' ',
      el('span', { class: 'mono muted' }, `${inst.address}:${inst.port}`),
      (inst.tags || []).length ? el('div', {}, inst.tags.map((t) => el('span', { class: 'tag' }, t))) : null),
    el('td', { 'data-label': 'Version' }, versionChip(inst.version)),
    el('td', { class: 'num', 'data-label': 'Weight' }, String(inst.weight)),
    el('td', { 'data-label': 'State' }, state),
    el('td', { 'data-label': 'Health' }, healthCell),
    el('td', { class: 'num', 'data-label': 'Requests' }, traffic ? fmtCount(traffic.requests) : '-'),
    el('td', { class: `num${traffic && traffic.errors ? ' errors' : ''}`, 'data-label': 'Errors' },
      traffic ? fmtCount(traffic.errors) : '-'),
    el('td', { class: 'muted', 'data-label': 'Source' }, inst.source),
    el('td', { class: 'muted', 'data-label': 'Zone' }, inst.zone || '-'),
    el('td', { class: 'num muted age', 'data-label': 'Age', 'data-since': since, title: AGE_MEANS }, since ? null : '-'),
    action);
}

function versionChip(v) {
  const chip = el('span', { class: 'chip' }, v);
  chip.style.background = colour(v);
  return chip;
}

/**
 * An ambassador's zone (BAKER_ZONE) and the share of the requests it sent between its last two
 * reports that stayed in the zone; nothing for an ambassador without a zone.
 */
function zoneOf(locality) {
  if (!locality) return '';
  const share = locality.requests > 0
    ? `${Math.round((locality.local * 100) / locality.requests)}% local`
    : 'no requests';
  return el('span', {
    class: 'tag',
    'data-zone': locality.zone,
    title: `zone ${locality.zone}: ${locality.local} of the ${locality.requests} requests since its previous report stayed in the zone`,
  }, `zone ${locality.zone} · ${share}`);
}

function drawAmbassadors() {
  const box = $('ambassadors');
  if (!S.ambassadors.length) {
    patch(box, [{ key: 'empty', sig: '', build: () => el('p', { class: 'empty' }, 'No ambassador has reported.') }]);
    return;
  }
  patch(box, [{
    key: 'table',
    sig: '',
    build: () => el('div', { class: 'panel scroll' }, el('table', { class: 'stack' },
      el('thead', {}, el('tr', {},
        el('th', {}, 'Ambassador'), el('th', {}, 'Serves'), el('th', {}, 'Applied'),
        el('th', { class: 'num' }, 'Index'), el('th', { class: 'num' }, 'Reloads'),
        el('th', { class: 'num' }, 'Reported'))),
      el('tbody'))),
  }]);
  patch(box.querySelector('tbody'), S.ambassadors.map((a) => {
    const r = a.report;
    const shown = [a.id, a.live, a.caught_up, a.wanted_index, r.host, r.services, r.applied_index, r.reloads, r.locality];
    return {
      key: a.id,
      sig: JSON.stringify(shown),
      build: () => {
        let pill;
        if (!a.live) pill = el('span', { class: 'pill pill-bad' }, 'silent');
        else if (a.caught_up) pill = el('span', { class: 'pill pill-ok' }, 'caught up');
        else pill = el('span', { class: 'pill pill-warn' }, `behind (${r.applied_index} < ${a.wanted_index})`);
        return el('tr', { 'data-ambassador': a.id },
          el('td', { class: 'name', 'data-label': 'Ambassador' }, el('strong', {}, a.id), ' ',
            el('span', { class: 'mono muted' }, r.host), zoneOf(r.locality)),
          el('td', { 'data-label': 'Serves' },
            (r.services || []).map((s) => el('span', { class: 'tag' }, s.port ? `${s.service}:${s.port}` : s.service))),
          el('td', { 'data-label': 'Applied' }, pill),
          el('td', { class: 'num', 'data-label': 'Index' }, String(r.applied_index)),
          el('td', { class: 'num', 'data-label': 'Reloads' }, String(r.reloads)),
          el('td', { class: 'num muted', 'data-label': 'Reported', 'data-since': S.reported[a.id] }));
      },
    };
  }));
  // A kept row shows the time of the latest report.
  for (const cell of box.querySelectorAll('tr[data-ambassador] [data-since]')) {
    const id = cell.parentElement.dataset.ambassador;
    if (S.reported[id] !== undefined) cell.dataset.since = String(S.reported[id]);
  }
}

function kindClass(kind) {
  if (/drain/.test(kind)) return 'k-drain';
  if (/route/.test(kind)) return 'k-route';
  if (/regist|start|healthy|upsert|add|changed/.test(kind) && !/dereg|unhealthy/.test(kind)) return 'k-add';
  return 'k-remove';
}

const EVENT_SHOWN_FIELDS = new Set(['index', 'at', 'service', 'id', 'kind', 'cause', 'origin', 'by']);

/** A route as operators write it: `1=90 2=10`. */
function routeText(route) {
  return Object.entries(route).map(([k, v]) => `${k}=${v}`).join(' ');
}

function eventItem(e) {
  const subject = e.id ? `${e.service}/${e.id}` : e.service;
  const details = [];
  if (e.cause && e.cause !== e.kind) details.push(String(e.cause));
  for (const [k, v] of Object.entries(e)) {
    if (EVENT_SHOWN_FIELDS.has(k) || v === null || v === undefined) continue;
    if (k === 'route' && typeof v === 'object') details.push(`route ${routeText(v)}`);
    else details.push(`${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`);
  }
  // Who made it (a token's name, `anonymous`, `docker`, `expiry`), and where an operator's call
  // came from; an older directory gives the origin alone.
  if (e.by && e.origin) details.push(`by ${e.by} (${e.origin})`);
  else if (e.by || e.origin) details.push(`by ${e.by || e.origin}`);
  return el('li', { 'data-index': e.index },
    el('time', { title: new Date(e.at).toString() }, fmtTime(e.at)),
    el('span', { class: `dot ${kindClass(String(e.kind))}` }),
    el('span', { class: 'what' }, el('strong', {}, String(e.kind).replaceAll('_', ' ')), ' ', subject,
      details.length ? el('span', { class: 'detail' }, details.join(' \u00b7 ')) : null));
}

function drawHistory() {
  const section = $('history');
  if (S.events === null) {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  const events = [...S.events].sort((a, b) => b.index - a.index).slice(0, EVENTS_SHOWN);
  if (!events.length) {
    patch($('timeline'), [{ key: 'empty', sig: '', build: () => el('li', { class: 'muted' }, 'Nothing has happened yet.') }]);
    return;
  }
  patch($('timeline'), events.map((e) => ({ key: String(e.index), sig: '', build: () => eventItem(e) })));
}

function setLive(state, title) {
  S.live = state;
  const pill = $('live');
  pill.textContent = state;
  pill.className = `pill ${state === 'live' ? 'pill-ok' : state === 'polling' ? 'pill-warn' : 'pill-wait'}`;
  pill.title = title || '';
}

function notice(text, error) {
  const n = $('notice');
  n.textContent = text;
  n.className = error ? 'banner error' : 'banner';
  n.hidden = !text;
}

// ---- the token and the mode -------------------------------------------------------------

function drawMode() {
  const mode = $('mode');
  const locked = TOKEN_REQUIRED && !S.canWrite;
  const grant = S.grant ? ` · token ${S.grant.name}: ${S.grant.role} (${S.grant.scope})` : '';
  mode.textContent = (locked ? 'read-only' : 'changes enabled') + grant;
  mode.className = `mode ${locked ? 'mode-ro' : 'mode-rw'}`;
  const asking = (TOKEN_REQUIRED && !S.canWrite) || !S.canRead;
  $('token').hidden = !asking;
  $('unlock').hidden = !asking;
  $('lock').hidden = !S.token;
  if (!S.canRead) {
    notice('This directory shows its table only to a token that reads (BAKER_READ=token): enter one.');
  } else if (locked) {
    notice('Read-only: enter the directory\'s token (BAKER_TOKEN) to change routes and drain instances.');
  } else if (!TOKEN_REQUIRED) {
    notice('This directory has no BAKER_TOKEN: anyone who can reach it can change routes and drain instances.');
  } else {
    notice('');
  }
  render();
}

/** What `token` may do: {reads, changes, name, role, scope}, or null for a token the
 *  directory does not know. */
async function unlock(token) {
  const resp = await fetch('/ui/auth', {
    headers: { Authorization: `Bearer ${token}` }, cache: 'no-store',
  });
  if (resp.status === 204) return { reads: true, changes: true };
  if (!resp.ok) return null;
  return resp.json();
}

/** Takes `grant` (what unlock answered for `token`) as the page's token. */
function take(token, grant) {
  S.token = token;
  S.grant = grant.name ? grant : null;
  S.canRead = grant.reads || !READ_TOKEN_REQUIRED;
  S.canWrite = grant.changes || !TOKEN_REQUIRED;
  sessionStorage.setItem(TOKEN_KEY, token);
}

$('auth').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const token = $('token').value.trim();
  if (!token) return;
  const grant = await unlock(token).catch(() => null);
  if (grant && (grant.reads || !READ_TOKEN_REQUIRED)) {
    take(token, grant);
    $('token').value = '';
    drawMode();
    if (watchAbort) watchAbort.abort();
    begin();
  } else {
    notice(grant ? 'This token may not read the directory.' : 'Wrong token: the page stays read-only.', true);
  }
});

$('lock').addEventListener('click', () => {
  S.token = '';
  S.grant = null;
  S.canWrite = !TOKEN_REQUIRED;
  S.canRead = !READ_TOKEN_REQUIRED;
  sessionStorage.removeItem(TOKEN_KEY);
  if (!S.canRead) {
    // Nothing read with the token stays on the screen once it is taken back.
    Object.assign(S, { index: null, services: {}, routes: {}, ambassadors: [], traffic: {}, drains: {}, events: null });
  }
  drawMode();
  if (watchAbort) watchAbort.abort();
});

/** After a change was refused for its token: back to read-only. */
function refused(err) {
  if (err.status === 401 && TOKEN_REQUIRED) {
    S.token = '';
    S.grant = null;
    S.canWrite = false;
    S.canRead = !READ_TOKEN_REQUIRED;
    sessionStorage.removeItem(TOKEN_KEY);
    drawMode();
  }
}

// ---- changes ------------------------------------------------------------------------------

/** Reads `1=90 2=10` (or `1:90, 2:10`) into {"1": 90, "2": 10}, or throws naming the bad part. */
function parseRoute(text) {
  const out = {};
  const parts = text.split(/[\s,]+/).filter(Boolean);
  if (!parts.length) throw new Error('name at least one target, such as 1=100');
  for (const part of parts) {
    const m = /^([^=:]+)[=:](\d{1,3})$/.exec(part);
    if (!m) throw new Error(`"${part}" is not TARGET=PERCENT`);
    if (Object.hasOwn(out, m[1])) throw new Error(`${m[1]} is named twice`);
    out[m[1]] = Number(m[2]);
  }
  return out;
}

let routeService = null;

function openRoute(service) {
  routeService = service;
  $('route-service').textContent = service;
  const route = S.routes[service];
  const versions = [...new Set((S.services[service] || []).map((i) => i.version))].sort();
  $('route-input').value = route
    ? routeText(route)
    : versions.map((v, i) => `${v}=${i === 0 ? 100 : 0}`).join(' ');
  $('route-error').hidden = true;
  $('route-clear').disabled = !route;
  preview();
  $('route-dialog').showModal();
  $('route-input').focus();
}

function preview() {
  let segs = [];
  try {
    segs = routeSegments(routeService, parseRoute($('route-input').value));
  } catch (_) { /* nothing to preview */ }
  $('route-preview').replaceChildren(...routeBar(segs).childNodes);
}

function dialogError(id, err) {
  $(id).textContent = err.message;
  $(id).hidden = false;
}

$('route-input').addEventListener('input', preview);
$('route-cancel').addEventListener('click', () => $('route-dialog').close());
$('route-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  let split;
  try {
    split = parseRoute($('route-input').value);
  } catch (err) {
    dialogError('route-error', err);
    return;
  }
  try {
    await api('PUT', `/v1/routes/${encodeURIComponent(routeService)}`, split);
    $('route-dialog').close();
  } catch (err) {
    dialogError('route-error', err);
    refused(err);
  }
});
$('route-clear').addEventListener('click', async () => {
  try {
    await api('DELETE', `/v1/routes/${encodeURIComponent(routeService)}`);
    $('route-dialog').close();
  } catch (err) {
    dialogError('route-error', err);
    refused(err);
  }
});

let drainTarget = null;

function openDrain(service, id) {
  drainTarget = { service, id };
  $('drain-target').textContent = `${service}/${id}`;
  $('drain-reason').value = '';
  $('drain-error').hidden = true;
  $('drain-dialog').showModal();
  $('drain-reason').focus();
}

const maintenancePath = (service, id) =>
  `/v1/maintenance/${encodeURIComponent(service)}/instances/${encodeURIComponent(id)}`;

$('drain-cancel').addEventListener('click', () => $('drain-dialog').close());
$('drain-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const reason = $('drain-reason').value.trim();
  try {
    await api('PUT', maintenancePath(drainTarget.service, drainTarget.id), reason ? { reason } : {});
    $('drain-dialog').close();
    poke();
  } catch (err) {
    dialogError('drain-error', err);
    refused(err);
  }
});

async function undrain(service, id) {
  try {
    await api('DELETE', maintenancePath(service, id));
    poke();
  } catch (err) {
    notice(err.message, true);
    refused(err);
  }
}

// ---- start --------------------------------------------------------------------------------

window.addEventListener('resize', fitLabels);

/** Starts following the directory, once: when its table may be read. */
function begin() {
  if (S.started || !S.canRead) return;
  S.started = true;
  watch();
  poll();
}

async function start() {
  if (S.token) {
    const grant = await unlock(S.token).catch(() => null);
    if (grant) {
      take(S.token, grant);
    } else {
      S.token = '';
      sessionStorage.removeItem(TOKEN_KEY);
    }
  }
  drawMode();
  begin();
}

start();
