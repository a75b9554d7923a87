// Parley's browser client: a client of the documented protocol (protocol/PROTOCOL.md) and nothing
// more — HTTP for accounts, people and groups, one WebSocket for everything that moves.
//
// What it promises its user, and how:
// - A message is shown as sent (one tick) only when the server's `ack` says it is durably stored.
//   Until then it is "pending" and is re-sent with the same `client_msg_id` after every reconnect
//   (PROTOCOL §4.1: a retry with the same id is stored once), so nothing typed is lost to a
//   dropped connection or a killed node.
// - When the serving node dies, the socket fails over to another live member of the cluster
//   (their addresses come from `/v1/cluster`) and reconnect sync (§4.6) fills the gap.
// - Messages are deduplicated by (conversation, seq) (§4.3); `delivered` is sent for the highest
//   seq held without a gap, `read` for what the open chat shows.
// - Every text that comes from the server is rendered with textContent, never as HTML.
// - A photo or file is uploaded first (`POST /v1/media`, §5 "Media"), then sent like any message with its
//   `media_id`. Media is fetched with the bearer token and shown from a `blob:` URL; only raster
//   image types are shown inline (their thumbnail, `/v1/media/:id/thumbnail`; a click opens the
//   full picture), everything else is a download link. One's own uploads carry a 🗑
//   (`DELETE /v1/media/:id`); a deleted upload (a 404) shows as no longer available. "My uploads"
//   (`GET /v1/media`) lists them with the quota's use, also those never sent.
// - Notifications (§5 "Push notifications") are this browser's Web Push subscription, registered
//   with the server while signed in; ui/sw.js shows them. Signing out ends them (the server drops
//   the subscriptions of a token that is logged out); the next sign-in on a browser that allowed
//   notifications registers them again for whoever signed in.
// - Privacy (§5 "Privacy and contacts"): who may see one's last seen and online, chosen in the
//   Privacy box and stored on the server (`/v1/me/privacy`); "contacts" are the people starred in
//   People (`/v1/me/contacts`); who may add one to groups; and read receipts. What others may not see, the server
//   never sends.

const PROTOCOL_VERSION = 1;
const HISTORY_PAGE = 50;
const RECONNECT_MIN_MS = 250;
const RECONNECT_MAX_MS = 5000;
const CLUSTER_POLL_MS = 1000;
const CLUSTER_LOG_MAX = 200;
// PROTOCOL §7: the server forwards one `typing` per chat per 2 s; show it for 6 s after the last.
const TYPING_INTERVAL_MS = 2000;
const TYPING_SHOWN_MS = 6000;
// PROTOCOL §4.8: a connection watches the presence of at most this many users.
const MAX_PRESENCE_WATCH = 256;
// The server announces its limits in `welcome`; this is the documented default until then.
let maxBodyBytes = 16 * 1024;
let maxMediaBytes = 16 * 1024 * 1024;
// Shown inline as <img>; any other type is offered as a download.
const INLINE_IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];

const $ = (id) => document.getElementById(id);

/** Builds an element; children are nodes or strings (strings become text nodes, never HTML). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    // Through the CSSOM: the page's Content-Security-Policy refuses inline style attributes.
    else if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function randomId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------- state

const store = {
  get auth() {
    try { return JSON.parse(localStorage.getItem("parley.auth")); } catch { return null; }
  },
  set auth(v) {
    if (v) localStorage.setItem("parley.auth", JSON.stringify(v));
    else localStorage.removeItem("parley.auth");
  },
  // One device id per browser profile and user: reconnect sync and delivered cursors are per device.
  deviceId(userId) {
    const key = "parley.device." + userId;
    let id = localStorage.getItem(key);
    if (!id) { id = randomId("web-"); localStorage.setItem(key, id); }
    return id;
  },
};

const state = {
  auth: null,            // {token, user_id, username, expires_at_ms}
  users: new Map(),      // user id -> username
  convs: new Map(),      // conversation id (or "to:<user id>" before the first ack) -> Conversation
  current: null,         // key of the open conversation
  picked: new Set(),     // people ticked for a new group
  presence: new Map(),   // user id -> {online, lastSeen} (users this connection watches)
  contacts: new Set(),   // user ids on this user's contact list (starred in People)
  socket: null,
  connected: false,
  endpoints: [],         // ws URLs to try, this page's own node first
  endpointIndex: 0,
  reconnectDelay: RECONNECT_MIN_MS,
  reconnectTimer: null,
  reqSeq: 0,
  openOnLoad: null,      // a chat to open once the conversation list arrives (from a notification)
};

/** A conversation as this client knows it. */
class Conversation {
  constructor(key, fields = {}) {
    this.key = key;                  // conversation id, or "to:<user>" for a chat not yet stored
    this.id = fields.conversation_id || null;
    this.kind = fields.kind || "direct";
    this.members = fields.members || [];
    this.name = fields.name || null;
    this.owner = fields.owner || null;
    this.version = -1;
    this.lastSeq = fields.last_seq || 0;
    this.readSeq = fields.read_seq || 0;
    this.unread = fields.unread || 0;
    this.messages = new Map();       // seq -> MessageView
    this.pending = new Map();        // client_msg_id -> {body, state: pending|failed, error}
    this.peerDelivered = new Map();  // user -> seq (from receipts)
    this.peerRead = new Map();       // user -> seq
    // Every other member has received / read up to here, as the conversation list said (receipts
    // are not replayed after a reload; live ones move the per-user maps above past these).
    this.othersDelivered = fields.others_delivered_seq || 0;
    this.othersRead = fields.others_read_seq || 0;
    this.contiguous = 0;             // every message up to here is held (what `delivered` reports)
    this.deliveredSent = 0;
    this.historyLoaded = false;
    this.hasMore = false;
    this.peer = fields.peer || null; // direct chats: the other member
    this.typing = new Map();         // user -> time until which "typing…" is shown
    this.typingSentAt = 0;
    this.lastActivity = fields.last_message ? fields.last_message.sent_at_ms : 0;
    this.mutedUntil = fields.muted_until_ms || 0; // no notifications of this chat until then
    if (fields.last_message) this.addMessage(fields.last_message, false);
  }

  title() {
    if (this.kind === "group") return this.name || "group";
    const peer = this.peer || this.members.find((m) => m !== state.auth.user_id) || state.auth.user_id;
    const name = state.users.get(peer) || peer.slice(0, 8);
    return peer === state.auth.user_id ? `${name} (you)` : name;
  }

  others() {
    return this.members.filter((m) => m !== state.auth.user_id);
  }

  /** Adds a message once; returns whether it was new. */
  addMessage(m, live = true) {
    if (this.messages.has(m.seq)) return false;
    this.messages.set(m.seq, m);
    this.lastSeq = Math.max(this.lastSeq, m.seq);
    this.lastActivity = Math.max(this.lastActivity, m.sent_at_ms);
    this.typing.delete(m.sender); // their message ends their "typing…"
    if (m.sender === state.auth.user_id) this.pending.delete(m.client_msg_id);
    else if (live && m.seq > this.readSeq) this.unread += 1;
    while (this.messages.has(this.contiguous + 1)) this.contiguous += 1;
    return true;
  }

  /** State of my message `seq` for the ticks: sent, delivered (every other member) or read. */
  tickState(seq) {
    const others = this.others();
    if (others.length === 0) return "read"; // a chat with yourself
    if (seq <= this.othersRead || others.every((u) => (this.peerRead.get(u) || 0) >= seq)) return "read";
    const delivered = (u) => Math.max(this.peerDelivered.get(u) || 0, this.peerRead.get(u) || 0);
    if (seq <= this.othersDelivered || others.every((u) => delivered(u) >= seq)) return "delivered";
    return "sent";
  }
}

// ---------------------------------------------------------------- HTTP

class ApiError extends Error {
  constructor(code, message, status) { super(message); this.code = code; this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return request(method, path, headers, body === undefined ? undefined : JSON.stringify(body));
}

/**
 * Where HTTP calls go: the node this page's socket uses (the page's own node until the socket has
 * failed over). When the page's node dies, the socket moves to another member and every request
 * follows it there — the nodes answer cross-origin for this (PROTOCOL §5) — so history, groups,
 * media and settings keep working without a reload.
 */
function apiBase() {
  if (state.endpoints.length === 0) return "";
  const ws = state.endpoints[state.endpointIndex % state.endpoints.length];
  return ws.replace(/^ws/, "http").replace(/\/v1\/ws$/, "");
}

/** Any authenticated request; JSON answers are parsed, error bodies become an ApiError. */
async function request(method, path, headers, body) {
  if (state.auth) headers.Authorization = "Bearer " + state.auth.token;
  let res;
  try {
    res = await fetch(apiBase() + path, { method, headers, body });
  } catch (e) {
    throw new ApiError("unavailable", "the server cannot be reached", 0);
  }
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!res.ok) {
    const code = (json && json.error) || "http_" + res.status;
    const message = (json && json.message) || res.statusText;
    if (res.status === 401 && state.auth && code === "bad_token") signOut("Your session ended: " + message);
    throw new ApiError(code, message, res.status);
  }
  return json;
}

// ---------------------------------------------------------------- accounts

async function authenticate(kind) {
  const username = $("username").value.trim();
  const password = $("password").value;
  $("auth-error").textContent = "";
  try {
    const auth = await api("POST", "/v1/" + kind, { username, password });
    store.auth = auth;
    await enter(auth);
  } catch (e) {
    $("auth-error").textContent = `${e.message} (${e.code})`;
  }
}

async function enter(auth) {
  state.auth = auth;
  $("me").textContent = auth.username;
  $("logout").hidden = false;
  show("chat");
  await Promise.all([loadPeople(), loadContacts()]);
  connect();
  restoreNotifications();
}

function signOut(reason) {
  const auth = state.auth;
  if (auth) fetch(apiBase() + "/v1/logout", { method: "POST", headers: { Authorization: "Bearer " + auth.token } }).catch(() => {});
  store.auth = null;
  state.auth = null;
  state.convs.clear();
  state.contacts.clear();
  state.current = null;
  if (state.socket) { state.socket.onclose = null; state.socket.close(1000); state.socket = null; }
  clearTimeout(state.reconnectTimer);
  setConn("offline");
  $("me").textContent = "";
  $("node").textContent = "";
  $("logout").hidden = true;
  $("notify").hidden = true;
  $("auth-error").textContent = reason || "";
  show("auth");
}

async function loadPeople() {
  try {
    const users = await api("GET", "/v1/users");
    for (const u of users) state.users.set(u.id, u.username);
    renderPeople();
    watchPresence();
  } catch (e) {
    if (state.auth) $("thread-error").textContent = `People could not be loaded: ${e.message}`;
  }
}

/** The contact list, for the stars in People. */
async function loadContacts() {
  try {
    const list = await api("GET", "/v1/me/contacts");
    state.contacts = new Set(list.contacts.map((u) => u.id));
    renderPeople();
  } catch (e) {
    if (state.auth) $("thread-error").textContent = `Contacts could not be loaded: ${e.message}`;
  }
}

/** Star (add) or unstar (remove) someone as a contact. */
async function toggleContact(userId) {
  const adding = !state.contacts.has(userId);
  $("thread-error").textContent = "";
  try {
    await request(adding ? "PUT" : "DELETE", "/v1/me/contacts/" + userId, {});
  } catch (e) {
    // Removing someone already gone from the list (another device did it) is what was asked.
    if (adding || e.code !== "not_found") {
      $("thread-error").textContent = `Could not change your contacts: ${e.message} (${e.code})`;
      return;
    }
  }
  if (adding) state.contacts.add(userId); else state.contacts.delete(userId);
  renderPeople();
}

/** The Privacy box shows what the server has stored. */
async function loadPrivacy() {
  try {
    const p = await api("GET", "/v1/me/privacy");
    $("privacy-last-seen").value = p.last_seen;
    $("privacy-online").value = p.online;
    $("privacy-groups").value = p.groups;
    $("privacy-read-receipts").checked = p.read_receipts;
    $("privacy-form").dataset.loaded = "true";
    $("privacy-status").textContent = "";
  } catch (e) {
    $("privacy-status").textContent = `Privacy settings could not be loaded: ${e.message} (${e.code})`;
  }
}

/** Store the Privacy box's choice; on a refusal, show what is really stored. */
async function savePrivacy() {
  const settings = {
    last_seen: $("privacy-last-seen").value, online: $("privacy-online").value, groups: $("privacy-groups").value,
    read_receipts: $("privacy-read-receipts").checked,
  };
  $("privacy-status").textContent = "saving…";
  try {
    await api("PUT", "/v1/me/privacy", settings);
    $("privacy-status").textContent = "Saved";
  } catch (e) {
    await loadPrivacy();
    $("privacy-status").textContent = `Not saved: ${e.message} (${e.code})`;
  }
}

// ---------------------------------------------------------------- push notifications

const PUSH_SUPPORTED = "serviceWorker" in navigator && "PushManager" in window && "Notification" in window;
const SW_SCOPE = "/ui/";
const PUSH_SUBSCRIBE_TIMEOUT_MS = 15000;

const NOTIFY_LABELS = {
  off: "🔕 Notifications off",
  on: "🔔 Notifications on",
  busy: "🔔 …",
  blocked: "🔕 Notifications blocked",
  failed: "🔕 Notifications unavailable",
};

function renderNotify(s, detail) {
  const b = $("notify");
  b.hidden = !state.auth || !PUSH_SUPPORTED;
  b.dataset.state = s;
  b.textContent = NOTIFY_LABELS[s];
  b.title = detail || (s === "on"
    ? "You get a notification here when a message arrives while you are offline. Click to turn off."
    : "Get a notification on this browser when a message arrives while you are offline");
}

function base64UrlBytes(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
  const raw = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

function sameBytes(a, b) {
  if (!a || !b) return false;
  const x = new Uint8Array(a), y = new Uint8Array(b);
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

/** The service worker's registration once it is active (a push subscription needs an active
 *  worker). Not `navigator.serviceWorker.ready`: that waits for a worker controlling this page,
 *  and the page (`/`) is outside the worker's scope (`/ui/`). */
async function activeRegistration() {
  const reg = await navigator.serviceWorker.register("/ui/sw.js", { scope: SW_SCOPE });
  const worker = reg.installing || reg.waiting;
  if (!reg.active && worker) {
    await new Promise((resolve, reject) => {
      const check = () => {
        if (worker.state === "activated") resolve();
        if (worker.state === "redundant") reject(new Error("the service worker failed to start"));
      };
      worker.addEventListener("statechange", check);
      check();
    });
  }
  return reg;
}

/** `promise`, or an error saying `what` did not answer within `ms`. */
function within(ms, what, promise) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** Subscribe this browser with the server's key (replacing a subscription made with another
 *  key) and register it for the signed-in user. */
async function subscribePush() {
  const { vapid_public_key } = await api("GET", "/v1/push/key");
  const key = base64UrlBytes(vapid_public_key);
  const reg = await activeRegistration();
  let sub = await reg.pushManager.getSubscription();
  if (sub && !sameBytes(sub.options.applicationServerKey, key)) {
    await sub.unsubscribe();
    sub = null;
  }
  // The browser asks its vendor's push service for an endpoint here; without a network path to it,
  // some browsers wait indefinitely. The person is told instead.
  if (!sub) {
    sub = await within(PUSH_SUBSCRIBE_TIMEOUT_MS, "this browser's push service",
      reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key }));
  }
  await api("POST", "/v1/push/subscriptions", sub.toJSON());
}

async function toggleNotifications() {
  const b = $("notify");
  if (b.dataset.state === "busy") return;
  const wasOn = b.dataset.state === "on";
  renderNotify("busy");
  try {
    if (wasOn) {
      const reg = await navigator.serviceWorker.getRegistration(SW_SCOPE);
      const sub = reg && await reg.pushManager.getSubscription();
      if (sub) {
        await api("DELETE", "/v1/push/subscriptions", { endpoint: sub.endpoint }).catch(() => {});
        await sub.unsubscribe();
      }
      renderNotify("off");
      return;
    }
    const permission = await Notification.requestPermission();
    if (permission !== "granted") {
      renderNotify("blocked", "This browser does not allow notifications from this site (see its site settings)");
      return;
    }
    await subscribePush();
    renderNotify("on");
  } catch (e) {
    renderNotify("failed", `Notifications could not be turned on: ${e.message || e}`);
  }
}

/** After sign-in: a browser that allowed notifications and still holds its subscription is
 *  registered again, for whoever signed in (the server forgot it at the last sign-out). */
async function restoreNotifications() {
  if (!PUSH_SUPPORTED) return;
  renderNotify("off");
  if (Notification.permission === "denied") { renderNotify("blocked"); return; }
  if (Notification.permission !== "granted") return;
  try {
    const reg = await navigator.serviceWorker.getRegistration(SW_SCOPE);
    if (!reg || !(await reg.pushManager.getSubscription())) return;
    await subscribePush();
    renderNotify("on");
  } catch (e) {
    renderNotify("failed", `Notifications could not be turned on: ${e.message || e}`);
  }
}

// ---------------------------------------------------------------- WebSocket

function wsUrl(host) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + host + "/v1/ws";
}

function setConn(s) {
  state.connected = s === "online";
  $("conn").dataset.state = s;
  $("conn").textContent = s;
}

function connect() {
  if (!state.auth) return;
  if (state.endpoints.length === 0) state.endpoints = [wsUrl(location.host)];
  const url = state.endpoints[state.endpointIndex % state.endpoints.length];
  setConn("connecting");
  let ws;
  try { ws = new WebSocket(url); } catch { scheduleReconnect(); return; }
  state.socket = ws;
  let welcomed = false;
  ws.onopen = () => {
    send({ type: "hello", protocol: PROTOCOL_VERSION, token: state.auth.token, device_id: store.deviceId(state.auth.user_id) });
  };
  ws.onmessage = (ev) => {
    let frame;
    try { frame = JSON.parse(ev.data); } catch { return; }
    if (frame.type === "welcome") welcomed = true;
    handle(frame);
  };
  ws.onclose = (ev) => {
    if (state.socket !== ws) return;
    state.socket = null;
    setConn("offline");
    if (ev.code === 4001 || ev.code === 4002) {
      signOut(`Signed out by the server: ${ev.reason || ev.code}`);
      return;
    }
    // A socket that never got to `welcome` points at a node that is down or not ready: try the next.
    if (!welcomed) state.endpointIndex += 1;
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  clearTimeout(state.reconnectTimer);
  const delay = state.reconnectDelay * (0.75 + Math.random() / 2);
  state.reconnectDelay = Math.min(RECONNECT_MAX_MS, state.reconnectDelay * 2);
  state.reconnectTimer = setTimeout(connect, delay);
}

function send(frame) {
  if (!state.socket || state.socket.readyState !== WebSocket.OPEN) return false;
  state.socket.send(JSON.stringify(frame));
  return true;
}

function nextReq(prefix) {
  state.reqSeq += 1;
  return `${prefix}-${state.reqSeq}`;
}

function handle(f) {
  switch (f.type) {
    case "welcome":
      setConn("online");
      state.reconnectDelay = RECONNECT_MIN_MS;
      $("node").textContent = "via " + f.node;
      if (f.limits && f.limits.max_body_bytes) maxBodyBytes = f.limits.max_body_bytes;
      if (f.limits && f.limits.max_media_bytes) maxMediaBytes = f.limits.max_media_bytes;
      state.conversationsAsked = false;
      requestConversations();
      watchPresence();
      resendPending();
      learnEndpoints();
      break;
    case "conversations":
      mergeConversations(f.conversations);
      break;
    case "message":
      onMessage(f.message);
      break;
    case "ack":
      onAck(f);
      break;
    case "receipt":
      onReceipt(f);
      break;
    case "history":
      onHistory(f);
      break;
    case "group":
      onGroup(f.group);
      break;
    case "typing":
      onTyping(f);
      break;
    case "presence":
      state.presence.set(f.user_id, { online: f.online, lastSeen: f.last_seen_ms });
      renderPeople();
      renderPresence();
      break;
    case "sync_done":
      for (const id of f.truncated || []) {
        const c = state.convs.get(id);
        if (c) requestHistory(c); // more than the sync replays: page the rest
      }
      break;
    case "error":
      onError(f);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------- conversations and messages

function conversation(id) {
  let c = state.convs.get(id);
  if (!c) {
    c = new Conversation(id, { conversation_id: id });
    state.convs.set(id, c);
    // A message for a conversation we have not listed yet (a new chat, a group we were added to).
    requestConversations();
  }
  return c;
}

/** Asks for the conversation list; at most one request in flight (a sync of many new chats would
 * otherwise ask once per chat). */
function requestConversations() {
  if (state.conversationsAsked) return;
  if (send({ type: "conversations", req_id: nextReq("c") })) state.conversationsAsked = true;
}

function mergeConversations(list) {
  state.conversationsAsked = false;
  for (const s of list) {
    let c = state.convs.get(s.conversation_id);
    if (!c) {
      c = new Conversation(s.conversation_id, s);
      state.convs.set(s.conversation_id, c);
    } else {
      c.id = s.conversation_id;
      c.kind = s.kind;
      c.members = s.members;
      if (s.name) c.name = s.name;
      if (s.owner) c.owner = s.owner;
      c.lastSeq = Math.max(c.lastSeq, s.last_seq);
      c.readSeq = Math.max(c.readSeq, s.read_seq);
      c.unread = s.unread;
      c.mutedUntil = s.muted_until_ms || 0;
      c.othersDelivered = Math.max(c.othersDelivered, s.others_delivered_seq || 0);
      c.othersRead = Math.max(c.othersRead, s.others_read_seq || 0);
      if (s.last_message) {
        c.addMessage(s.last_message, false);
        c.lastActivity = Math.max(c.lastActivity, s.last_message.sent_at_ms);
      }
    }
    if (c.kind === "direct") c.peer = c.members.find((m) => m !== state.auth.user_id) || state.auth.user_id;
    for (const m of c.members) if (!state.users.has(m)) { loadPeople(); break; }
  }
  renderConversations();
  if (state.current) openConversation(state.current, false);
  else if (state.openOnLoad && state.convs.has(state.openOnLoad)) openConversation(state.openOnLoad);
  state.openOnLoad = null;
  watchPresence(); // the people of direct chats come first in the watch list
}

function onMessage(m) {
  const c = conversation(m.conversation_id);
  const isNew = c.addMessage(m, true);
  if (!isNew) return;
  acknowledge(c);
  renderConversations();
  if (state.current === c.key) renderThread();
}

/** Tells the server what this device holds (`delivered`) and, for the open chat, what was read. */
function acknowledge(c) {
  if (!c.id) return;
  if (c.contiguous > c.deliveredSent && send({ type: "delivered", conversation_id: c.id, seq: c.contiguous })) {
    c.deliveredSent = c.contiguous;
  }
  if (state.current === c.key && document.visibilityState === "visible" && state.view === "chat") {
    const top = c.lastSeq;
    if (top > c.readSeq) {
      if (send({ type: "read", conversation_id: c.id, seq: top })) {
        c.readSeq = top;
        c.unread = 0;
      }
    } else {
      c.unread = 0;
    }
  }
}

function onAck(a) {
  // The ack names the conversation; a chat opened by user ("to:<id>") gets its real id now.
  let c = state.convs.get(a.conversation_id);
  for (const [key, draft] of state.convs) {
    if (!draft.pending.has(a.client_msg_id)) continue;
    const p = draft.pending.get(a.client_msg_id);
    draft.pending.delete(a.client_msg_id);
    if (key !== a.conversation_id) {
      if (!c) {
        c = draft;
        state.convs.delete(key);
        c.key = c.id = a.conversation_id;
        state.convs.set(c.key, c);
        if (state.current === key) state.current = c.key;
      } else {
        for (const [id, q] of draft.pending) c.pending.set(id, q);
        state.convs.delete(key);
        if (state.current === key) state.current = c.key;
      }
    }
    c.addMessage({
      message_id: a.message_id, conversation_id: a.conversation_id, seq: a.seq,
      sender: state.auth.user_id, client_msg_id: a.client_msg_id, body: p.body, sent_at_ms: a.sent_at_ms,
      media: p.media || null,
    }, false);
    break;
  }
  if (c) acknowledge(c);
  renderConversations();
  renderThread();
}

function onReceipt(r) {
  const c = state.convs.get(r.conversation_id);
  if (!c) return;
  if (r.user_id === state.auth.user_id) {
    // Another of my devices (or this one): my read position moved.
    if (r.kind === "read" && r.seq > c.readSeq) { c.readSeq = r.seq; c.unread = 0; }
  } else {
    const map = r.kind === "read" ? c.peerRead : c.peerDelivered;
    map.set(r.user_id, Math.max(map.get(r.user_id) || 0, r.seq));
  }
  renderConversations();
  if (state.current === c.key) renderThread();
}

function onHistory(f) {
  const c = state.convs.get(f.conversation_id);
  if (!c) return;
  for (const m of f.messages) c.addMessage(m, false);
  // Everything below the newest page is reachable by paging; hold that as "received".
  if (!c.historyLoaded && f.messages.length) c.contiguous = Math.max(c.contiguous, f.messages[f.messages.length - 1].seq);
  while (c.messages.has(c.contiguous + 1)) c.contiguous += 1;
  c.historyLoaded = true;
  c.hasMore = f.has_more;
  acknowledge(c);
  if (state.current === c.key) renderThread();
}

function onGroup(g) {
  const me = state.auth.user_id;
  let c = state.convs.get(g.conversation_id);
  if (!g.members.includes(me)) {
    // Removed, or left: the group is gone for this user.
    if (c) state.convs.delete(g.conversation_id);
    if (state.current === g.conversation_id) closeConversation();
    renderConversations();
    return;
  }
  if (!c) {
    c = new Conversation(g.conversation_id, { conversation_id: g.conversation_id, kind: "group" });
    state.convs.set(g.conversation_id, c);
  }
  if (g.version < c.version) return;
  c.version = g.version;
  c.kind = "group";
  c.name = g.name;
  c.owner = g.owner;
  c.members = g.members;
  for (const m of g.members) if (!state.users.has(m)) { loadPeople(); break; }
  renderConversations();
  if (state.current === c.key) renderThread();
}

function onTyping(t) {
  const c = state.convs.get(t.conversation_id);
  if (!c || t.user_id === state.auth.user_id) return;
  c.typing.set(t.user_id, Date.now() + TYPING_SHOWN_MS);
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOWN_MS + 50);
}

/** Who is typing in `c` now (names). */
function typers(c) {
  const now = Date.now();
  for (const [u, until] of c.typing) if (until <= now) c.typing.delete(u);
  return [...c.typing.keys()].map((u) => state.users.get(u) || u.slice(0, 8));
}

function typingLine(c) {
  const names = c ? typers(c) : [];
  return names.length === 0 ? "" : `${names.join(", ")} ${names.length === 1 ? "is" : "are"} typing…`;
}

function renderTyping() {
  $("typing").textContent = typingLine(state.current && state.convs.get(state.current));
  renderConversations();
}

/** Tells the other members that this user is typing: at most once per interval per chat. */
function typed() {
  const c = state.convs.get(state.current);
  if (!c || !c.id || !$("text").value) return;
  const now = Date.now();
  if (now - c.typingSentAt < TYPING_INTERVAL_MS) return;
  if (send({ type: "typing", conversation_id: c.id })) c.typingSentAt = now;
}

function onError(e) {
  if (e.req_id && e.req_id.startsWith("c-")) state.conversationsAsked = false;
  if (e.client_msg_id) {
    for (const c of state.convs.values()) {
      const p = c.pending.get(e.client_msg_id);
      if (!p) continue;
      if (e.code === "unavailable") {
        // Outcome unknown (§4.1): retry with the same id.
        setTimeout(() => { if (c.pending.get(e.client_msg_id) === p) sendPending(c, e.client_msg_id, p); }, 1000);
      } else {
        p.state = "failed";
        p.error = `${e.message} (${e.code})`;
      }
      renderThread();
      return;
    }
  }
  $("thread-error").textContent = `${e.message} (${e.code})`;
}

function requestHistory(c, before) {
  if (!c.id) return;
  const frame = { type: "history", req_id: nextReq("h"), conversation_id: c.id, limit: HISTORY_PAGE };
  if (before) frame.before_seq = before;
  send(frame);
}

function sendPending(c, clientMsgId, p) {
  const frame = { type: "send", client_msg_id: clientMsgId, body: p.body };
  if (p.media) frame.media_id = p.media.media_id;
  if (c.id) frame.conversation_id = c.id;
  else frame.to = c.peer;
  send(frame);
}

function resendPending() {
  for (const c of state.convs.values()) {
    for (const [id, p] of c.pending) if (p.state === "pending") sendPending(c, id, p);
    if (state.current === c.key && c.id) requestHistory(c);
  }
}

function submitMessage() {
  const c = state.convs.get(state.current);
  const body = $("text").value;
  $("thread-error").textContent = "";
  if (!c || !body.trim()) return;
  const bytes = new TextEncoder().encode(body).length;
  if (bytes > maxBodyBytes) {
    $("thread-error").textContent = `The message is ${bytes} bytes; the limit is ${maxBodyBytes} (body_too_large).`;
    return;
  }
  const id = randomId("w");
  const p = { body, state: "pending" };
  c.pending.set(id, p);
  sendPending(c, id, p); // if the socket is down, the reconnect sends it
  $("text").value = "";
  renderThread();
}

// ---------------------------------------------------------------- media

/** Upload a picked file, then send it (with the composer's text as its caption). While it
 * uploads it shows as "uploading"; once uploaded it is an ordinary pending message, re-sent with
 * the same id after a reconnect like any other. */
async function attachFile(file) {
  const c = state.convs.get(state.current);
  $("thread-error").textContent = "";
  if (!c || !file) return;
  if (file.size > maxMediaBytes) {
    $("thread-error").textContent = `The file is ${file.size} bytes; the limit is ${maxMediaBytes} (media_too_large).`;
    return;
  }
  if (file.size === 0) {
    $("thread-error").textContent = "The file is empty.";
    return;
  }
  const caption = $("text").value;
  const bytes = new TextEncoder().encode(caption).length;
  if (bytes > maxBodyBytes) {
    $("thread-error").textContent = `The caption is ${bytes} bytes; the limit is ${maxBodyBytes} (body_too_large).`;
    return;
  }
  const id = randomId("w");
  const p = { body: caption, state: "uploading", fileName: file.name };
  c.pending.set(id, p);
  $("text").value = "";
  renderThread();
  try {
    const query = file.name ? "?name=" + encodeURIComponent(file.name) : "";
    p.media = await request("POST", "/v1/media" + query, { "Content-Type": file.type || "application/octet-stream" }, file);
    p.state = "pending";
    sendPending(c, id, p);
  } catch (e) {
    p.state = "failed";
    p.error = `${e.message} (${e.code})`;
  }
  renderThread();
}

/** GET `path` with the token (media is not JSON, so not through `request`); a network failure is
 * `unavailable`. */
async function fetchAuthed(path) {
  try {
    return await fetch(apiBase() + path, { headers: { Authorization: "Bearer " + state.auth.token } });
  } catch (e) {
    throw new ApiError("unavailable", "the server cannot be reached", 0);
  }
}

/** `cache`'s promise for `key`, made by `load` the first time; a failed one is forgotten, so it is
 * tried again at the next render. */
function fetchedOnce(cache, key, load) {
  if (!cache.has(key)) {
    const p = load();
    p.catch(() => cache.delete(key));
    cache.set(key, p);
  }
  return cache.get(key);
}

// media_id -> Promise of a blob: URL (uploads never change, so each is fetched once per page).
const mediaUrls = new Map();

function mediaUrl(media) {
  return fetchedOnce(mediaUrls, media.media_id, async () => {
    const res = await fetchAuthed("/v1/media/" + media.media_id);
    if (!res.ok) throw new ApiError("http_" + res.status, res.statusText, res.status);
    return URL.createObjectURL(await res.blob());
  });
}

// media_id -> Promise of a blob: URL of the picture shown inline: the upload's thumbnail
// (`GET /v1/media/:id/thumbnail`, at most 320 px a side), or the upload itself when the server made
// none (`not_found`). The full picture is fetched only when it is opened.
const thumbUrls = new Map();

function thumbUrl(media) {
  return fetchedOnce(thumbUrls, media.media_id, async () => {
    const res = await fetchAuthed("/v1/media/" + media.media_id + "/thumbnail");
    if (res.status === 404) {
      const body = await res.json().catch(() => ({}));
      if (body.error === "not_found") return { url: await mediaUrl(media), shows: "full" };
    }
    if (!res.ok) throw new ApiError("http_" + res.status, res.statusText, res.status);
    return { url: URL.createObjectURL(await res.blob()), shows: "thumbnail" };
  });
}

function formatSize(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
  if (n < 1024 * 1024 * 1024) return (n / 1024 / 1024).toFixed(1) + " MB";
  return (n / 1024 / 1024 / 1024).toFixed(1) + " GB";
}

// media_id of uploads known to be deleted (a fetch answered 404, or deleted from this page): shown
// as gone and not fetched again.
const goneMedia = new Set();

/** A message's attachment: the picture itself, or a link that downloads the file; on one's own
 * messages with a 🗑 that deletes the upload (`DELETE /v1/media/:id`: nobody can fetch it after). */
function mediaView(media, mine) {
  const label = (media.name || "file") + " (" + formatSize(media.size) + ")";
  if (goneMedia.has(media.media_id)) {
    return h("span", { class: "media-gone", "data-media-id": media.media_id }, "🚫 " + label + " is no longer available");
  }
  // A 404: its uploader deleted it.
  const gone = (e) => {
    if (e.status !== 404) return false;
    goneMedia.add(media.media_id);
    renderThread();
    return true;
  };
  let view;
  if (INLINE_IMAGE_TYPES.includes(media.mime)) {
    view = h("img", {
      class: "media-img", alt: media.name || "photo", title: label + " (click for the full picture)",
      "data-media-id": media.media_id,
      onclick: async () => {
        try {
          h("a", { href: await mediaUrl(media), target: "_blank", rel: "noopener" }).click();
        } catch (e) {
          if (!gone(e)) $("thread-error").textContent = `Could not open the picture: ${e.message} (${e.code})`;
        }
      },
    });
    thumbUrl(media).then(({ url, shows }) => { view.dataset.shows = shows; view.src = url; },
      (e) => { if (!gone(e)) view.alt = "could not load " + label; });
  } else {
    view = h("a", {
      class: "media-file", href: "#", "data-media-id": media.media_id,
      onclick: async (ev) => {
        ev.preventDefault();
        try {
          const a = h("a", { href: await mediaUrl(media), download: media.name || "file" });
          a.click();
        } catch (e) {
          if (!gone(e)) $("thread-error").textContent = `Download failed: ${e.message} (${e.code})`;
        }
      },
    }, "📎 " + label);
  }
  if (!mine) return view;
  return h("span", { class: "media" }, view,
    h("button", { type: "button", class: "delete-media", title: "delete this upload: nobody can open it any more",
      onclick: () => deleteMedia(media) }, "🗑"));
}

/** "My uploads": the quota's use and the newest uploads (`GET /v1/media`), each deletable — also
 * uploads that never made it into a message. */
async function loadUploads() {
  try {
    const u = await api("GET", "/v1/media?limit=100");
    const count = u.uploads === 1 ? "1 upload" : u.uploads + " uploads";
    $("uploads-usage").textContent = `${count} · ${formatSize(u.used_bytes)} of ${formatSize(u.quota_bytes)}`;
    $("uploads").replaceChildren(...u.items.map((m) => h("li", { "data-media-id": m.media_id },
      h("span", { class: "upload-name" }, (m.name || m.mime) + " (" + formatSize(m.size) + ")"),
      h("button", { type: "button", class: "delete-upload", title: "delete this upload: nobody can open it any more",
        onclick: () => deleteMedia(m) }, "🗑"))));
  } catch (e) {
    $("uploads-usage").textContent = `Uploads could not be loaded: ${e.message} (${e.code})`;
  }
}

/** Delete one's own upload; the messages that carried it then show it as gone. */
async function deleteMedia(media) {
  $("thread-error").textContent = "";
  try {
    await request("DELETE", "/v1/media/" + media.media_id, {});
  } catch (e) {
    // Already gone (deleted from another device) is what was asked for.
    if (e.code !== "unknown_media") {
      $("thread-error").textContent = `Could not delete: ${e.message} (${e.code})`;
      return;
    }
  }
  goneMedia.add(media.media_id);
  const url = mediaUrls.get(media.media_id);
  mediaUrls.delete(media.media_id);
  if (url) url.then((u) => URL.revokeObjectURL(u), () => {});
  const thumb = thumbUrls.get(media.media_id);
  thumbUrls.delete(media.media_id);
  if (thumb) thumb.then(({ url: u }) => URL.revokeObjectURL(u), () => {});
  renderThread();
  if ($("uploads-box").open) loadUploads();
}

/** One line for the chat list. */
function preview(m) {
  if (!m.media) return m.body.slice(0, 60);
  const icon = INLINE_IMAGE_TYPES.includes(m.media.mime) ? "📷 " : "📎 ";
  return icon + (m.body || m.media.name || "file").slice(0, 58);
}

// ---------------------------------------------------------------- groups

async function createGroup() {
  const name = $("group-name").value.trim();
  $("group-error").textContent = "";
  try {
    const g = await api("POST", "/v1/groups", { name, members: [...state.picked] });
    state.picked.clear();
    $("group-name").value = "";
    onGroup(g);
    renderPeople();
    openConversation(g.conversation_id);
  } catch (e) {
    $("group-error").textContent = `${e.message} (${e.code})`;
  }
}

async function leaveGroup() {
  const c = state.convs.get(state.current);
  if (!c || c.kind !== "group") return;
  try {
    const g = await api("DELETE", `/v1/groups/${c.id}/members/${state.auth.user_id}`);
    onGroup(g);
  } catch (e) {
    $("thread-error").textContent = `${e.message} (${e.code})`;
  }
}

/** Group changes (the owner's): each answer is the new group, applied like a `group` frame. */
async function changeGroup(method, path, body) {
  $("thread-error").textContent = "";
  try {
    onGroup(await api(method, path, body));
    return true;
  } catch (e) {
    $("thread-error").textContent = `${e.message} (${e.code})`;
    return false;
  }
}

async function renameGroup() {
  const c = state.convs.get(state.current);
  if (!c || c.kind !== "group") return;
  await changeGroup("PATCH", `/v1/groups/${c.id}`, { name: $("group-rename").value.trim() });
}

async function addMembers() {
  const c = state.convs.get(state.current);
  if (!c || c.kind !== "group") return;
  const members = [...state.picked].filter((m) => !c.members.includes(m));
  if (members.length === 0) {
    $("thread-error").textContent = "Tick the people to add in People first.";
    return;
  }
  if (await changeGroup("POST", `/v1/groups/${c.id}/members`, { members })) {
    state.picked.clear();
    renderPeople();
  }
}

// "Until I unmute" (9999-12-31), as PROTOCOL §5 "Push notifications" names it.
const MUTED_FOREVER_MS = 253402300799000;

async function toggleMute() {
  const c = state.convs.get(state.current);
  if (!c || !c.id) return;
  const muted = c.mutedUntil > Date.now();
  const until = muted ? null : MUTED_FOREVER_MS;
  $("thread-error").textContent = "";
  try {
    await api("PUT", `/v1/conversations/${c.id}/mute`, { muted_until_ms: until });
    c.mutedUntil = until || 0;
    renderConversations();
    renderThread();
  } catch (e) {
    $("thread-error").textContent = `${e.message} (${e.code})`;
  }
}

async function removeMember(c, userId) {
  await changeGroup("DELETE", `/v1/groups/${c.id}/members/${userId}`);
}

// ---------------------------------------------------------------- rendering

function show(view) {
  state.view = view;
  $("auth-view").hidden = view !== "auth";
  $("chat-view").hidden = view !== "chat";
  $("cluster-view").hidden = view !== "cluster";
  $("tab-chat").classList.toggle("active", view === "chat");
  $("tab-cluster").classList.toggle("active", view === "cluster");
  if (view === "cluster") pollCluster();
  if (view === "chat" && state.current) {
    const c = state.convs.get(state.current);
    if (c) acknowledge(c);
  }
}

function formatTime(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function renderConversations() {
  const list = [...state.convs.values()].sort((a, b) => b.lastActivity - a.lastActivity);
  $("conversations").replaceChildren(...list.map((c) => {
    const last = c.messages.get(c.lastSeq);
    return h("li", {
      "data-conversation-id": c.key, "data-kind": c.kind, class: c.key === state.current ? "active" : "",
      onclick: () => openConversation(c.key),
    },
    h("span", { class: "title" }, c.title()),
    c.mutedUntil > Date.now() ? h("span", { class: "muted-icon", title: "notifications muted" }, "🔕") : null,
    c.unread > 0 ? h("span", { class: "unread", title: "unread" }, String(c.unread)) : null,
    typers(c).length ? h("span", { class: "typing-hint" }, "typing…")
      : last ? h("span", { class: "preview" }, preview(last)) : null);
  }));
}

/** Watch the presence of the people of direct chats first, then everyone else listed (the
 * server answers with each one's state now, then pushes changes while the socket lives). */
function watchPresence() {
  if (!state.auth) return;
  const me = state.auth.user_id;
  const peers = [...state.convs.values()].filter((c) => c.kind === "direct").map((c) => c.peer || c.others()[0]);
  const ids = [...new Set([...peers, ...state.users.keys()])].filter((u) => u && u !== me);
  send({ type: "presence", user_ids: ids.slice(0, MAX_PRESENCE_WATCH) });
}

/** "online", "last seen …", or "" when this client does not know. */
function presenceLine(userId) {
  const p = state.presence.get(userId);
  if (!p) return "";
  if (p.online) return "online";
  if (!p.lastSeen) return "offline";
  const d = new Date(p.lastSeen);
  const today = new Date().toDateString() === d.toDateString();
  return "last seen " + (today ? "today at " + formatTime(p.lastSeen) : d.toLocaleDateString() + " " + formatTime(p.lastSeen));
}

/** The open direct chat's header line. */
function renderPresence() {
  const c = state.current ? state.convs.get(state.current) : null;
  const peer = c && c.kind === "direct" ? (c.peer || c.others()[0]) : null;
  const line = peer ? presenceLine(peer) : "";
  $("thread-presence").textContent = line;
  $("thread-presence").dataset.online = line === "online" ? "true" : "false";
}

function renderPeople() {
  const me = state.auth ? state.auth.user_id : null;
  const people = [...state.users.entries()].sort((a, b) => a[1].localeCompare(b[1]));
  const online = (id) => (state.presence.get(id) || {}).online === true;
  $("people").replaceChildren(...people.map(([id, name]) => h("li", {
    "data-user-id": id, "data-username": name, "data-online": id !== me && online(id) ? "true" : "false",
  },
    h("span", { class: "presence-dot", title: id === me ? "" : presenceLine(id) }),
    h("input", {
      type: "checkbox", title: "add to a new group", checked: state.picked.has(id), disabled: id === me,
      onchange: (ev) => { if (ev.target.checked) state.picked.add(id); else state.picked.delete(id); },
    }),
    h("button", { type: "button", class: "open-chat", onclick: () => chatWith(id) }, id === me ? `${name} (you)` : name),
    id === me ? null : h("button", {
      type: "button", class: "contact-toggle", "data-contact": state.contacts.has(id) ? "true" : "false",
      title: state.contacts.has(id) ? "a contact: remove from your contacts" : "add to your contacts",
      onclick: () => toggleContact(id),
    }, state.contacts.has(id) ? "★" : "☆"))));
}

function chatWith(userId) {
  for (const c of state.convs.values()) {
    if (c.kind === "direct" && c.peer === userId) return openConversation(c.key);
  }
  const key = "to:" + userId;
  if (!state.convs.has(key)) {
    const members = userId === state.auth.user_id ? [userId] : [state.auth.user_id, userId].sort();
    state.convs.set(key, new Conversation(key, { kind: "direct", members, peer: userId }));
  }
  openConversation(key);
}

function openConversation(key, fetch = true) {
  const c = state.convs.get(key);
  if (!c) return;
  const changed = state.current !== key;
  state.current = key;
  if (changed) $("thread-error").textContent = "";
  if (fetch && !c.historyLoaded) requestHistory(c);
  acknowledge(c);
  renderConversations();
  renderThread();
  if (changed) $("text").focus();
}

function closeConversation() {
  state.current = null;
  renderThread();
}

function renderThread() {
  const c = state.current ? state.convs.get(state.current) : null;
  $("composer").hidden = !c;
  $("leave-group").hidden = !c || c.kind !== "group";
  const owner = !!c && c.kind === "group" && c.owner === state.auth.user_id;
  $("group-manage").hidden = !owner;
  // A chat that is not stored yet (no id) has nothing to mute.
  const muted = !!c && c.mutedUntil > Date.now();
  $("mute").hidden = !c || !c.id;
  $("mute").dataset.muted = String(muted);
  $("mute").textContent = muted ? "🔕" : "🔔";
  $("mute").title = muted
    ? "Notifications of this chat are muted. Click to unmute."
    : "Mute this chat's notifications (messages still arrive)";
  if (owner && document.activeElement !== $("group-rename")) $("group-rename").value = c.name || "";
  $("older").hidden = !c || !c.hasMore;
  if (!c) {
    $("typing").textContent = "";
    $("thread-title").textContent = "Pick a chat";
    renderPresence();
    $("thread-members").textContent = "";
    $("messages").replaceChildren();
    return;
  }
  $("thread-title").textContent = c.title();
  renderPresence();
  $("typing").textContent = typingLine(c);
  const me = state.auth.user_id;
  // Members, the owner marked; the owner may remove anyone but themselves (they leave instead).
  $("thread-members").replaceChildren(...(c.kind !== "group" ? [] : c.members.flatMap((m, i) => {
    const name = state.users.get(m) || m.slice(0, 8);
    return [i > 0 ? ", " : null, h("span", { class: "member", "data-user-id": m },
      name + (m === c.owner ? " (owner)" : ""),
      owner && m !== me
        ? h("button", { type: "button", class: "remove-member", title: `remove ${name} from the group`,
            onclick: () => removeMember(c, m) }, "✕")
        : null)];
  })));
  const items = [...c.messages.values()].sort((a, b) => a.seq - b.seq).map((m) => {
    const mine = m.sender === me;
    const tick = mine ? c.tickState(m.seq) : null;
    return h("li", {
      class: "msg " + (mine ? "mine" : "theirs"), "data-seq": m.seq, "data-message-id": m.message_id,
      "data-state": tick,
    },
    c.kind === "group" && !mine ? h("span", { class: "sender" }, state.users.get(m.sender) || m.sender.slice(0, 8)) : null,
    m.media ? mediaView(m.media, mine) : null,
    h("span", { class: "body" }, m.body),
    h("span", { class: "meta" }, formatTime(m.sent_at_ms), mine ? h("span", { class: "ticks " + tick, title: tick }, tick === "sent" ? "✓" : "✓✓") : null));
  });
  for (const [id, p] of c.pending) {
    items.push(h("li", { class: "msg mine", "data-client-msg-id": id, "data-state": p.state },
      p.fileName !== undefined ? h("span", { class: "media-file" }, (p.state === "uploading" ? "uploading " : "📎 ") + (p.fileName || "file")) : null,
      h("span", { class: "body" }, p.body),
      h("span", { class: "meta" }, p.state === "failed" ? h("span", { class: "error" }, p.error) : h("span", { class: "ticks pending", title: "waiting for the server" }, "🕓"))));
  }
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.replaceChildren(...items);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------- cluster view

const cluster = { timer: null, last: null, colors: new Map(), sessions: new Map() };

function nodeColor(name) {
  if (!name) return "var(--unowned)";
  if (!cluster.colors.has(name)) {
    const hue = (cluster.colors.size * 137) % 360;
    cluster.colors.set(name, `hsl(${hue} 60% 55%)`);
  }
  return cluster.colors.get(name);
}

function logCluster(text) {
  const log = $("cluster-log");
  log.prepend(h("li", {}, h("time", {}, new Date().toLocaleTimeString()), " ", text));
  while (log.children.length > CLUSTER_LOG_MAX) log.lastChild.remove();
}

/** Learns the other members' addresses, so the socket can fail over when this node dies. */
async function learnEndpoints() {
  try {
    // Through the socket's node: after a failover the page's own node may be the dead one.
    const view = await (await fetch(apiBase() + "/v1/cluster")).json();
    const urls = [wsUrl(location.host), ...view.members.map((m) => wsUrl(m.http))];
    const current = state.endpoints[state.endpointIndex % state.endpoints.length];
    state.endpoints = [...new Set(urls)];
    state.endpointIndex = Math.max(0, state.endpoints.indexOf(current));
  } catch { /* the page's node is down; keep what we know */ }
}

async function fetchCluster() {
  // The page's own node first; when it is down, any member it listed (they allow cross-origin reads).
  const hosts = [location.host, ...((cluster.last && cluster.last.members) || []).map((m) => m.http)];
  let lastErr = null;
  for (const host of [...new Set(hosts)]) {
    try {
      const res = await fetch(`${location.protocol}//${host}/v1/cluster`, { cache: "no-store" });
      if (res.ok) return await res.json();
      lastErr = new Error(`${host}: HTTP ${res.status}`);
    } catch (e) {
      lastErr = new Error(`${host} does not answer`);
    }
  }
  throw lastErr;
}

async function pollCluster() {
  clearTimeout(cluster.timer);
  if (state.view !== "cluster") return;
  try {
    const view = await fetchCluster();
    $("cluster-error").textContent = "";
    diffCluster(cluster.last, view);
    cluster.last = view;
    cluster.sessions.set(view.node, view.sessions);
    renderCluster(view);
    // Sessions per member: each node counts its own.
    await Promise.all(view.members.filter((m) => m.alive && m.node !== view.node).map(async (m) => {
      try {
        const v = await (await fetch(`${location.protocol}//${m.http}/v1/cluster`, { cache: "no-store" })).json();
        cluster.sessions.set(m.node, v.sessions);
      } catch { cluster.sessions.delete(m.node); }
    }));
    renderCluster(view);
  } catch (e) {
    $("cluster-error").textContent = `No node answers: ${e.message}`;
  }
  cluster.timer = setTimeout(pollCluster, CLUSTER_POLL_MS);
}

function diffCluster(before, after) {
  if (!before) {
    const nodes = new Set([after.node, ...after.members.map((m) => m.node)]);
    logCluster(`watching through ${after.node}: ${nodes.size} nodes, ${after.shards.length} shards`);
    return;
  }
  const alive = (v) => new Map([...v.members.map((m) => [m.node, m.alive]), [v.node, true]]);
  const a = alive(before), b = alive(after);
  for (const [n, up] of b) {
    if (a.get(n) === up) continue;
    logCluster(up ? `${n} is up` : `${n} is down`);
  }
  const old = new Map(before.shards.map((s) => [s.shard_id, s]));
  const moves = [];
  for (const s of after.shards) {
    const o = old.get(s.shard_id);
    if (o && (o.owner !== s.owner || o.epoch !== s.epoch)) moves.push(`${s.shard_id}: ${o.owner || "none"} → ${s.owner || "none"} (epoch ${s.epoch})`);
  }
  if (moves.length) logCluster(`${moves.length} shard${moves.length > 1 ? "s" : ""} moved — ${moves.join(", ")}`);
}

function renderCluster(view) {
  $("cluster-updated").textContent = `through ${view.node}, ${new Date().toLocaleTimeString()}`;
  const owned = new Map();
  for (const s of view.shards) if (s.owner) owned.set(s.owner, (owned.get(s.owner) || 0) + 1);
  const rows = [{ node: view.node, alive: true, http: view.members.find((m) => m.node === view.node)?.http || location.host, last_seen_ms_ago: 0, self: true },
    ...view.members.filter((m) => m.node !== view.node)]
    .sort((x, y) => x.node.localeCompare(y.node));
  $("members").tBodies[0].replaceChildren(...rows.map((m) => h("tr", { "data-node": m.node, "data-alive": m.alive ? "true" : "false" },
    h("td", {}, h("span", { class: "swatch", style: { background: nodeColor(m.node) } }), m.node, m.self ? " (this page)" : ""),
    h("td", { class: m.alive ? "up" : "down" }, m.alive ? "up" : "down"),
    h("td", {}, m.http),
    h("td", {}, cluster.sessions.has(m.node) && m.alive ? String(cluster.sessions.get(m.node)) : "–"),
    h("td", { class: "owned" }, String(owned.get(m.node) || 0)),
    h("td", {}, m.self ? "–" : `${m.last_seen_ms_ago} ms ago`))));
  const ev = view.events || {};
  $("cluster-events-counts").textContent =
    `peers declared silent: ${ev.peers_declared_silent ?? 0} · shards lost without hand-off: ${ev.shards_lost ?? 0} · redirects: ${view.redirects ?? 0}`;
  $("shards").replaceChildren(...view.shards.map((s) => h("div", {
    class: "shard " + s.status, "data-shard": s.shard_id, "data-owner": s.owner || "", "data-epoch": s.epoch,
    title: `shard ${s.shard_id}: ${s.owner || "no owner"}, epoch ${s.epoch}, ${s.status}, store ${s.group}`,
    style: { background: nodeColor(s.owner) },
  }, h("b", {}, String(s.shard_id)), h("small", {}, String(s.epoch)))));
}

// ---------------------------------------------------------------- wiring

// A bug in this page is shown, not swallowed: the person (and a test's failure report) sees it.
window.addEventListener("error", (ev) => { $("app-error").textContent = `UI error: ${ev.message}`; });
window.addEventListener("unhandledrejection", (ev) => {
  $("app-error").textContent = `UI error: ${ev.reason && ev.reason.message ? ev.reason.message : ev.reason}`;
});

$("auth").addEventListener("submit", (ev) => { ev.preventDefault(); authenticate("login"); });
$("register").addEventListener("click", () => {
  if ($("auth").reportValidity()) authenticate("register");
});
$("logout").addEventListener("click", () => signOut());
$("notify").addEventListener("click", toggleNotifications);
// A notification was clicked (ui/sw.js): open its chat here.
if (PUSH_SUPPORTED) {
  navigator.serviceWorker.addEventListener("message", (e) => {
    if (!e.data || e.data.type !== "open") return;
    show("chat");
    if (state.convs.has(e.data.conversation_id)) openConversation(e.data.conversation_id);
    else state.openOnLoad = e.data.conversation_id;
  });
}
// Opened from a notification (`/#<conversation id>`): that chat once the list is in.
if (/^#[0-9a-f-]{36}$/.test(location.hash)) state.openOnLoad = location.hash.slice(1);
$("composer").addEventListener("submit", (ev) => { ev.preventDefault(); submitMessage(); });
$("text").addEventListener("input", typed);
$("attach").addEventListener("change", (ev) => {
  const file = ev.target.files && ev.target.files[0];
  ev.target.value = ""; // the same file may be picked again
  attachFile(file);
});
$("text").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); submitMessage(); }
});
$("new-group").addEventListener("submit", (ev) => { ev.preventDefault(); createGroup(); });
$("leave-group").addEventListener("click", leaveGroup);
$("rename-form").addEventListener("submit", (ev) => { ev.preventDefault(); renameGroup(); });
$("add-members").addEventListener("click", addMembers);
$("mute").addEventListener("click", toggleMute);
$("refresh-people").addEventListener("click", (ev) => { ev.preventDefault(); loadPeople(); });
$("refresh-uploads").addEventListener("click", (ev) => { ev.preventDefault(); loadUploads(); });
$("uploads-box").addEventListener("toggle", () => { if ($("uploads-box").open) loadUploads(); });
$("privacy-box").addEventListener("toggle", () => { if ($("privacy-box").open) loadPrivacy(); });
$("privacy-last-seen").addEventListener("change", savePrivacy);
$("privacy-online").addEventListener("change", savePrivacy);
$("privacy-groups").addEventListener("change", savePrivacy);
$("privacy-read-receipts").addEventListener("change", savePrivacy);
$("older").addEventListener("click", () => {
  const c = state.convs.get(state.current);
  if (c) requestHistory(c, Math.min(...c.messages.keys()));
});
$("tab-chat").addEventListener("click", () => show(state.auth ? "chat" : "auth"));
$("tab-cluster").addEventListener("click", () => show("cluster"));
document.addEventListener("visibilitychange", () => {
  const c = state.current && state.convs.get(state.current);
  if (c) acknowledge(c);
});

const saved = store.auth;
if (saved && saved.expires_at_ms > Date.now()) {
  enter(saved);
} else {
  store.auth = null;
  show("auth");
}
