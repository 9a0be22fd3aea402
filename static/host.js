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

import { WhepPlayer, HttpError, fetchJson, wsUrl } from '/static/whep.js';
import { Deadline, clock, el, seconds, syncList } from '/static/ui.js';

const KEY_STORAGE = 'relay.apiKey';   // sessionStorage: gone when the tab closes
const KEEPALIVE_MS = 10000;           // well inside the relay's idle_timeout_seconds (default 40)
const SOCKET_BACKOFF_MAX_MS = 10000;
const PENDING_TIMEOUT_MS = 20000;     // give up waiting for a reply to start/end
const LOG_MAX = 300;
const ORCH_REPLY_MS = 5000;           // an orchestration change not confirmed by then: say so
const RECORDING_WAIT_MS = 15000;      // a recording finishes about a second after its stream

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
  watchUrl: $('watch-url'),
  watchEmpty: $('watch-url-empty'),
  copy: $('copy-watch-url'),
  hlsRow: $('hls-row'),
  hlsUrl: $('hls-url'),
  preview: $('preview'),
  previewStage: $('preview-stage'),
  previewState: $('preview-state'),
  history: $('history'),
  log: $('log'),
  orch: $('orchestration'),
  orchLiveMode: $('orch-live-mode'),
  orchForm: $('orch-form'),
  orchHelp: $('orch-mode-help'),
  orchApply: $('orch-apply'),
  orchReset: $('orch-reset'),
  orchStatus: $('orch-status'),
  orchQueueBox: $('orch-queue-box'),
  orchQueue: $('orch-queue'),
  orchQueueCount: $('orch-queue-count'),
  orchVoteBox: $('orch-vote-box'),
  orchCandidates: $('orch-candidates'),
  orchVoteCountdown: $('orch-vote-countdown'),
  orchTurnBox: $('orch-turn-box'),
  orchTurnHolder: $('orch-turn-holder'),
  orchTurnCountdown: $('orch-turn-countdown'),
  orchHands: $('orch-hands'),
  orchHandsCount: $('orch-hands-count'),
  participants: $('participants'),
  participantsCount: $('participants-count'),
  simForm: $('sim-form'),
  simScript: $('sim-script'),
  simPortrait: $('sim-portrait'),
  simSubmit: $('sim-submit'),
  simExample: $('sim-example'),
  simRefresh: $('sim-refresh'),
  simMessage: $('sim-message'),
  simActive: $('sim-active'),
  simCount: $('sim-count'),
  simListStatus: $('sim-list-status'),
  simJobs: $('sim-jobs'),
};

/**
 * phase: "disconnected" | "connecting" (POST in flight) | "connected" (have a
 * connection; the socket may be down, see `socketOpen`) | "lost" (socket cannot
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
  socket: null,
  socketOpen: false,
  socketAttempt: 0,
  socketRetryTimer: null,
  keepaliveTimer: null,
  stream: null,
  pending: null,
  pendingTimer: null,
  countdownTimer: null,
  lastEnded: null,     // {id, reason} of the last stream, for the status line
};

let preview = null;
const historyItems = new Map(); // stream_id -> <li>

// ---------- small view helpers ----------

function log(text, kind = '') {
  const li = document.createElement('li');
  if (kind) li.dataset.kind = kind;
  const time = document.createElement('time');
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString();
  li.append(time, document.createTextNode(text)); // textContent only: messages carry user prompts
  const atBottom = els.log.scrollHeight - els.log.scrollTop - els.log.clientHeight < 24;
  els.log.append(li);
  while (els.log.childElementCount > LOG_MAX) els.log.firstElementChild.remove();
  if (atBottom) els.log.scrollTop = els.log.scrollHeight;
}

function showMessage(text, kind = 'error') {
  els.message.hidden = !text;
  els.message.textContent = text || '';
  els.message.dataset.kind = kind;
}

function errorText(err) {
  if (err instanceof HttpError) return err.action ? `${err.message} ${err.action}` : err.message;
  return 'Network error: could not reach the relay.';
}

function formatSeconds(total) {
  const s = Math.max(0, Math.ceil(total));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

// ---------- render: the one place that decides what is enabled ----------

function render() {
  const connected = conn.phase === 'connected';
  const canControl = connected && conn.socketOpen;
  const busy = conn.phase === 'connecting' || conn.phase === 'disconnecting';
  const streaming = Boolean(conn.stream);

  els.apiKey.disabled = conn.phase !== 'disconnected';
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
    connected: conn.socketOpen ? ['live', 'Connected'] : ['reconnecting', 'Reconnecting…'],
  }[conn.phase];
  els.connState.dataset.state = badge === 'live' ? 'waiting' : badge; // "live" red is for streams only
  els.connState.textContent = label;

  renderStatus();
  renderOrchestration();
}

function renderStatus() {
  const s = conn.stream;
  if (s) {
    const left = s.endsAt ? ` · ${formatSeconds((s.endsAt - Date.now()) / 1000)} left` : '';
    els.status.dataset.state = 'live';
    els.status.textContent = `live · ${s.id}${left}`;
  } else if (conn.pending === 'start') {
    els.status.dataset.state = 'starting';
    els.status.textContent = 'starting…';
  } else if (conn.lastEnded) {
    els.status.dataset.state = 'ended';
    els.status.textContent = `ended (${conn.lastEnded.reason}) · ${conn.lastEnded.id}`;
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
  els.broadcastId.textContent = broadcast.broadcast_id;

  // watch_url is absolute in the contract; resolve anyway, and add the spectator
  // token if the relay left it out, so the link works when pasted as is.
  const token = conn.broadcast.spectator_token;
  const url = new URL(
    conn.broadcast.watch_url || `/watch/${encodeURIComponent(broadcast.broadcast_id)}`,
    window.location.href,
  );
  if (token && !url.searchParams.has('token')) url.searchParams.set('token', token);
  els.watchUrl.href = url.href;
  els.watchUrl.textContent = url.href;
  els.watchUrl.hidden = false;
  els.watchEmpty.hidden = true;
  els.copy.disabled = false;
  // The same broadcast as live HLS (null when the relay has it off): for OBS, VLC or a CDN origin.
  const hls = conn.broadcast.hls_url ? new URL(conn.broadcast.hls_url, window.location.href).href : '';
  els.hlsUrl.href = hls || '#';
  els.hlsUrl.textContent = hls;
  els.hlsRow.hidden = !hls;

  if (changed) startPreview();
}

function clearBroadcast() {
  conn.broadcast = null;
  els.watchUrl.hidden = true;
  els.watchUrl.removeAttribute('href');
  els.watchUrl.textContent = '';
  els.watchEmpty.hidden = false;
  els.copy.disabled = true;
  els.hlsRow.hidden = true;
  els.hlsUrl.textContent = '';
}

const PREVIEW_LABELS = {
  connecting: ['connecting', 'Connecting'],
  connected: ['waiting', 'Connected'],
  reconnecting: ['reconnecting', 'Reconnecting'],
  failed: ['error', 'Unavailable'],
  stopped: ['idle', 'Off'],
};

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

function startPreview() {
  stopPreview();
  const b = conn.broadcast;
  // Same origin as this page: the relay that served it is the one to watch from.
  preview = new WhepPlayer({
    endpoint: `/v1/broadcasts/${encodeURIComponent(b.broadcast_id)}/whep`,
    token: previewToken,
    // The relay takes the client_token on the offer only: its session's PATCH/DELETE would
    // refuse it (401) and the preview would linger. The Location is the capability anyway.
    sessionAuth: false,
    video: els.preview,
    onStatus: ({ state, message, retryInMs }) => {
      let [badge, label] = PREVIEW_LABELS[state] ?? ['idle', state];
      if (state === 'connected' && conn.stream) [badge, label] = ['live', 'Live'];
      els.previewState.dataset.state = badge;
      els.previewState.textContent = label;
      if (message && (state === 'failed' || retryInMs)) log(`Preview: ${message}`, state === 'failed' ? 'error' : '');
    },
  });
  preview.setLive(Boolean(conn.stream));
  preview.start();
}

function stopPreview() {
  if (preview) preview.stop();
  preview = null;
}

function refreshPreviewBadge() {
  if (!preview || preview.state !== 'connected') return;
  els.previewState.dataset.state = conn.stream ? 'live' : 'waiting';
  els.previewState.textContent = conn.stream ? 'Live' : 'Connected';
}

function fitPreview() {
  const { videoWidth: w, videoHeight: h } = els.preview;
  if (w && h) els.previewStage.style.setProperty('--ar', `${w} / ${h}`);
}
els.preview.addEventListener('loadedmetadata', fitPreview);
els.preview.addEventListener('resize', fitPreview);

els.copy.addEventListener('click', async () => {
  const text = els.watchUrl.href;
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    // navigator.clipboard needs a secure context (https or localhost): fall back.
    const ta = document.createElement('textarea');
    ta.value = text;
    ta.setAttribute('readonly', '');
    ta.style.position = 'fixed';
    ta.style.opacity = '0';
    document.body.append(ta);
    ta.select();
    try {
      ok = document.execCommand('copy');
    } catch {
      ok = false;
    }
    ta.remove();
  }
  els.copy.textContent = ok ? 'Copied' : 'Copy failed';
  setTimeout(() => {
    els.copy.textContent = 'Copy';
  }, 1500);
});

// ---------- streams and history ----------

function addHistory(id, prompt) {
  if (historyItems.has(id)) return;
  const li = document.createElement('li');
  const idEl = document.createElement('span');
  idEl.className = 'id';
  idEl.textContent = id;
  const reason = document.createElement('span');
  reason.className = 'reason';
  reason.dataset.live = '';
  reason.textContent = 'live';
  const p = document.createElement('span');
  p.className = 'prompt';
  p.textContent = prompt || '';
  const rec = document.createElement('button');
  rec.type = 'button';
  rec.className = 'recording small-btn';
  rec.textContent = 'Recording';
  rec.hidden = true; // until the stream has ended
  rec.title = 'Open the replay of this stream in a new tab';
  rec.addEventListener('click', () => openRecording(id, rec));
  li.append(idEl, reason, p, rec);
  els.history.prepend(li); // newest first
  historyItems.set(id, li);
}

function endHistory(id, reasonText) {
  const reason = historyItems.get(id)?.querySelector('.reason');
  if (!reason) return;
  delete reason.dataset.live;
  reason.textContent = reasonText;
  const rec = historyItems.get(id)?.querySelector('.recording');
  if (rec) rec.hidden = false;
}

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
  const max = Number(msg.max_duration_seconds);
  conn.stream = {
    id: msg.stream_id,
    prompt: msg.prompt ?? '',
    endsAt: Number.isFinite(max) && max > 0 ? Date.now() + max * 1000 : 0,
  };
  conn.lastEnded = null;
  addHistory(msg.stream_id, msg.prompt);
  clearInterval(conn.countdownTimer);
  conn.countdownTimer = setInterval(renderStatus, 1000);
  preview?.setLive(true);
  refreshPreviewBadge();
  render();
}

function streamEnded(msg) {
  setPending(null);
  const id = msg.stream_id ?? conn.stream?.id ?? '';
  const reason = msg.reason || 'ended';
  if (id) endHistory(id, reason);
  conn.stream = null;
  conn.lastEnded = { id, reason };
  clearInterval(conn.countdownTimer);
  conn.countdownTimer = null;
  preview?.setLive(false);
  refreshPreviewBadge();
  render();
}

// ---------- audience orchestration ----------
//
// The relay's host state ({mode, settings, queue, candidates, window_ends_at, turn,
// participants}) arrives in `connected` and in `orchestration` pushes. The form shows the
// live settings until the host edits it; Apply sends {type: "orchestration", mode, ...settings}.

const MODES = {
  host: { label: 'Host', help: 'Only you prompt. Spectators watch; their inputs are refused.' },
  queue: { label: 'Queue', help: 'Spectators\u2019 prompts wait in line; one is applied every interval.' },
  vote: { label: 'Vote', help: 'Spectators propose and vote; when the window closes the winner is applied.' },
  turns: { label: 'Turns', help: 'Spectators raise hands; the one holding the turn steers the world directly.' },
};
// The settings each mode uses (moderation applies to all three audience modes).
const MODERATION = ['max_prompt_chars', 'cooldown_seconds', 'blocked_words'];
const MODE_SETTINGS = {
  host: [],
  queue: ['queue_interval_seconds', ...MODERATION],
  vote: ['vote_window_seconds', ...MODERATION],
  turns: ['turn_seconds', ...MODERATION],
};

const orch = {
  state: null,       // the relay's last host state
  selected: null,    // the mode picked in the switcher
  dirty: false,      // the form differs from what the relay has (the host is editing)
  pending: null,     // {timer} while a change waits for the relay's confirmation
  pendingAction: null, // block/unblock/grant_turn/revoke_turn sent, not yet answered
  timer: null,       // countdowns
  voteDeadline: new Deadline(),
  turnDeadline: new Deadline(),
  participantRows: new Map(),
  candidateRows: new Map(),
};

function settingInput(name) {
  return els.orchForm.elements.namedItem(name);
}

function fillSettings(settings = {}) {
  for (const name of ['queue_interval_seconds', 'vote_window_seconds', 'turn_seconds', ...MODERATION]) {
    const input = settingInput(name);
    if (!input || !(name in settings)) continue;
    const v = settings[name];
    input.value = Array.isArray(v) ? v.join(', ') : String(v ?? '');
  }
}

function selectMode(mode) {
  orch.selected = mode;
  for (const radio of els.orchForm.querySelectorAll('input[name="mode"]')) radio.checked = radio.value === mode;
}

function setOrchestration(state) {
  if (!state || typeof state !== 'object' || !state.mode) return;
  orch.state = state;
  if (orch.pending) {
    clearTimeout(orch.pending.timer);
    orch.pending = null;
    orch.dirty = false;
    setOrchStatus(`Applied: ${MODES[state.mode]?.label ?? state.mode} mode.`, 'ok');
  }
  if (!orch.dirty) {
    selectMode(state.mode);
    fillSettings(state.settings);
  }
  const s = state.settings ?? {};
  orch.voteDeadline.update(state.window_ends_at, s.vote_window_seconds);
  orch.turnDeadline.update(state.turn?.ends_at, s.turn_seconds);
  renderOrchestration();
}

function clearOrchestration() {
  orch.state = null;
  orch.dirty = false;
  if (orch.pending) clearTimeout(orch.pending.timer);
  orch.pending = null;
  orch.participantRows.clear();
  orch.candidateRows.clear();
  els.participants.replaceChildren();
  els.orchCandidates.replaceChildren();
  setOrchStatus('');
}

function setOrchStatus(text, kind = '') {
  els.orchStatus.textContent = text;
  els.orchStatus.dataset.kind = kind;
}

function participantName(id, fallback = 'Anonymous') {
  const p = (orch.state?.participants ?? []).find((x) => x.participant_id === id);
  return p?.name || fallback;
}

function renderOrchestration() {
  const state = orch.state;
  const canControl = conn.phase === 'connected' && conn.socketOpen;
  els.orch.hidden = !state || conn.phase === 'disconnected';
  if (els.orch.hidden) {
    stopOrchTimer();
    return;
  }
  const live = state.mode;
  const selected = orch.selected ?? live;
  els.orchLiveMode.textContent = `Now: ${MODES[live]?.label ?? live}`;
  els.orchHelp.textContent = MODES[selected]?.help ?? '';
  const fields = MODE_SETTINGS[selected] ?? [];
  for (const label of els.orchForm.querySelectorAll('.setting')) {
    label.hidden = !label.dataset.modes.split(' ').includes(selected);
  }
  els.orchForm.querySelector('#orch-settings').hidden = fields.length === 0;
  for (const radio of els.orchForm.querySelectorAll('input')) radio.disabled = !canControl;
  els.orchApply.disabled = !canControl || !orch.dirty || Boolean(orch.pending);
  els.orchApply.textContent = selected !== live ? `Switch to ${MODES[selected]?.label ?? selected}` : 'Apply';
  els.orchReset.hidden = !orch.dirty;

  els.orchQueueBox.hidden = live !== 'queue';
  els.orchVoteBox.hidden = live !== 'vote';
  els.orchTurnBox.hidden = live !== 'turns';
  if (live === 'queue') renderOrchQueue(state.queue ?? []);
  if (live === 'vote') renderOrchCandidates(state.candidates ?? []);
  if (live === 'turns') renderOrchTurn(state.turn ?? {});
  renderParticipants(state.participants ?? [], live, state.turn ?? {});
  tickOrchestration();
  if (live === 'vote' || live === 'turns') startOrchTimer();
  else stopOrchTimer();
}

function renderOrchQueue(queue) {
  els.orchQueueCount.textContent = queue.length ? `(${queue.length})` : '';
  els.orchQueue.replaceChildren(...queue.map((q, i) => el('li', { className: 'entry' },
    el('span', { className: 'pos', text: `${i + 1}` }),
    el('span', { className: 'prompt wrap', text: q.prompt ?? '' }),
    el('span', { className: 'who', text: q.name || participantName(q.participant_id) }))));
}

function renderOrchCandidates(candidates) {
  const total = candidates.reduce((n, c) => n + (Number(c.votes) || 0), 0);
  const top = Math.max(0, ...candidates.map((c) => Number(c.votes) || 0));
  syncList(els.orchCandidates, candidates, (c) => c.candidate_id, (c) => {
    const row = el('li', { className: 'entry candidate', dataset: { candidateId: c.candidate_id } },
      el('span', { className: 'prompt wrap' }),
      el('span', { className: 'votes' }),
      el('span', { className: 'meter', attrs: { 'aria-hidden': 'true' } }, el('span', { className: 'bar' })));
    return row;
  }, (row, c) => {
    const n = Number(c.votes) || 0;
    row.querySelector('.prompt').textContent = c.prompt ?? '';
    row.querySelector('.votes').textContent = `${n} ${n === 1 ? 'vote' : 'votes'}`;
    row.querySelector('.bar').style.width = `${total ? Math.round((100 * n) / total) : 0}%`;
    row.classList.toggle('leading', n > 0 && n === top);
  }, orch.candidateRows);
}

function renderOrchTurn(turn) {
  const holder = turn.holder;
  els.orchTurnHolder.textContent = holder ? (holder.name || participantName(holder.participant_id)) : 'Nobody';
  const hands = turn.hands ?? [];
  els.orchHandsCount.textContent = hands.length ? `(${hands.length})` : '';
  els.orchHands.replaceChildren(...hands.map((h, i) => el('li', { className: 'entry' },
    el('span', { className: 'pos', text: `${i + 1}` }),
    el('span', { className: 'prompt wrap', text: h.name || participantName(h.participant_id) }))));
}

function renderParticipants(participants, mode, turn) {
  const canControl = conn.phase === 'connected' && conn.socketOpen;
  els.participantsCount.textContent = participants.length ? `(${participants.length})` : '';
  const holder = turn.holder?.participant_id ?? null;
  const hands = new Set((turn.hands ?? []).map((h) => h.participant_id));
  const queued = new Set((orch.state?.queue ?? []).map((q) => q.participant_id));
  syncList(els.participants, participants, (p) => p.participant_id, (p) => {
    const id = p.participant_id;
    const block = el('button', { className: 'small-btn', attrs: { type: 'button' }, dataset: { action: 'block' } });
    block.addEventListener('click', () => {
      const blocked = block.dataset.blocked === 'true';
      hostAction({ type: blocked ? 'unblock' : 'block', participant_id: id },
        `${blocked ? 'Unblocked' : 'Blocked'} ${participantName(id)} (${id}).`);
    });
    const give = el('button', { className: 'small-btn', text: 'Give turn', attrs: { type: 'button' }, dataset: { action: 'grant' } });
    give.addEventListener('click', () => hostAction({ type: 'grant_turn', participant_id: id },
      `Gave the turn to ${participantName(id)} (${id}).`));
    const revoke = el('button', { className: 'small-btn', text: 'Revoke turn', attrs: { type: 'button' }, dataset: { action: 'revoke' } });
    revoke.addEventListener('click', () => hostAction({ type: 'revoke_turn' },
      `Revoked ${participantName(id)}\u2019s turn.`));
    return el('li', { className: 'entry participant', dataset: { participantId: id } },
      el('span', { className: 'pname wrap' }),
      el('span', { className: 'pid', text: id }),
      el('span', { className: 'tags' }),
      el('span', { className: 'actions' }, give, revoke, block));
  }, (row, p) => {
    const id = p.participant_id;
    row.querySelector('.pname').textContent = p.name || 'Anonymous';
    row.querySelector('.pname').classList.toggle('muted', !p.name);
    row.classList.toggle('blocked', Boolean(p.blocked));
    const tags = [];
    if (p.blocked) tags.push(['blocked', 'Blocked']);
    if (mode === 'turns' && id === holder) tags.push(['turn', 'Has the turn']);
    else if (mode === 'turns' && hands.has(id)) tags.push(['hand', 'Hand raised']);
    if (mode === 'queue' && queued.has(id)) tags.push(['queued', 'Queued']);
    row.querySelector('.tags').replaceChildren(...tags.map(([k, t]) => el('span', { className: 'tag', text: t, dataset: { tag: k } })));
    const block = row.querySelector('[data-action="block"]');
    block.dataset.blocked = String(Boolean(p.blocked));
    block.textContent = p.blocked ? 'Unblock' : 'Block';
    block.classList.toggle('danger', !p.blocked);
    block.disabled = !canControl;
    const give = row.querySelector('[data-action="grant"]');
    const revoke = row.querySelector('[data-action="revoke"]');
    give.hidden = mode !== 'turns' || id === holder || Boolean(p.blocked);
    revoke.hidden = mode !== 'turns' || id !== holder;
    give.disabled = !canControl;
    revoke.disabled = !canControl;
  }, orch.participantRows);
}

function tickOrchestration() {
  const state = orch.state;
  if (!state) return;
  const voting = state.mode === 'vote' && orch.voteDeadline.active && (state.candidates ?? []).length > 0;
  els.orchVoteCountdown.hidden = !voting;
  if (voting) {
    const left = orch.voteDeadline.left;
    els.orchVoteCountdown.textContent = left > 0 ? `${clock(left)} left` : 'Counting…';
    els.orchVoteCountdown.dataset.urgent = String(left <= 5000);
  }
  const turning = state.mode === 'turns' && orch.turnDeadline.active && Boolean(state.turn?.holder);
  els.orchTurnCountdown.hidden = !turning;
  if (turning) {
    const left = orch.turnDeadline.left;
    els.orchTurnCountdown.textContent = `${clock(left)} left`;
    els.orchTurnCountdown.dataset.urgent = String(left <= 5000);
  }
}

function startOrchTimer() {
  if (!orch.timer) orch.timer = setInterval(tickOrchestration, 250);
}

function stopOrchTimer() {
  clearInterval(orch.timer);
  orch.timer = null;
}

/** Sends one orchestration message; the relay answers with the new state, or an error. */
function hostAction(msg, text) {
  if (!send(msg)) {
    setOrchStatus('The control channel is not open.', 'error');
    return false;
  }
  log(`${msg.type}${msg.participant_id ? ` ${msg.participant_id}` : ''}`, 'out');
  if (text) setOrchStatus(text);
  orch.pendingAction = msg.type;
  return true;
}

function readSettings(mode) {
  const body = {};
  for (const name of MODE_SETTINGS[mode] ?? []) {
    const input = settingInput(name);
    if (name === 'blocked_words') {
      body[name] = input.value.split(/[,\n]/).map((w) => w.trim()).filter(Boolean);
      continue;
    }
    const raw = input.value.trim();
    if (raw === '') continue; // unchanged: the relay keeps its value
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(`${input.closest('label').querySelector('span').textContent} must be a number.`);
    body[name] = value;
  }
  return body;
}

function applyOrchestration() {
  const mode = orch.selected ?? orch.state?.mode ?? 'host';
  if (!els.orchForm.reportValidity()) return;
  let settings;
  try {
    settings = readSettings(mode);
  } catch (err) {
    setOrchStatus(err.message, 'error');
    return;
  }
  const msg = { type: 'orchestration', mode, ...settings };
  if (!send(msg)) {
    setOrchStatus('The control channel is not open.', 'error');
    return;
  }
  log(`orchestration: ${JSON.stringify({ mode, ...settings })}`, 'out');
  setOrchStatus('Applying…');
  orch.pending = {
    timer: setTimeout(() => {
      orch.pending = null;
      setOrchStatus('The relay has not confirmed the change.', 'error');
      renderOrchestration();
    }, ORCH_REPLY_MS),
  };
  renderOrchestration();
}

/** An error on the control channel while an orchestration change was pending: it was refused. */
function orchestrationRefused(msg) {
  if (!['INVALID_REQUEST', 'NOT_FOUND'].includes(msg.code)) return false; // a stream error, not ours
  const field = msg.details?.field;
  const detail = field && !String(msg.message ?? '').includes(field) ? ` (${field})` : '';
  if (orch.pending) {
    clearTimeout(orch.pending.timer);
    orch.pending = null;
    setOrchStatus(`Not applied: ${msg.message || msg.code}${detail}`, 'error');
    renderOrchestration();
    return true;
  }
  if (orch.pendingAction) {
    orch.pendingAction = null;
    setOrchStatus(`Refused: ${msg.message || msg.code}`, 'error');
    return true;
  }
  return false;
}

els.orchForm.addEventListener('change', (e) => {
  if (e.target.name === 'mode') selectMode(e.target.value);
  orch.dirty = true;
  setOrchStatus('');
  renderOrchestration();
});
els.orchForm.addEventListener('input', () => {
  if (!orch.dirty) {
    orch.dirty = true;
    renderOrchestration();
  }
});
els.orchForm.addEventListener('submit', (e) => {
  e.preventDefault();
  if (!els.orchApply.disabled) applyOrchestration();
});
els.orchReset.addEventListener('click', () => {
  orch.dirty = false;
  setOrchStatus('');
  if (orch.state) {
    selectMode(orch.state.mode);
    fillSettings(orch.state.settings);
  }
  renderOrchestration();
});

// ---------- recordings ----------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Opens a stream's replay page. Its link is signed by the relay (GET /v1/recordings/{id}
 * with the API key) and expires, so it is asked for on each click. The tab is opened
 * synchronously, inside the click, so no popup blocker stops it; it is pointed at the
 * replay page once the link is known. A recording takes a moment to finish after its
 * stream ends ("recording"): retried briefly.
 */
async function openRecording(id, button) {
  const key = conn.apiKey || els.apiKey.value.trim();
  const tab = window.open('', '_blank');
  if (tab) {
    tab.opener = null;
    try {
      tab.document.title = 'Loading the recording…';
      tab.document.body.style.cssText = 'background:#0d0f14;color:#9aa3b2;font:16px system-ui;padding:24px';
      tab.document.body.textContent = 'Loading the recording…';
    } catch {
      // Not ours to write to: it will simply be blank for a moment.
    }
  }
  button.disabled = true;
  button.textContent = 'Loading…';
  const deadline = Date.now() + RECORDING_WAIT_MS;
  try {
    let rec;
    for (;;) {
      try {
        rec = await fetchJson(`/v1/recordings/${encodeURIComponent(id)}`, {
          headers: { Authorization: `Bearer ${key}` },
        });
      } catch (err) {
        // Right after the stream, the recording may not be listed yet.
        if (!(err instanceof HttpError && err.status === 404) || Date.now() > deadline) throw err;
        rec = null;
      }
      if (rec && rec.status !== 'recording') break;
      if (Date.now() > deadline) break;
      await sleep(400);
    }
    if (!rec?.replay_url) throw new Error('The relay gave no replay link.');
    if (tab && !tab.closed) tab.location.replace(rec.replay_url);
    else window.open(rec.replay_url, '_blank', 'noopener');
    log(`Opened the recording of ${id}${rec.status && rec.status !== 'complete' ? ` (${rec.status})` : ''}.`);
    button.textContent = 'Recording';
  } catch (err) {
    if (tab && !tab.closed) tab.close();
    const text = err instanceof HttpError ? errorText(err) : err.message || 'Network error: could not reach the relay.';
    log(`Recording of ${id}: ${text}`, 'error');
    button.textContent = err instanceof HttpError && err.status === 404 ? 'No recording' : 'Retry recording';
  } finally {
    button.disabled = false;
  }
}

// ---------- control socket ----------

function send(msg) {
  if (!conn.socket || conn.socket.readyState !== WebSocket.OPEN) return false;
  conn.socket.send(JSON.stringify(msg));
  return true;
}

function openControl() {
  const url = wsUrl(`/v1/connections/${encodeURIComponent(conn.id)}/control?token=${encodeURIComponent(conn.clientToken)}`);
  const ws = new WebSocket(url);
  conn.socket = ws;

  ws.addEventListener('open', () => {
    if (conn.socket !== ws) return;
    conn.socketOpen = true;
    conn.socketAttempt = 0;
    log('Control channel open.');
    clearInterval(conn.keepaliveTimer);
    // The open socket already counts as life; explicit keepalives also cover
    // proxies that don't surface socket-level activity. The same beat keeps the
    // client_token fresh (often enough for however short a life the relay gives it).
    keepTokenFresh();
    conn.keepaliveTimer = setInterval(() => {
      send({ type: 'keepalive' });
      keepTokenFresh();
    }, Math.min(KEEPALIVE_MS, conn.tokenLifeMs / 4));
    render();
  });

  ws.addEventListener('message', (e) => {
    if (conn.socket !== ws) return;
    let msg;
    try {
      msg = JSON.parse(e.data);
    } catch {
      log('Unreadable message on the control channel.', 'error');
      return;
    }
    if (msg && typeof msg.type === 'string') onControl(msg);
  });

  ws.addEventListener('close', (e) => {
    if (conn.socket !== ws) return; // a socket we already replaced or closed on purpose
    conn.socket = null;
    conn.socketOpen = false;
    clearInterval(conn.keepaliveTimer);
    conn.keepaliveTimer = null;
    render();
    if (conn.phase !== 'connected') return;
    log(`Control channel closed (${e.code}${e.reason ? `: ${e.reason}` : ''}).`, 'error');
    recoverControl();
  });
}

// The socket dropped: find out whether the connection itself is still there
// before reopening, so a connection that ended (idle timeout, max age) doesn't
// get retried forever.
async function recoverControl() {
  try {
    const state = await fetchJson(`/v1/connections/${encodeURIComponent(conn.id)}`, {
      headers: { Authorization: `Bearer ${conn.apiKey}` },
    });
    if (conn.phase !== 'connected') return;
    if (state && ['closed', 'ended', 'expired', 'disconnected'].includes(state.status)) {
      connectionGone(`The connection has ended (${state.status}).`);
      return;
    }
    // Keep the relay's idle timer happy while the socket is down.
    fetch(`/v1/connections/${encodeURIComponent(conn.id)}/keepalive`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${conn.apiKey}` },
    }).catch(() => {});
    // The stream may have ended (or started) while we weren't listening.
    if (state && 'stream' in state) {
      if (!state.stream && conn.stream) streamEnded({ stream_id: conn.stream.id, reason: 'ended' });
    }
  } catch (err) {
    if (conn.phase !== 'connected') return;
    if (err instanceof HttpError && err.status === 404) {
      connectionGone('The connection has ended.');
      return;
    }
    // Network trouble: fall through and retry the socket.
  }
  if (Date.now() > conn.tokenExpiresAt) {
    // The client_token only opens sockets during its lifetime; after that we can't get back in.
    conn.phase = 'lost';
    log('The control channel cannot be reopened (its client token has expired). Disconnect, then connect again.', 'error');
    showMessage('Lost the control channel. Disconnect, then connect again.');
    render();
    return;
  }
  const delay = Math.min(1000 * 2 ** conn.socketAttempt, SOCKET_BACKOFF_MAX_MS);
  conn.socketAttempt += 1;
  log(`Reopening the control channel in ${Math.round(delay / 1000)} s…`);
  clearTimeout(conn.socketRetryTimer);
  conn.socketRetryTimer = setTimeout(() => {
    if (conn.phase === 'connected') openControl();
  }, delay);
}

/** Past half its life, ask for a new client_token (the relay mints one only then). */
function keepTokenFresh() {
  if (conn.tokenLifeMs && conn.tokenExpiresAt - Date.now() < conn.tokenLifeMs / 2) send({ type: 'refresh_token' });
}

function onControl(msg) {
  switch (msg.type) {
    case 'client_token': {
      const ttl = Number(msg.client_token_expires_in);
      if (typeof msg.client_token === 'string' && Number.isFinite(ttl)) {
        conn.clientToken = msg.client_token;
        conn.tokenExpiresAt = Date.now() + ttl * 1000;
      }
      break;
    }
    case 'connected':
      log(`Connected: ${msg.connection_id ?? conn.id}.`);
      setBroadcast(msg.broadcast);
      setOrchestration(msg.orchestration);
      break;
    case 'orchestration':
      orch.pendingAction = null;
      setOrchestration(msg);
      break;
    case 'broadcast_ready':
      log('Broadcast ready.');
      setBroadcast(msg.broadcast);
      break;
    case 'stream_started':
      log(`Stream started: ${msg.stream_id} · "${msg.prompt ?? ''}"`);
      streamStarted(msg);
      break;
    case 'stream_ended':
      log(`Stream ended: ${msg.stream_id ?? ''} (${msg.reason ?? 'ended'}).`);
      streamEnded(msg);
      break;
    case 'interact_acknowledged':
      log(`Prompt applied: "${msg.prompt ?? ''}"`);
      break;
    case 'input_forwarded': {
      const pid = msg.participant_id;
      const name = pid ? participantName(pid, '') : '';
      const who = pid ? ` from ${name ? `${name} (${pid})` : pid}` : '';
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
        idle_timeout: 'the host was idle too long',
        disconnected: 'it was disconnected',
      }[msg.reason] ?? (msg.reason ? `reason: ${msg.reason}` : 'no reason given');
      connectionGone(`The relay closed the connection (${why}). Connect again to continue.`);
      break;
    }
    default:
      log(`Message: ${JSON.stringify(msg)}`);
  }
}

function onControlError(msg) {
  const text = msg.message || msg.code || 'Error';
  log(`Error${msg.code ? ` ${msg.code}` : ''}: ${text}`, 'error');
  // A refused orchestration change is said in its panel, next to what was refused.
  if (!orchestrationRefused(msg)) showMessage(text);
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
  sessionStorage.setItem(KEY_STORAGE, key);
  conn.apiKey = key;
  conn.phase = 'connecting';
  showMessage('');
  render();
  log('Opening a connection…', 'out');

  let res;
  try {
    res = await fetchJson('/v1/connections', {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      body: '{}',
    });
  } catch (err) {
    conn.phase = 'disconnected';
    const text = errorText(err);
    log(`Connect failed: ${text}`, 'error');
    showMessage(text);
    render();
    return;
  }

  conn.phase = 'connected';
  conn.id = res.connection_id;
  conn.clientToken = res.client_token;
  const ttl = Number(res.client_token_expires_in);
  conn.tokenLifeMs = (Number.isFinite(ttl) && ttl > 0 ? ttl : 600) * 1000;
  conn.tokenExpiresAt = Date.now() + conn.tokenLifeMs;
  conn.socketAttempt = 0;
  conn.stream = null;
  conn.lastEnded = null;
  els.connId.textContent = res.connection_id;
  els.connExpires.textContent = res.expires_at ? new Date(res.expires_at).toLocaleString() : '—';
  els.info.hidden = false;
  log(`Connection ${res.connection_id} open (idle timeout ${res.idle_timeout_seconds ?? '?'} s).`);
  setBroadcast(res.broadcast);
  openControl();
  render();
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
    log(`Disconnect: ${errorText(err)}`, err instanceof HttpError && err.status === 404 ? '' : 'error');
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
  const ws = conn.socket;
  conn.socket = null; // first, so its close handler knows this was on purpose
  if (ws) ws.close(1000, 'disconnect');
  if (conn.stream) streamEnded({ stream_id: conn.stream.id, reason: 'disconnected' });
  clearTimeout(conn.socketRetryTimer);
  clearInterval(conn.keepaliveTimer);
  clearInterval(conn.countdownTimer);
  setPending(null);
  stopPreview();
  clearBroadcast();
  clearOrchestration();
  Object.assign(conn, {
    phase: 'disconnected',
    id: null,
    clientToken: null,
    socketOpen: false,
    stream: null,
    keepaliveTimer: null,
    countdownTimer: null,
    socketRetryTimer: null,
  });
  els.info.hidden = true;
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
  if (!send(msg)) return;
  showMessage('');
  log(`start_stream: "${prompt}"${msg.portrait ? ' (portrait)' : ''}`, 'out');
  setPending('start');
  render();
}

function sendPrompt() {
  const prompt = promptValue();
  if (!prompt) return;
  if (!send({ type: 'interact', prompt })) return;
  showMessage('');
  log(`interact: "${prompt}"`, 'out');
  els.prompt.select(); // typing the next prompt replaces this one
}

function endStream() {
  if (!send({ type: 'end_stream' })) return;
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
  const key = els.apiKey.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
});

// Leaving the page would orphan the connection (its client_token lives only
// here), holding one of the relay's few streamers until the idle timeout: free
// it now. keepalive lets the DELETE outlive the page.
window.addEventListener('pagehide', () => {
  if (!conn.id || conn.phase === 'disconnected') return;
  fetch(`/v1/connections/${encodeURIComponent(conn.id)}`, {
    method: 'DELETE',
    keepalive: true,
    headers: { Authorization: `Bearer ${conn.apiKey}` },
  }).catch(() => {});
  stopPreview();
  const ws = conn.socket;
  conn.socket = null;
  if (ws) ws.close(1000, 'page closed');
  conn.phase = 'disconnected';
});

// Restored from the back/forward cache: the connection was released on pagehide.
window.addEventListener('pageshow', (e) => {
  if (e.persisted) resetConnection();
});

// ---------- simulations ----------
//
// Timed scripts run offline into recordings: POST/GET/DELETE /v1/simulations with the API key
// from the field above (a connection is not needed). The jobs list is polled every 2 s while
// any job is pending or running, and not at all otherwise.

const SIM_POLL_MS = 2000;
const SIM_LIST_LIMIT = 20;
const SIM_EXAMPLE = `[
  {"timestamp_ms": 0, "start": {"prompt": "a calm ocean at sunset"}},
  {"timestamp_ms": 1500, "interact": {"prompt": "a storm rolls in"}},
  {"timestamp_ms": 3000, "end": {}}
]`;
const SIM_LABELS = {
  pending: 'Pending',
  dispatched: 'Starting',
  processing: 'Running',
  completed: 'Completed',
  failed: 'Failed',
  cancelled: 'Cancelled',
};
const SIM_ACTIVE = new Set(['pending', 'dispatched', 'processing']);
const SIM_CANCELLABLE = new Set(['pending', 'dispatched']);

const sim = {
  key: '',             // the key the list shows the jobs of
  jobs: [],
  total: 0,
  rows: new Map(),     // job_id -> <li>
  timer: null,         // the next poll
  loading: false,
  again: false,        // a refresh was asked for while one was in flight
  submitting: false,
  cancelling: new Set(),
};

const simKey = () => els.apiKey.value.trim() || conn.apiKey;
const simAuth = (key) => ({ Authorization: `Bearer ${key}` });

function setSimMessage(kind = '', ...content) {
  els.simMessage.hidden = content.length === 0;
  els.simMessage.dataset.kind = kind;
  els.simMessage.replaceChildren(...content);
}

function whenText(iso) {
  const t = Date.parse(iso ?? '');
  if (!Number.isFinite(t)) return '—';
  const d = new Date(t);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}

/** The submitted entry a 422 names, to show next to the reason (as text). */
function simEntryOf(body, details) {
  const script = details.script_index != null ? body.scripts?.[details.script_index] : body.script;
  return Array.isArray(script) && details.index != null ? script[details.index] : undefined;
}

function showSimError(err, body) {
  if (!(err instanceof HttpError)) {
    setSimMessage('error', errorText(err));
    return;
  }
  if (err.status === 422) {
    const d = err.details && typeof err.details === 'object' ? err.details : {};
    const where = [];
    if (d.script_index != null) where.push(`Script ${d.script_index}`);
    if (d.index != null) where.push(`entry ${d.index}`);
    let title = where.length ? where.join(', ') : 'The request';
    title = title[0].toUpperCase() + title.slice(1);
    if (d.field) title += ` (${d.field})`;
    // The relay's message already says "entry N: ...": keep only what follows.
    const text = String(err.message).replace(/^scripts\[\d+\]: /, '').replace(/^entry \d+: /, '');
    const content = [el('strong', { text: `${title}: ` }), text];
    if (d.reason) content.push(' ', el('span', { className: 'tag', text: String(d.reason) }));
    const entry = simEntryOf(body, d);
    if (entry !== undefined) content.push(el('code', { className: 'sim-entry wrap', text: JSON.stringify(entry) }));
    setSimMessage('error', ...content);
    els.simScript.setAttribute('aria-invalid', 'true');
    return;
  }
  if (err.status === 429) {
    const content = [el('strong', { text: 'Queue full: ' }), err.message];
    if (err.action) content.push(` ${err.action}`);
    if (err.retryAfterSeconds != null) {
      const at = new Date(Date.now() + err.retryAfterSeconds * 1000).toLocaleTimeString();
      content.push(el('span', { className: 'sim-retry', text: ` Retry in ${err.retryAfterSeconds} s (about ${at}).` }));
    }
    setSimMessage('warn', ...content);
    return;
  }
  setSimMessage('error', errorText(err));
}

async function submitSimulation() {
  if (sim.submitting) return;
  const key = simKey();
  if (!key) {
    setSimMessage('warn', 'Paste your API key above first.');
    els.apiKey.focus();
    return;
  }
  let parsed;
  try {
    parsed = JSON.parse(els.simScript.value);
  } catch (err) {
    setSimMessage('error', el('strong', { text: 'Not valid JSON: ' }), String(err.message));
    els.simScript.setAttribute('aria-invalid', 'true');
    return;
  }
  let body;
  if (Array.isArray(parsed)) body = { script: parsed };
  else if (parsed && typeof parsed === 'object' && ('script' in parsed || 'scripts' in parsed)) body = { ...parsed };
  else {
    setSimMessage('error', 'The script is a JSON array of entries (or an object with "script" or "scripts").');
    els.simScript.setAttribute('aria-invalid', 'true');
    return;
  }
  if (els.simPortrait.checked) body.portrait = true;

  sim.submitting = true;
  renderSimControls();
  try {
    const res = await fetchJson('/v1/simulations', {
      method: 'POST',
      headers: { ...simAuth(key), 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    els.simScript.removeAttribute('aria-invalid');
    const wait = Number(res?.estimated_wait_seconds);
    setSimMessage('info', `Submitted ${res?.job_id ?? ''}${Number.isFinite(wait) ? ` (about ${wait} s)` : ''}.`);
    log(`Simulation ${res?.job_id ?? ''} submitted.`, 'out');
    await refreshJobs();
  } catch (err) {
    showSimError(err, body);
  } finally {
    sim.submitting = false;
    renderSimControls();
  }
}

async function cancelSimulation(id) {
  const key = simKey();
  if (!key || sim.cancelling.has(id)) return;
  sim.cancelling.add(id);
  renderJobs();
  try {
    await fetchJson(`/v1/simulations/${encodeURIComponent(id)}`, { method: 'DELETE', headers: simAuth(key) });
    log(`Simulation ${id} cancelled.`, 'out');
  } catch (err) {
    // 409 NOT_CANCELLABLE: it started (or finished) meanwhile; the list will say which.
    setSimMessage(err instanceof HttpError && err.status === 409 ? 'warn' : 'error', `${id}: ${errorText(err)}`);
  } finally {
    sim.cancelling.delete(id);
  }
  await refreshJobs();
}

/** Fetches the key's jobs and renders them; polls again in 2 s while any is still active. */
async function refreshJobs() {
  clearTimeout(sim.timer);
  sim.timer = null;
  if (sim.loading) {
    sim.again = true;
    return;
  }
  const key = simKey();
  if (key !== sim.key) {
    sim.key = key;
    sim.jobs = [];
    renderJobs();
  }
  if (!key) {
    els.simListStatus.textContent = '';
    return;
  }
  sim.loading = true;
  let poll = false;
  try {
    const res = await fetchJson(`/v1/simulations?limit=${SIM_LIST_LIMIT}`, { headers: simAuth(key) });
    if (key === simKey()) {
      sim.jobs = Array.isArray(res?.jobs) ? res.jobs : [];
      sim.total = Number(res?.total) || sim.jobs.length;
      els.simListStatus.textContent = '';
      renderJobs();
      poll = sim.jobs.some((j) => SIM_ACTIVE.has(j.status));
    }
  } catch (err) {
    const refused = err instanceof HttpError && (err.status === 401 || err.status === 403);
    els.simListStatus.textContent = refused ? 'The API key was refused.' : `Could not load the jobs: ${errorText(err)}`;
    // A refused key won't get better by asking again; anything else is retried while jobs run.
    poll = !refused && sim.jobs.some((j) => SIM_ACTIVE.has(j.status));
  } finally {
    sim.loading = false;
  }
  if (sim.again) {
    sim.again = false;
    return refreshJobs();
  }
  if (poll && !document.hidden) sim.timer = setTimeout(refreshJobs, SIM_POLL_MS);
}

function renderSimControls() {
  els.simSubmit.disabled = sim.submitting;
  els.simSubmit.textContent = sim.submitting ? 'Submitting…' : 'Submit';
}

function renderJobs() {
  const jobs = sim.jobs;
  const active = jobs.filter((j) => SIM_ACTIVE.has(j.status)).length;
  els.simActive.textContent = active ? `${active} active` : '';
  els.simCount.textContent = jobs.length ? `(${sim.total > jobs.length ? `${jobs.length} of ${sim.total}` : jobs.length})` : '';
  els.simJobs.dataset.empty = simKey() ? 'No simulations yet.' : 'Paste your API key above to see your simulations.';
  syncList(els.simJobs, jobs, (j) => j.job_id, createJobRow, updateJobRow, sim.rows);
}

function createJobRow(job) {
  const cancel = el('button', { className: 'small-btn danger sim-cancel', text: 'Cancel', attrs: { type: 'button' } });
  cancel.addEventListener('click', () => cancelSimulation(job.job_id));
  return el('li', { className: 'entry sim-job', dataset: { jobId: job.job_id } },
    el('div', { className: 'sim-head' },
      el('span', { className: 'chip sim-status' }),
      el('time', { className: 'sim-created small' }),
      el('span', { className: 'sim-id', text: job.job_id })),
    el('p', { className: 'sim-meta small muted' }),
    el('p', { className: 'sim-error small wrap' }),
    el('div', { className: 'sim-results' }),
    el('div', { className: 'sim-row-actions' }, cancel));
}

function updateJobRow(row, job) {
  const status = String(job.status ?? '');
  row.dataset.status = status;
  const chip = row.querySelector('.sim-status');
  chip.textContent = SIM_LABELS[status] ?? status;
  chip.dataset.status = status;
  const created = row.querySelector('.sim-created');
  created.textContent = whenText(job.created_at);
  if (job.created_at) created.dateTime = job.created_at;

  const meta = [];
  if (Number.isFinite(Number(job.video_seconds))) meta.push(`${seconds(job.video_seconds)} s of video`);
  if (Number(job.script_count) > 1) meta.push(`${job.script_count} scripts`);
  if (job.portrait) meta.push('portrait');
  meta.push(`retries: ${Number(job.retry_count) || 0}`);
  const took = Date.parse(job.completed_at ?? '') - Date.parse(job.started_at ?? '');
  if (status === 'completed' && Number.isFinite(took)) meta.push(`took ${seconds(Math.max(0, took) / 1000)} s`);
  row.querySelector('.sim-meta').textContent = meta.join(' · ');

  const error = row.querySelector('.sim-error');
  error.textContent = job.error_message ?? '';
  error.hidden = !job.error_message;

  const cancel = row.querySelector('.sim-cancel');
  const cancelling = sim.cancelling.has(job.job_id);
  cancel.hidden = !SIM_CANCELLABLE.has(status);
  cancel.disabled = cancelling;
  cancel.textContent = cancelling ? 'Cancelling…' : 'Cancel';
  row.querySelector('.sim-row-actions').hidden = cancel.hidden;

  updateResults(row.querySelector('.sim-results'), status === 'completed' ? job.streams ?? [] : []);
}

/** One block per recording: its thumbnail (a link to the replay), "Replay" and "Video". */
function updateResults(box, streams) {
  box.hidden = streams.length === 0;
  const byId = new Map([...box.children].map((node) => [node.dataset.streamId, node]));
  const blocks = streams.filter((s) => s && s.stream_id).map((s) => {
    let block = byId.get(s.stream_id);
    if (!block) {
      const img = el('img', { className: 'sim-thumb-img', attrs: { alt: `Thumbnail of ${s.stream_id}`, decoding: 'async' } });
      img.addEventListener('error', () => {
        img.hidden = true;
        img.parentElement.dataset.broken = 'true';
      });
      block = el('div', { className: 'sim-result', dataset: { streamId: s.stream_id } },
        el('a', { className: 'sim-thumb', attrs: { target: '_blank', rel: 'noopener noreferrer' } }, img),
        el('div', { className: 'sim-links' },
          el('a', { className: 'sim-replay', text: 'Replay', attrs: { target: '_blank', rel: 'noopener noreferrer' } }),
          el('a', { className: 'sim-video', text: 'Video', attrs: { target: '_blank', rel: 'noopener noreferrer' } }),
          el('span', { className: 'sim-duration small muted' })));
      // Signed and valid for an hour: the first one is kept, so each poll doesn't reload it.
      if (s.thumbnail_url) img.src = s.thumbnail_url;
      else img.hidden = true;
    }
    // Links take the freshest signature of each refresh.
    const setLink = (sel, url) => {
      const a = block.querySelector(sel);
      if (url) a.href = url;
      else a.removeAttribute('href');
    };
    setLink('.sim-thumb', s.replay_url);
    setLink('.sim-replay', s.replay_url);
    setLink('.sim-video', s.video_url);
    const d = Number(s.duration_seconds);
    block.querySelector('.sim-duration').textContent = Number.isFinite(d) && d > 0 ? `${seconds(d)} s` : '';
    return block;
  });
  if (box.children.length !== blocks.length || blocks.some((b, i) => box.children[i] !== b)) box.replaceChildren(...blocks);
}

els.simForm.addEventListener('submit', (e) => {
  e.preventDefault();
  submitSimulation();
});
els.simScript.addEventListener('input', () => els.simScript.removeAttribute('aria-invalid'));
els.simExample.addEventListener('click', () => {
  els.simScript.value = SIM_EXAMPLE;
  els.simScript.removeAttribute('aria-invalid');
  setSimMessage('');
});
els.simRefresh.addEventListener('click', () => refreshJobs());
els.apiKey.addEventListener('change', () => refreshJobs());
document.addEventListener('visibilitychange', () => {
  if (!document.hidden && sim.jobs.some((j) => SIM_ACTIVE.has(j.status))) refreshJobs();
});

// ---------- init ----------

els.apiKey.value = sessionStorage.getItem(KEY_STORAGE) ?? '';
els.simScript.value = SIM_EXAMPLE;
render();
renderSimControls();
refreshJobs();
