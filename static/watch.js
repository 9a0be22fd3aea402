// watch.js: the spectator page, /watch/{broadcast_id}?token=...
//
// Two independent feeds drive the page:
//   * media: a WhepPlayer keeps the <video> playing and reconnects on drops; if
//     WebRTC never gets through (a network that blocks UDP: the relay offers no
//     TURN), the page falls back to the broadcast's HLS rendition;
//   * state: the broadcast's events WebSocket (live, prompt, viewers), with GET
//     polling every 3 s whenever the socket is not open.
// render() folds both into the badge; nothing user-supplied is ever set as HTML.
// In a cluster every node serves the broadcast: both feeds go to one "home" node (at first the
// page's own), and when home stops answering the page moves both to the next live node it knows.
// The same socket makes the spectator a participant: participate.js shows the
// orchestration (queue, vote, turns) and sends inputs when the host's mode allows.

import { WhepPlayer, HttpError, fetchJson, wsUrl } from '/static/whep.js';
import { Participation } from '/static/participate.js';
import { ChatPanel } from '/static/chat.js';
import { ScreenControls } from '/static/screen.js';
import { setUpShare } from '/static/share.js';
import { ResumeToken } from '/static/resume.js';

const POLL_MS = 3000;
const SOCKET_BACKOFF_MAX_MS = 10000;

const $ = (id) => document.getElementById(id);
const els = {
  stage: $('stage'),
  video: $('video'),
  state: $('state'),
  unmute: $('unmute'),
  viewers: $('viewer-count'),
  viewersStat: $('viewers'),
  stageNote: $('stage-note'),
  nowPlaying: $('now-playing'),
  prompt: $('current-prompt'),
  message: $('message'),
  ended: $('ended'),
  endedNote: $('ended-note'),
  replayLink: $('replay-link'),
  latency: $('latency'),
  noSound: $('no-sound'),
  pip: $('pip'),
  fullscreen: $('fullscreen'),
  about: $('about'),
  title: $('broadcast-title'),
  hostName: $('broadcast-host'),
  share: $('share'),
  shareDialog: $('share-dialog'),
  shareQr: $('share-qr'),
  shareUrl: $('share-url'),
  shareCopy: $('share-copy'),
  shareResult: $('share-result'),
};

const broadcastId = decodeURIComponent(window.location.pathname.split('/').filter(Boolean).pop() ?? '');
const token = new URLSearchParams(window.location.search).get('token') ?? '';
// A host's invite link (&invite=CODE) makes this page that invited participant on every (re)connect.
const invite = new URLSearchParams(window.location.search).get('invite') ?? '';
const base = `/v1/broadcasts/${encodeURIComponent(broadcastId)}`;

// ---------- nodes: where the page watches, and where it goes when that node dies ----------
// GET {base}/nodes lists the live nodes, least-loaded first. A dropped socket or a failed WHEP
// attempt makes the page ask home whether it still answers; if not, it rejoins at the next node.
const NODE_PROBE_MS = 2000;       // a node that has not answered /healthz by then counts as dead
const NODE_DEAD_MS = 30000;       // ...and is skipped this long (then tried again, if nothing else is left)
const NODES_REFRESH_MS = 30000;   // nodes join and leave: refresh the list this often
const NODES_RETRY_MS = 2000;      // ...and sooner after a failed refresh (a busy node, Redis away a moment)
const NODES_MAX = 16;

const nodes = {
  home: window.location.origin,   // media, events and polls all go here
  list: [],                       // origins of the live nodes, least-loaded first
  dead: new Map(),                // origin -> performance.now() when it failed to answer
  probing: null,                  // the probe under way (one at a time)
  moved: false,                   // the page left a node that died (a broadcast gone now went with its origin)
  refreshTimer: null,
};

/** The URL of `path` at the home node. */
function at(path) {
  return new URL(path, nodes.home).href;
}

/** Fetches the list now, and again in NODES_REFRESH_MS (NODES_RETRY_MS after a failure). */
async function refreshNodes() {
  clearTimeout(nodes.refreshTimer);
  nodes.refreshTimer = null;
  let ok = false;
  try {
    const body = await fetchJson(at(`${base}/nodes?token=${encodeURIComponent(token)}`));
    if (body && Array.isArray(body.nodes)) {
      const origins = [];
      for (const node of body.nodes.slice(0, NODES_MAX)) {
        try {
          const url = new URL(node.url);
          if (url.protocol === 'http:' || url.protocol === 'https:') origins.push(url.origin);
        } catch {
          // not a URL: skip it
        }
      }
      nodes.list = origins;
      els.stage.dataset.nodes = String(origins.length);
      ok = true;
    }
  } catch {
    // keep the last list: try again soon
  }
  if (events.stopped || nodes.refreshTimer !== null) return; // the page stopped, or a newer refresh is due
  nodes.refreshTimer = setTimeout(refreshNodes, ok ? NODES_REFRESH_MS : NODES_RETRY_MS);
}

async function homeAnswers() {
  try {
    const response = await fetch(at('/healthz'), { cache: 'no-store', signal: AbortSignal.timeout(NODE_PROBE_MS) });
    return response.ok;
  } catch {
    return false;
  }
}

/** Something failed at home: if home itself is gone, move media and events to the next live node. */
function checkHome() {
  if (nodes.probing || state.fatal) return;
  const home = nodes.home;
  nodes.probing = homeAnswers().then((answers) => {
    nodes.probing = null;
    if (answers || state.fatal || nodes.home !== home) return;
    nodes.dead.set(home, performance.now());
    const now = performance.now();
    const next = nodes.list.find((origin) => origin !== home
      && !(now - (nodes.dead.get(origin) ?? -Infinity) < NODE_DEAD_MS));
    if (!next) return; // nowhere else known: the usual retries keep trying home
    nodes.home = next;
    nodes.moved = true;
    els.stage.dataset.node = next;
    refreshNodes();
    if (state.media !== 'hls') player.restart();
    else playHls();
    reopenEvents();
  });
}

// Everything the badge depends on. `live` is null until the relay has told us.
const state = {
  media: 'connecting',  // WhepPlayer state, or 'hls' once the page fell back to HLS
  webrtcWorked: false,  // WebRTC connected at least once: its own reconnects handle drops
  mediaMessage: '',
  live: null,
  streamId: null,
  endedSeen: false,     // a stream ended while we watched: "Stream ended" rather than "Waiting"
  fatal: null,          // message of an unrecoverable error
  fatalEnded: false,    // ...which means the broadcast we were watching is over (404 after it worked)
  seen: false,          // the broadcast answered at least once (state or media)
  viewersKnown: false,  // the relay has told us the count at least once
  channel: false,       // a channel's broadcast: between hosts it is "starting soon", never over
  title: '',            // the channel's title, shown while it waits
  replayUrl: null,      // where the ended stream can be watched again, when the relay offers it
  hostAway: false,      // the host's console is reconnecting (a reload): the broadcast goes on
  endReason: null,      // why the broadcast closed, when the relay said (disconnected | shutdown | ...)
};

const BADGES = {
  connecting: 'Connecting',
  live: 'Live',
  waiting: 'Waiting for the host',
  soon: 'Starting soon',
  ended: 'Stream ended',
  reconnecting: 'Reconnecting',
  error: 'Unavailable',
};

function badgeState() {
  if (state.fatal) return state.fatalEnded ? 'ended' : 'error';
  if (state.media === 'hls') return state.live ? 'live' : offAirState();
  if (state.media === 'reconnecting') return 'reconnecting';
  if (state.media !== 'connected') return 'connecting';
  // Connected. Trust the relay's live flag; before it has spoken, frames are the evidence.
  const live = state.live ?? player.receiving;
  if (live) return 'live';
  return offAirState();
}

// Not live: a channel is only between streams (the same link plays the next one); a plain
// broadcast whose stream ended is over.
function offAirState() {
  if (state.channel) return 'soon';
  return state.endedSeen ? 'ended' : 'waiting';
}

// What the stage says while it has no picture (before the first frame, or after a fatal error).
const STAGE_NOTES = {
  connecting: 'Connecting…',
  live: 'Connecting…',
  waiting: 'The host has not started the stream yet. It will appear here.',
  soon: 'The stream will start here when the host goes live: no need to reload.',
  ended: 'The stream has ended.',
  reconnecting: 'Reconnecting…',
  error: 'This broadcast cannot be played.',
};

function render() {
  const key = badgeState();
  els.state.dataset.state = key;
  els.state.textContent = BADGES[key];
  const picture = Boolean(els.video.srcObject || state.media === 'hls') && els.video.videoWidth > 0;
  // A channel between streams says so over the last frame, which would otherwise look live.
  els.stageNote.hidden = picture && key !== 'soon';
  els.stageNote.textContent = key === 'soon' && state.title ? `${state.title}: starting soon. ${STAGE_NOTES.soon}`
    : STAGE_NOTES[key];
  // Over: the last frame is covered, and nobody is "watching" a stream that is not there.
  const ended = key === 'ended';
  els.ended.hidden = !ended;
  // The broadcast may go on with a new stream; only a gone broadcast is over for good.
  els.endedNote.textContent = state.fatalEnded ? 'Thanks for watching.' : 'If the host goes live again, it will play here.';
  els.stage.dataset.ended = String(ended);
  els.replayLink.hidden = !(ended && state.replayUrl);
  if (state.replayUrl) els.replayLink.href = state.replayUrl;
  if (ended) els.stageNote.hidden = true;
  // A broken link has no audience or prompt to show; "0 watching" would be a guess.
  els.viewersStat.hidden = Boolean(state.fatal) || !state.viewersKnown || ended;
  screenControls.render(picture && key !== 'ended' && key !== 'error');
  renderBehind(key);
  els.nowPlaying.hidden = Boolean(state.fatal) && !state.fatalEnded;
  participation.setFatal(state.fatal);
  chat.setFatal(state.fatal);

  const hostNote = state.hostAway ? 'The host is reconnecting. The broadcast goes on meanwhile.' : '';
  const text = state.fatal || state.mediaMessage || hostNote;
  els.message.hidden = !text;
  els.message.textContent = text;
  // A broadcast that ended is news, not a fault: no red frame for it.
  els.message.dataset.kind = state.fatalEnded ? 'info' : state.fatal ? 'error' : 'warn';
}

// ---------- broadcast state (events socket / polling) ----------

function applyState({ live, streamId, prompt, viewers, channel, title, replayUrl, host }) {
  state.seen = true;
  if (typeof channel === 'boolean') state.channel = channel;
  if (typeof title === 'string') state.title = title;
  // The host's shared replay of the stream that ended (an http(s) link only); null: withdrawn or none.
  if (typeof replayUrl === 'string' && /^https?:\/\//.test(replayUrl)) state.replayUrl = replayUrl;
  else if (replayUrl === null || live) state.replayUrl = null;
  if (typeof host === 'string') state.hostAway = host === 'reconnecting';
  if (live !== undefined && live !== null) {
    if (state.live && !live) state.endedSeen = true;
    if (live) state.endedSeen = false;
    if (!live && state.replayUrl) state.endedSeen = true; // opened after the end: over, and rewatchable
    state.live = Boolean(live);
    player.setLive(state.live);
  }
  if (streamId !== undefined) state.streamId = streamId;
  if (typeof prompt === 'string') els.prompt.textContent = prompt;
  if (Number.isFinite(viewers)) {
    els.viewers.textContent = String(viewers);
    state.viewersKnown = true;
  }
  render();
}

function onEvent(msg) {
  switch (msg.type) {
    case 'hello':
      if (typeof msg.resume_token === 'string') resume.keep(msg.resume_token);
      applyState({
        live: msg.live, streamId: msg.stream_id, prompt: msg.prompt ?? undefined, viewers: msg.viewers, host: msg.host,
        channel: msg.channel, title: msg.title ?? undefined, replayUrl: msg.replay_url,
      });
      if (msg.channel !== undefined) showAbout(msg);
      // The contract's hello only promises participant_id and orchestration: fill the rest once.
      if (msg.live === undefined) poll();
      break;
    case 'stream_started':
      applyState({ live: true, streamId: msg.stream_id, prompt: msg.prompt ?? '' });
      break;
    case 'stream_ended':
      applyState({ live: false, replayUrl: msg.replay_url });
      break;
    case 'prompt_applied':
      applyState({ prompt: msg.prompt });
      break;
    case 'viewers':
      applyState({ viewers: msg.count });
      break;
    case 'host':
      applyState({ host: msg.host });
      break;
    case 'about': // the host renamed the channel (PATCH /v1/channels/{id}): no reload needed
      applyState({ title: msg.title ?? '' });
      showAbout(msg);
      break;
    case 'disconnected':
      // The broadcast's last word: the host ended it, or the relay is going away (a restart).
      state.endReason = typeof msg.reason === 'string' ? msg.reason : 'unknown';
      break;
    default:
      break;
  }
  // hello, orchestration, *_result, prompt_applied, stream_started: participation's too;
  // hello, chat*, reaction*: the chat panel's.
  participation.onEvent(msg);
  chat.onEvent(msg);
}

function sendEvent(msg) {
  const ws = events.socket;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(msg));
  return true;
}

const participation = new Participation({ send: sendEvent });
const chat = new ChatPanel({ send: sendEvent });

async function poll() {
  const seq = events.seq;
  try {
    const b = await fetchJson(at(`${base}?token=${encodeURIComponent(token)}`));
    // A socket message that arrived while this request was in flight is newer: keep it.
    if (events.seq !== seq) return;
    applyState({
      live: b.live,
      streamId: b.stream_id ?? null,
      prompt: b.prompt ?? undefined,
      viewers: b.spectators,
      channel: b.channel,
      title: b.title ?? undefined,
      replayUrl: b.replay_url,
      host: b.host,
    });
    showAbout(b);
    participation.applyState(b.orchestration);
  } catch (err) {
    // A broadcast that is gone (host disconnected) or a bad token will not come back.
    if (err instanceof HttpError && [401, 403, 404].includes(err.status)) fail(err.message, err.status);
    else if (!(err instanceof HttpError)) checkHome();
  }
}

// Our participant identity survives a dropped socket and a reload (resume.js).
const resume = new ResumeToken(broadcastId);
const REPLACED_CLOSE_CODE = 4001;  // the relay: this identity resumed on a newer socket
const GOING_AWAY_CLOSE_CODE = 1001; // the relay is shutting down

const events = {
  socket: null,
  seq: 0,            // bumped per socket message, so a slower poll can't overwrite fresher news
  attempt: 0,
  retryTimer: null,
  pollTimer: null,
  stopped: false,
};

function openEvents() {
  if (events.stopped) return;
  const resumed = resume.value();
  const query = `token=${encodeURIComponent(token)}${resumed ? `&resume=${encodeURIComponent(resumed)}` : ''}`
    + (invite ? `&invite=${encodeURIComponent(invite)}` : '');
  const ws = new WebSocket(wsUrl(at(`${base}/events?${query}`)));
  events.socket = ws;
  ws.addEventListener('open', () => {
    events.attempt = 0;
    stopPolling(); // the socket pushes everything from here on
    participation.setConnected(true);
    chat.setConnected(true);
  });
  ws.addEventListener('message', (e) => {
    let msg;
    try {
      msg = JSON.parse(e.data);
    } catch {
      return;
    }
    if (msg && typeof msg.type === 'string') {
      events.seq += 1;
      onEvent(msg);
    }
  });
  ws.addEventListener('close', (e) => {
    if (events.socket !== ws) return;
    events.socket = null;
    // Another tab (a duplicated one shares our token) took this identity: become someone new
    // rather than take it back, or the two would replace each other for ever.
    if (e.code === REPLACED_CLOSE_CODE) resume.keep('');
    if (e.code === GOING_AWAY_CLOSE_CODE && !state.endReason) state.endReason = 'shutdown';
    participation.setConnected(false);
    chat.setConnected(false);
    if (events.stopped) return;
    // Couldn't open, or dropped: keep the page current by polling while we retry, and find out
    // whether home itself is gone (then checkHome moves us on at once).
    if (e.code !== 1000 && e.code !== REPLACED_CLOSE_CODE) checkHome();
    startPolling();
    const delay = Math.min(1000 * 2 ** events.attempt, SOCKET_BACKOFF_MAX_MS);
    events.attempt += 1;
    events.retryTimer = setTimeout(openEvents, delay);
  });
}

/** A new socket at (a new) home now, keeping the resume token: the same participant. */
function reopenEvents() {
  if (events.stopped) return;
  clearTimeout(events.retryTimer);
  events.attempt = 0;
  const ws = events.socket;
  events.socket = null;
  if (ws) ws.close();
  openEvents();
}

function startPolling() {
  if (events.pollTimer || events.stopped) return;
  poll();
  events.pollTimer = setInterval(poll, POLL_MS);
}

function stopPolling() {
  clearInterval(events.pollTimer);
  events.pollTimer = null;
}

function stopEvents() {
  events.stopped = true;
  clearTimeout(events.retryTimer);
  stopPolling();
  clearTimeout(nodes.refreshTimer);
  nodes.refreshTimer = null;
  const ws = events.socket;
  events.socket = null;
  if (ws) ws.close();
  participation.setConnected(false);
    chat.setConnected(false);
}

// The relay's error messages are written for developers ("Authorization: Bearer..."); a
// spectator gets one that says what happened and what to do.
// Why a broadcast we were watching is gone, from its last event: only the host's own end says so.
const END_MESSAGES = {
  disconnected: 'The host has ended this broadcast. Thanks for watching!',
  idle_timeout: 'The host lost their connection, so this broadcast has ended. Thanks for watching!',
  expired: 'This broadcast reached its maximum length and has ended. Thanks for watching!',
  // In a cluster: the node that carried it stopped, and the broadcast is gone from every node.
  origin_lost: 'This broadcast has ended: the server that carried it stopped. Thanks for watching!',
};
const UNAVAILABLE = 'This broadcast is unavailable: the relay restarted or lost it. Ask the host for the link again.';

function spectatorMessage(status, message, ended) {
  if (ended) return END_MESSAGES[state.endReason] ?? (nodes.moved ? END_MESSAGES.origin_lost : UNAVAILABLE);
  if (status === 401 || status === 403) {
    return 'This watch link is not valid: its token is wrong or incomplete. Ask the host for the link again.';
  }
  if (status === 404) return 'There is no broadcast at this link: it may have ended already. Check the link with the host.';
  if (status === 422) return `Your browser cannot play this stream${message ? ` (${message})` : ''}.`;
  return message || 'This broadcast is not available.';
}

function fail(message, status = 0) {
  if (state.fatal) return;
  // A broadcast that worked and is now unknown is over: ended (the host, a timeout), or lost to a
  // relay restart; its last event says which, and without one it is only "unavailable".
  const gone = status === 404 && state.seen;
  // A page that moved to another node of a cluster (its own died) and finds the broadcast gone there too
  // knows why: the broadcast's origin died with it.
  state.fatalEnded = gone && (state.endReason in END_MESSAGES || nodes.moved);
  state.fatal = spectatorMessage(status, message, gone);
  player.stop();
  stopHls();
  stopEvents();
  render();
}

// ---------- media ----------

const player = new WhepPlayer({
  endpoint: () => at(`${base}/whep`),
  configUrl: () => at('/config'),
  token,
  // A network error, or a session that dropped: is home still there?
  onRetry: (error) => {
    if (!(error instanceof HttpError)) checkHome();
  },
  video: els.video,
  onStatus: ({ state: media, message, retryInMs, error }) => {
    if (media === 'stopped') return;
    if (media === 'failed') {
      fail(error?.message || message, error?.status ?? 0);
      return;
    }
    if (state.media === 'hls') return;
    if (media === 'connected') {
      state.seen = true;
      state.webrtcWorked = true;
    }
    state.media = media;
    state.mediaMessage = retryInMs ? `${sentence(message)} Retrying in ${Math.ceil(retryInMs / 1000)} s.` : '';
    render();
  },
  onAudio: (hasAudio) => {
    // Only offer Unmute when sound is actually arriving; otherwise the button would lie, and the
    // "No sound" note says why there is none.
    els.unmute.hidden = !hasAudio;
    els.noSound.hidden = hasAudio;
  },
});

els.unmute.addEventListener('click', () => {
  els.video.muted = !els.video.muted;
  els.unmute.textContent = els.video.muted ? 'Unmute' : 'Mute';
  els.unmute.setAttribute('aria-pressed', String(!els.video.muted));
  els.video.play().catch(() => {}); // the click is a user gesture: unmuted playback is allowed now
});

// The stage takes the stream's own shape (landscape or portrait).
function fitStage() {
  const { videoWidth: w, videoHeight: h } = els.video;
  if (w && h) els.stage.style.setProperty('--ar', `${w} / ${h}`);
}
els.video.addEventListener('loadedmetadata', () => {
  fitStage();
  render(); // the stage note gives way to the picture
});
els.video.addEventListener('resize', fitStage);
els.video.addEventListener('emptied', render);
els.video.addEventListener('playing', render); // before the relay says whether it is live, frames decide

// A message from elsewhere ends with its full stop, so a sentence can follow it.
function sentence(text) {
  const t = (text ?? '').trim();
  return !t || /[.!?…]$/.test(t) ? t : `${t}.`;
}

// ---------- what the stream is ----------

// title and host_name come with a channel's broadcast; a plain connection's has neither.
function showAbout(info) {
  const title = typeof info?.title === 'string' ? info.title.trim() : '';
  const host = typeof info?.host_name === 'string' ? info.host_name.trim() : '';
  els.about.hidden = !title && !host;
  els.title.textContent = title;
  els.title.hidden = !title;
  els.hostName.textContent = host ? `Hosted by ${host}` : '';
  els.hostName.hidden = !host;
  if (title) document.title = `${title} · relay`;
}

// ---------- full screen, picture in picture (screen.js) ----------

const screenControls = new ScreenControls({
  stage: els.stage, video: els.video, fullscreen: els.fullscreen, pip: els.pip, onError: flashMessage,
});

let flashTimer = null;
function flashMessage(text) {
  if (state.fatal) return;
  state.mediaMessage = text;
  render();
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => {
    if (state.mediaMessage === text) {
      state.mediaMessage = '';
      render();
    }
  }, 5000);
}

// ---------- behind live ----------
// WebRTC: the jitter buffer's hold plus half the round trip (well under a second on a good path).
// HLS: how far the player sits behind the newest segment it has, plus nothing for the segment
// being cut: a lower bound, said as such.
const BEHIND_MS = 1000;
let behindTimer = null;

function renderBehind(key) {
  const live = key === 'live';
  let text = '';
  let path = '';
  if (live && state.media === 'hls') {
    const s = els.video.seekable;
    if (s.length) {
      const behind = Math.max(0, s.end(s.length - 1) - els.video.currentTime);
      text = `HLS · at least ${behind.toFixed(behind < 10 ? 1 : 0)} s behind live`;
    } else {
      text = 'HLS · a few seconds behind live';
    }
    path = 'hls';
  } else if (live && player.behindMs !== null) {
    const ms = player.behindMs;
    text = ms < 100 ? 'WebRTC · under 0.1 s behind live' : `WebRTC · ${(ms / 1000).toFixed(1)} s behind live`;
    path = 'webrtc';
  }
  els.latency.hidden = !text;
  els.latency.textContent = text;
  els.latency.dataset.path = path;
  if (live && !behindTimer) behindTimer = setInterval(render, BEHIND_MS);
  if (!live && behindTimer) {
    clearInterval(behindTimer);
    behindTimer = null;
  }
}

// ---------- share (share.js) ----------

setUpShare(els, { broadcastId, token, base });

// ---------- HLS fallback ----------
// WebRTC needs UDP between the browser and the relay, and some networks (offices, hotels) block
// it. When no WebRTC connection has come up HLS_FALLBACK_MS after joining while the host is live,
// and the browser plays HLS itself, the page switches to the broadcast's HLS rendition (the same
// stream, a few seconds behind) and says so. A reload tries WebRTC again.
const HLS_FALLBACK_MS = 8000;
const HLS_RETRY_MS = 3000;
const hlsUrl = () => at(`${base}/hls/index.m3u8?token=${encodeURIComponent(token)}`);
const canPlayHls = els.video.canPlayType('application/vnd.apple.mpegurl') !== '';
let fallbackTimer = null;
let hlsRetryTimer = null;

function armFallback() {
  clearTimeout(fallbackTimer);
  if (canPlayHls) fallbackTimer = setTimeout(maybeFallBack, HLS_FALLBACK_MS);
}

function maybeFallBack() {
  if (state.fatal || state.media === 'hls' || state.webrtcWorked || events.stopped) return;
  if (state.live !== true) {
    armFallback(); // nothing to play over either path yet: look again later
    return;
  }
  player.stop();
  state.media = 'hls';
  state.mediaMessage = 'This network does not let the live (WebRTC) connection through: playing over HLS, a few seconds behind.';
  playHls();
  render();
}

function playHls() {
  clearTimeout(hlsRetryTimer);
  els.video.srcObject = null;
  els.video.src = hlsUrl();
  els.video.play().catch(() => {});
}

function stopHls() {
  clearTimeout(fallbackTimer);
  clearTimeout(hlsRetryTimer);
  if (state.media === 'hls') {
    els.video.pause();
    els.video.removeAttribute('src');
    els.video.load();
  }
}

// The HLS player gives up on a gap (a long pause between streams); start it again.
els.video.addEventListener('error', () => {
  if (state.media !== 'hls' || state.fatal) return;
  clearTimeout(hlsRetryTimer);
  hlsRetryTimer = setTimeout(playHls, HLS_RETRY_MS);
});

// ---------- lifecycle ----------

function start() {
  els.share.hidden = !broadcastId || !token;
  if (!broadcastId || !token) {
    fail('This watch link is incomplete: it needs a broadcast id and a ?token=. Ask the host for the full link.');
    return;
  }
  state.fatal = null;
  state.fatalEnded = false;
  events.stopped = false;
  if (state.media === 'hls') {
    playHls();
  } else {
    player.start();
    armFallback();
  }
  openEvents();
  poll(); // first paint of live/prompt/viewers without waiting for the socket's hello
  refreshNodes();
  render();
}

// Leave cleanly: the DELETE must outlive the page, hence keepalive. If the page is
// restored from the back/forward cache, join again.
window.addEventListener('pagehide', () => {
  player.stop({ keepalive: true });
  clearTimeout(fallbackTimer);
  clearTimeout(hlsRetryTimer);
  clearInterval(behindTimer);
  behindTimer = null;
  stopEvents();
});
window.addEventListener('pageshow', (e) => {
  if (e.persisted) start();
});

start();
