// host.js: the host console, /host.
//
// The API key is used only for the two calls that need it (open and close a
// connection, plus a liveness check); everything else goes over the control
// WebSocket with the connection's client_token, so this page behaves like any
// browser host that was only handed a client_token. That token opens things for
// a limited time (client_token_expires_in), so the page asks the control socket
// for a fresh one (refresh_token) as each passes half its life: a dropped socket
// or preview can reconnect at any point of an hour-long connection.
//
// State lives in one object, `conn`; every change ends in render(), which is
// the single place that enables/disables buttons.
//
// This module is the console itself: the connection (kept for the tab by tabstore.js: a reload
// re-attaches), the stream controls, the control room and the log. Beside it: control.js (the
// control socket: kept alive, reopened after a drop), orchestration.js (audience), simulations.js,
// recordings.js (history, library), channels.js (the channel picker), preview.js (watch link,
// preview) and hostview.js (the console's words).

import { HttpError, fetchJson } from '/static/whep.js';
import { ChannelPicker } from '/static/channels.js';
import { ControlSocket } from '/static/control.js';
import { appendLog, endedText, formatSeconds, hostErrorText, short, showId, showRoom } from '/static/hostview.js';
import { HostPreview, WatchLink } from '/static/preview.js';
import { OrchestrationPanel } from '/static/orchestration.js';
import { RecordingsLibrary, StreamHistory } from '/static/recordings.js';
import { Simulations } from '/static/simulations.js';
import { forgetConnection, keepConnection, keepKey, keptConnection, keptKey } from '/static/tabstore.js';

const STREAM_WARN_S = 30;             // warn this long before the stream's limit
const CONNECTION_WARN_S = 300;        // ...and this long before the connection's end
const PENDING_TIMEOUT_MS = 20000;     // give up waiting for a reply to start/end
const LOG_MAX = 300;

const $ = (id) => document.getElementById(id);
const els = {
  form: $('connect-form'),
  apiKey: $('api-key'),
  connect: $('connect'),
  disconnect: $('disconnect'),
  connState: $('connection-state'),
  info: $('connection-info'),
  connId: $('connection-id'),
  connExpires: $('connection-expires'),
  broadcastId: $('broadcast-id'),
  message: $('host-message'),
  prompt: $('prompt'),
  portrait: $('portrait'),
  start: $('start'),
  send: $('send'),
  end: $('end'),
  status: $('stream-status'),
  preview: $('preview'),
  previewStage: $('preview-stage'),
  previewState: $('preview-state'),
  history: $('history'),
  log: $('log'),
  room: $('room'),
};

/**
 * phase: "disconnected" | "connecting" (POST in flight) | "connected" (have a
 * connection; the socket may be down, see `control.isOpen`) | "lost" (socket cannot
 * be reopened) | "disconnecting".
 * stream: null | {id, prompt, endsAt} ; pending: null | "start" | "end".
 */
const conn = {
  phase: 'disconnected',
  apiKey: '',
  id: null,
  clientToken: null,
  tokenExpiresAt: 0,
  tokenLifeMs: 0,
  broadcast: null,
  stream: null,
  pending: null,
  pendingTimer: null,
  countdownTimer: null,
  lastEnded: null,     // {id, reason} of the last stream, for the status line
  expiryTimer: null,
  expiresAt: 0,        // the connection's end (connection_max_seconds), ms since the epoch
  warned: new Set(),   // the warnings already given: 'stream:<id>', 'connection'
};

const control = new ControlSocket(conn, {
  onMessage: onControl,
  onChange: render,
  onGone: connectionGone,
  onLost: controlLost,
  onStreamGone: () => {
    if (conn.stream) streamEnded({ stream_id: conn.stream.id, reason: 'ended' });
  },
  log,
});
const preview = new HostPreview({
  video: els.preview, stage: els.previewStage, badge: els.previewState, token: previewToken, log,
});

const watchLink = new WatchLink({ apiKey: () => conn.apiKey });
const streamHistory = new StreamHistory(els.history, { key: () => conn.apiKey || els.apiKey.value.trim(), log });

const orchestration = new OrchestrationPanel({
  send: (msg) => control.send(msg),
  log,
  link: () => ({
    connection: conn.phase !== 'disconnected',
    canControl: conn.phase === 'connected' && control.isOpen,
  }),
});

// ---------- small view helpers ----------

function log(text, kind = '') {
  appendLog(els.log, text, kind, LOG_MAX);
}

function showMessage(text, kind = 'error') {
  els.message.hidden = !text;
  els.message.textContent = text || '';
  els.message.dataset.kind = kind;
}

// ---------- render: the one place that decides what is enabled ----------

function render() {
  const connected = conn.phase === 'connected';
  const canControl = connected && control.isOpen;
  const busy = conn.phase === 'connecting' || conn.phase === 'disconnecting';
  const streaming = Boolean(conn.stream);

  els.apiKey.disabled = conn.phase !== 'disconnected';
  channels.disabled = conn.phase !== 'disconnected';
  els.connect.disabled = conn.phase !== 'disconnected';
  els.disconnect.disabled = !(connected || conn.phase === 'lost');
  els.start.disabled = !canControl || streaming || conn.pending !== null;
  els.portrait.disabled = !canControl || streaming || conn.pending !== null;
  els.send.disabled = !canControl || !streaming;
  els.end.disabled = !canControl || !streaming || conn.pending === 'end';

  const [badge, label] = {
    disconnected: ['idle', 'Not connected'],
    connecting: ['connecting', 'Connecting…'],
    disconnecting: ['connecting', 'Disconnecting…'],
    lost: ['error', 'Control channel lost'],
    connected: control.isOpen ? ['live', 'Connected'] : ['reconnecting', 'Reconnecting…'],
  }[conn.phase];
  els.connState.dataset.state = badge === 'live' ? 'waiting' : badge; // "live" red is for streams only
  els.connState.textContent = label;

  renderStatus();
  orchestration.render();
}

function renderStatus() {
  const s = conn.stream;
  if (s) {
    const left = s.endsAt ? ` · ${formatSeconds((s.endsAt - Date.now()) / 1000)} left` : '';
    els.status.dataset.state = 'live';
    els.status.textContent = `live · ${short(s.id)}${left}`;
    const leftS = s.endsAt ? (s.endsAt - Date.now()) / 1000 : Infinity;
    if (leftS <= STREAM_WARN_S && !conn.warned.has(`stream:${s.id}`)) {
      conn.warned.add(`stream:${s.id}`);
      showMessage(`The stream ends in ${Math.max(0, Math.round(leftS))} seconds (its time limit). Start a new one after it to keep going.`, 'warn');
      log('The stream reaches its time limit in 30 seconds.', 'error');
    }
  } else if (conn.pending === 'start') {
    els.status.dataset.state = 'starting';
    els.status.textContent = 'starting…';
  } else if (conn.lastEnded) {
    els.status.dataset.state = 'ended';
    els.status.textContent = `${endedText(conn.lastEnded.reason)} · ${short(conn.lastEnded.id)}`;
  } else {
    els.status.dataset.state = 'idle';
    els.status.textContent = 'idle';
  }
}

// ---------- watch link and preview ----------

function setBroadcast(broadcast) {
  if (!broadcast || !broadcast.broadcast_id) return;
  const changed = conn.broadcast?.broadcast_id !== broadcast.broadcast_id
    || conn.broadcast?.spectator_token !== broadcast.spectator_token;
  conn.broadcast = { ...conn.broadcast, ...broadcast };
  showId(els.broadcastId, broadcast.broadcast_id);
  saveConnection();
  watchLink.show(conn.broadcast);
  if (changed) preview.start(conn.broadcast.broadcast_id);
}

function clearBroadcast() {
  conn.broadcast = null;
  watchLink.clear();
}

const TOKEN_MARGIN_MS = 5000;         // stop using the client_token this long before it expires

/**
 * The token the preview joins with, asked for on every (re)connect. The connection's
 * client_token makes it the host's own preview, which the relay does not count among the
 * viewers; the control socket keeps it fresh. Only if that failed (the control channel was
 * away for a whole token life) does the preview join with the spectator token (counted, but
 * still a picture).
 */
function previewToken() {
  if (conn.clientToken && Date.now() < conn.tokenExpiresAt - TOKEN_MARGIN_MS) return conn.clientToken;
  return conn.broadcast?.spectator_token ?? '';
}

// ---------- streams and history ----------

function setPending(kind) {
  clearTimeout(conn.pendingTimer);
  conn.pending = kind;
  if (kind) {
    // If the relay never answers, don't leave the buttons dead forever.
    conn.pendingTimer = setTimeout(() => {
      log(`No reply to ${kind === 'start' ? 'start_stream' : 'end_stream'} yet; buttons re-enabled.`, 'error');
      conn.pending = null;
      render();
    }, PENDING_TIMEOUT_MS);
  }
}

function streamStarted(msg) {
  setPending(null);
  // seconds_left: a reloaded console joins a stream already under way.
  const left = Number(msg.seconds_left ?? msg.max_duration_seconds);
  conn.stream = {
    id: msg.stream_id,
    prompt: msg.prompt ?? '',
    endsAt: Number.isFinite(left) && left > 0 ? Date.now() + left * 1000 : 0,
  };
  conn.lastEnded = null;
  streamHistory.add(msg.stream_id, msg.prompt);
  clearInterval(conn.countdownTimer);
  conn.countdownTimer = setInterval(renderStatus, 1000);
  preview.setLive(true);
  render();
}

function streamEnded(msg) {
  setPending(null);
  library.refreshSoon(); // its recording joins the library once finished
  const id = msg.stream_id ?? conn.stream?.id ?? '';
  const reason = msg.reason || 'ended';
  if (id) streamHistory.end(id, reason);
  conn.stream = null;
  conn.lastEnded = { id, reason };
  clearInterval(conn.countdownTimer);
  conn.countdownTimer = null;
  preview.setLive(false);
  render();
}

// ---------- control socket messages ----------

function onControl(msg) {
  switch (msg.type) {
    case 'client_token': {
      const ttl = Number(msg.client_token_expires_in);
      if (typeof msg.client_token === 'string' && Number.isFinite(ttl)) {
        conn.clientToken = msg.client_token;
        conn.tokenExpiresAt = Date.now() + ttl * 1000;
        saveConnection();
      }
      break;
    }
    case 'connected':
      setBroadcast(msg.broadcast);
      orchestration.applyState(msg.orchestration);
      orchestration.applyChat(msg.chat);
      break;
    case 'chat':
    case 'chat_cleared':
    case 'chat_state':
    case 'reactions':
      orchestration.onChat(msg);
      break;
    case 'orchestration':
      orchestration.onOrchestration(msg);
      break;
    case 'broadcast_ready':
      log('Broadcast ready.');
      setBroadcast(msg.broadcast);
      break;
    case 'stream_started':
      log(`Stream ${short(msg.stream_id)} started: "${msg.prompt ?? ''}"`);
      streamStarted(msg);
      break;
    case 'stream_ended':
      log(`Stream ${short(msg.stream_id)} ${endedText(msg.reason ?? 'ended')}.`);
      streamEnded(msg);
      break;
    case 'status':
      showRoom(msg);
      break;
    case 'interact_acknowledged':
      log(`Prompt applied: "${msg.prompt ?? ''}"`);
      break;
    case 'input_forwarded': {
      const pid = msg.participant_id;
      const name = pid ? orchestration.participantName(pid, '') : '';
      const who = pid ? ` from ${name || `participant ${short(pid)}`}` : '';
      const via = msg.mode ? ` [${msg.mode}]` : '';
      log(`Audience input forwarded${who}${via}: "${msg.prompt ?? ''}"`, 'audience');
      break;
    }
    case 'error':
      onControlError(msg);
      break;
    case 'disconnected': {
      if (conn.phase === 'disconnecting') break; // our own DELETE: disconnect() finishes up
      // The relay closed the connection (idle timeout, connection_max_seconds...): the
      // streamer is gone, so don't try to reopen the socket.
      const why = {
        expired: 'it reached its maximum age',
        idle_timeout: 'this console was away longer than the idle timeout',
        disconnected: 'it was disconnected',
        shutdown: 'the relay is shutting down',
      }[msg.reason] ?? 'the relay ended it';
      connectionGone(`The connection has ended: ${why}. Connect again to continue.`);
      break;
    }
    default:
      break; // a message this console does not know yet (a newer relay): nothing to show
  }
}

/** The control socket cannot be reopened: the connection may live on, but this page can no longer steer it. */
function controlLost() {
  conn.phase = 'lost';
  log('The control channel cannot be reopened (its client token has expired). Disconnect, then connect again.', 'error');
  showMessage('Lost the control channel. Disconnect, then connect again.');
  render();
}

function onControlError(msg) {
  const text = msg.message || 'The relay refused that.';
  log(text, 'error');
  // A refused orchestration change is said in its panel, next to what was refused.
  if (!orchestration.refused(msg)) showMessage(text);
  // A failed start/end: whatever we were waiting for isn't coming.
  setPending(null);
  if (msg.code === 'NO_ACTIVE_STREAM' && conn.stream) streamEnded({ stream_id: conn.stream.id, reason: 'ended' });
  if (msg.fatal) connectionGone(text);
  else render();
}

// ---------- connect / disconnect ----------

async function connect() {
  const key = els.apiKey.value.trim();
  if (!key) {
    showMessage('Paste an API key first.');
    els.apiKey.focus();
    return;
  }
  keepKey(key);
  conn.apiKey = key;
  conn.phase = 'connecting';
  showMessage('');
  render();
  log('Opening a connection…', 'out');

  let res;
  try {
    const body = JSON.stringify(await channels.connectBody()); // on a channel: a watch link that lasts
    res = await fetchJson('/v1/connections', {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      body,
    });
  } catch (err) {
    conn.phase = 'disconnected';
    const text = hostErrorText(err);
    log(`Could not connect: ${text}`, 'error');
    showMessage(text);
    render();
    return;
  }

  const ttl = Number(res.client_token_expires_in);
  const lifeMs = (Number.isFinite(ttl) && ttl > 0 ? ttl : 600) * 1000;
  const expires = Date.parse(res.expires_at ?? '');
  attach({
    id: res.connection_id,
    clientToken: res.client_token,
    tokenLifeMs: lifeMs,
    tokenExpiresAt: Date.now() + lifeMs,
    expiresAt: Number.isFinite(expires) ? expires : 0,
    broadcast: res.broadcast,
  });
  library.refresh();
  const idle = res.idle_timeout_seconds ? ` It waits ${res.idle_timeout_seconds} s for this console if the page reloads.` : '';
  log(`Connection ${short(res.connection_id)} open.${idle}`);
}

function saveConnection() {
  if (conn.id) keepConnection(conn);
}

/** Take up a connection: a new one, or this tab's own after a reload (from sessionStorage). */
function attach(saved) {
  conn.phase = 'connected';
  conn.id = saved.id;
  conn.clientToken = saved.clientToken;
  conn.tokenLifeMs = saved.tokenLifeMs;
  conn.tokenExpiresAt = saved.tokenExpiresAt;
  conn.expiresAt = saved.expiresAt || 0;
  conn.stream = null;
  conn.lastEnded = null;
  conn.warned.clear();
  showId(els.connId, saved.id);
  els.connExpires.textContent = conn.expiresAt ? new Date(conn.expiresAt).toLocaleString() : '—';
  els.info.hidden = false;
  saveConnection();
  setBroadcast(saved.broadcast);
  control.start();
  clearInterval(conn.expiryTimer);
  conn.expiryTimer = setInterval(warnExpiry, 1000);
  render();
}

/** The connection's own end (connection_max_seconds) is near: say so once, five minutes ahead. */
function warnExpiry() {
  if (!conn.expiresAt || conn.warned.has('connection')) return;
  const left = (conn.expiresAt - Date.now()) / 1000;
  if (left > CONNECTION_WARN_S) return;
  conn.warned.add('connection');
  showMessage(`This connection ends in ${formatSeconds(left)} (its maximum age). Disconnect and connect again before then to keep broadcasting.`, 'warn');
  log('The connection reaches its maximum age in 5 minutes.', 'error');
}

async function disconnect() {
  if (!conn.id) return;
  const id = conn.id;
  conn.phase = 'disconnecting';
  render();
  log('Disconnecting…', 'out');
  try {
    await fetchJson(`/v1/connections/${encodeURIComponent(id)}`, {
      method: 'DELETE',
      headers: { Authorization: `Bearer ${conn.apiKey}` },
    });
    log('Disconnected.');
  } catch (err) {
    // 404: it was already gone. Either way this page is done with it.
    if (!(err instanceof HttpError && [401, 404].includes(err.status))) log(`Disconnect: ${hostErrorText(err)}`, 'error');
  }
  resetConnection();
  showMessage('');
}

/** The relay ended the connection (fatal error, timeout): clean up locally. */
function connectionGone(text) {
  log(text, 'error');
  showMessage(text);
  resetConnection();
}

function resetConnection() {
  control.close('disconnect');
  if (conn.stream) streamEnded({ stream_id: conn.stream.id, reason: 'disconnected' });
  clearInterval(conn.countdownTimer);
  clearInterval(conn.expiryTimer);
  forgetConnection();
  setPending(null);
  preview.stop();
  clearBroadcast();
  orchestration.clear();
  Object.assign(conn, {
    phase: 'disconnected',
    id: null,
    clientToken: null,
    stream: null,
    countdownTimer: null,
    expiryTimer: null,
    expiresAt: 0,
  });
  els.info.hidden = true;
  els.room.hidden = true;
  render();
}

// ---------- stream controls ----------

function promptValue() {
  const prompt = els.prompt.value.trim();
  if (!prompt) {
    showMessage('Type a prompt first.', 'warn');
    els.prompt.focus();
  }
  return prompt;
}

function startStream() {
  const prompt = promptValue();
  if (!prompt) return;
  const msg = { type: 'start_stream', prompt };
  if (els.portrait.checked) msg.portrait = true;
  if (!control.send(msg)) return;
  showMessage('');
  log(`start_stream: "${prompt}"${msg.portrait ? ' (portrait)' : ''}`, 'out');
  setPending('start');
  render();
}

function sendPrompt() {
  const prompt = promptValue();
  if (!prompt) return;
  if (!control.send({ type: 'interact', prompt })) return;
  showMessage('');
  log(`interact: "${prompt}"`, 'out');
  els.prompt.select(); // typing the next prompt replaces this one
}

function endStream() {
  if (!control.send({ type: 'end_stream' })) return;
  log('end_stream', 'out');
  setPending('end');
  render();
}

els.form.addEventListener('submit', (e) => {
  e.preventDefault();
  if (!els.connect.disabled) connect();
});
els.disconnect.addEventListener('click', disconnect);
els.start.addEventListener('click', startStream);
els.send.addEventListener('click', sendPrompt);
els.end.addEventListener('click', endStream);
els.prompt.addEventListener('keydown', (e) => {
  if (e.key !== 'Enter' || e.isComposing || e.shiftKey) return;
  e.preventDefault();
  // Enter does whichever of the two is possible: steer a live stream, or start one.
  if (!els.send.disabled) sendPrompt();
  else if (!els.start.disabled) startStream();
});
els.apiKey.addEventListener('change', () => {
  keepKey(els.apiKey.value.trim());
  channels.refresh();
});

// Leaving (or reloading) the page does not end the broadcast: the connection waits for this
// tab to come back (its client token is kept in sessionStorage) until the relay's idle timeout;
// Disconnect is the way to end it. Only while live does the browser ask before leaving.
window.addEventListener('beforeunload', (e) => {
  if (!conn.stream) return;
  e.preventDefault();
  e.returnValue = ''; // older Chromium asks only with this set
});

window.addEventListener('pagehide', () => {
  if (conn.phase !== 'connected') return;
  preview.stop();
  control.close('page hidden'); // ours, not a drop to recover from
});

// Restored from the back/forward cache: pick the connection up again where pagehide left it.
window.addEventListener('pageshow', (e) => {
  if (!e.persisted || conn.phase !== 'connected') return;
  if (conn.broadcast) preview.start(conn.broadcast.broadcast_id);
  control.recover();
});

// ---------- init ----------

els.apiKey.value = keptKey();
const simulations = new Simulations({ keyField: els.apiKey, connectionKey: () => conn.apiKey, log });
const library = new RecordingsLibrary({ key: () => conn.apiKey || els.apiKey.value.trim(), log });
const channels = new ChannelPicker({ key: () => conn.apiKey || els.apiKey.value.trim(), log });
const saved = keptConnection();
if (saved && els.apiKey.value) {
  // A reload: back onto this tab's connection; the control socket (or its recovery) finds out
  // whether the relay still has it.
  conn.apiKey = els.apiKey.value;
  log(`Re-attaching to connection ${short(saved.id)}…`, 'out');
  attach(saved);
} else {
  render();
}
simulations.refresh();
library.refresh();
channels.refresh();
