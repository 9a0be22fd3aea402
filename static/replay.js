// replay.js: a recording's replay page, /recordings/{stream_id}?expires=..&signature=..
//
// The page's own signed query authorizes GET /recordings/{id}/info, which returns the
// recording with signed file URLs. The video plays from video_url; the prompt timeline
// comes from events_url (events.jsonl: one JSON object a line, each with `type` and
// `offset_ms` on the video's timeline), with the audience's chat messages between the prompts
// (minus those the host cleared: through a link the relay already leaves them out, text and all).
// Clicking an entry seeks the video to it.
// Prompts and chat are user text: textContent only.

import { HttpError, fetchJson } from '/static/whep.js';
import { el } from '/static/ui.js';

const RECORDING_RETRY_MS = 1000;   // a recording still being finished: look again
const RECORDING_RETRIES = 10;

const $ = (id) => document.getElementById(id);
const els = {
  state: $('rec-state'),
  message: $('message'),
  layout: $('replay'),
  stage: $('replay-stage'),
  video: $('replay-video'),
  id: $('rec-id'),
  started: $('rec-started'),
  duration: $('rec-duration'),
  download: $('rec-download'),
  events: $('rec-events'),
  timeline: $('timeline'),
  count: $('timeline-count'),
};

const parts = window.location.pathname.split('/').filter(Boolean);
const streamId = decodeURIComponent(parts[parts.length - 1] ?? '');
let entries = []; // [{offsetMs, button}], in time order

function setBadge(state, text) {
  els.state.dataset.state = state;
  els.state.textContent = text;
}

function showMessage(text, kind = 'error') {
  els.message.hidden = !text;
  els.message.textContent = text || '';
  els.message.dataset.kind = kind;
}

function fail(text) {
  setBadge('error', 'Unavailable');
  showMessage(text);
  els.layout.hidden = true;
}

/** "m:ss" (or "h:mm:ss") of a position in the video; `tenths` adds ".t" (prompts come fast). */
function timecode(ms, tenths = false) {
  const t = Math.max(0, Math.floor(ms / 100)); // in tenths of a second, rounded down like a player's clock
  const total = Math.floor(t / 10);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, '0') + (tenths ? `.${t % 10}` : '');
  return h ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

function duration(seconds) {
  const v = Number(seconds);
  if (!Number.isFinite(v) || v <= 0) return '—';
  return v < 60 ? `${v.toFixed(1)} s` : timecode(v * 1000);
}

/** events.jsonl -> the prompt and chat entries, in time order. Bad lines are skipped, not fatal. */
export function parseTimeline(text) {
  const out = [];
  const cleared = new Set(); // chat message ids the host cleared: not shown in the replay either
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    let event;
    try {
      event = JSON.parse(line);
    } catch {
      continue;
    }
    if (!event || typeof event !== 'object') continue;
    const offset = Number(event.offset_ms);
    if (event.type === 'chat_cleared') cleared.add(event.message_id);
    if (Number.isFinite(offset) && event.type === 'chat' && typeof event.text === 'string') {
      const who = typeof event.name === 'string' && event.name ? event.name : 'Anonymous';
      out.push({ offsetMs: offset, prompt: event.text, source: `Chat · ${who}`, kind: 'chat', id: event.message_id });
    }
    if (!Number.isFinite(offset) || typeof event.prompt !== 'string') continue;
    if (event.type === 'stream_started') {
      out.push({ offsetMs: offset, prompt: event.prompt, source: 'Host · start', kind: 'host' });
    } else if (event.type === 'prompt_applied') {
      const participant = event.source === 'participant';
      let source = 'Host';
      if (participant) {
        const who = typeof event.name === 'string' && event.name ? event.name
          : event.participant_id ? `Participant ${String(event.participant_id).slice(0, 6)}` : 'Participant';
        source = event.mode && event.mode !== 'host' ? `${who} · ${event.mode}` : who;
      }
      out.push({ offsetMs: offset, prompt: event.prompt, source, kind: participant ? 'participant' : 'host' });
    }
  }
  // Stable: equal offsets keep the log's order.
  return out.filter((e) => e.kind !== 'chat' || !cleared.has(e.id)).map((e, i) => [e, i]).sort((a, b) => a[0].offsetMs - b[0].offsetMs || a[1] - b[1]).map(([e]) => e);
}

function renderTimeline(items) {
  els.count.textContent = items.length ? `${items.length}` : '';
  entries = items.map((item) => {
    const button = el('button', {
      className: 'tl-entry',
      attrs: { type: 'button', title: `Jump to ${timecode(item.offsetMs, true)}` },
      dataset: { offsetMs: String(item.offsetMs), kind: item.kind },
    },
    el('span', { className: 'tl-time', text: timecode(item.offsetMs, true) }),
    el('span', { className: 'tl-prompt wrap', text: item.prompt }),
    el('span', { className: 'tl-source', text: item.source }));
    button.addEventListener('click', () => seek(item.offsetMs));
    return { offsetMs: item.offsetMs, button, chat: item.kind === 'chat' };
  });
  els.timeline.replaceChildren(...entries.map((e) => el('li', {}, e.button)));
  highlight();
}

function seek(offsetMs) {
  const v = els.video;
  const target = offsetMs / 1000;
  v.currentTime = Number.isFinite(v.duration) ? Math.min(target, v.duration) : target;
  v.play().catch(() => {}); // the click is a gesture; if play is refused, the seek still stands
  highlight();
}

/** Marks the prompt in effect at the video's current position. */
function highlight() {
  const t = els.video.currentTime * 1000 + 50; // just past a seek target counts as there
  let current = null;
  for (const e of entries) if (e.offsetMs <= t && !e.chat) current = e; // a chat line changes no prompt
  for (const e of entries) {
    if (e === current) e.button.setAttribute('aria-current', 'true');
    else e.button.removeAttribute('aria-current');
  }
}

async function loadInfo() {
  const url = `/recordings/${encodeURIComponent(streamId)}/info${window.location.search}`;
  for (let attempt = 0; ; attempt += 1) {
    const info = await fetchJson(url);
    if (info?.status !== 'recording' || attempt >= RECORDING_RETRIES) return info;
    setBadge('connecting', 'Finishing…');
    await new Promise((resolve) => setTimeout(resolve, RECORDING_RETRY_MS));
  }
}

async function start() {
  const query = new URLSearchParams(window.location.search);
  if (!streamId || !query.get('signature') || !query.get('expires')) {
    fail('This replay link is incomplete: it needs its expires and signature parts. Ask for a fresh link.');
    return;
  }
  let info;
  try {
    info = await loadInfo();
  } catch (err) {
    if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
      fail('This replay link is invalid or has expired. Ask for a fresh link (links last an hour).');
    } else if (err instanceof HttpError && err.status === 404) {
      fail('There is no recording for this stream.');
    } else {
      fail(err instanceof HttpError ? err.message : 'Could not reach the relay. Check your connection and reload.');
    }
    return;
  }

  document.title = `Replay ${info.stream_id ?? streamId} · relay`;
  els.id.textContent = info.stream_id ?? streamId;
  els.started.textContent = info.started_at ? new Date(info.started_at).toLocaleString() : '—';
  els.duration.textContent = duration(info.duration_seconds);
  if (info.width && info.height) els.stage.style.setProperty('--ar', `${info.width} / ${info.height}`);
  if (info.thumbnail_url) els.video.poster = info.thumbnail_url;
  els.video.src = info.video_url;
  els.download.href = info.video_url;
  els.events.href = info.events_url;
  els.layout.hidden = false;

  const status = info.status ?? 'complete';
  if (status === 'complete') setBadge('waiting', 'Replay');
  else if (status === 'recording') setBadge('connecting', 'Still recording');
  else setBadge('error', status === 'partial' ? 'Partial' : 'Failed');
  if (status === 'failed' || status === 'partial') {
    showMessage(`This recording is ${status}${info.error ? ` (${info.error})` : ''}: it plays up to where it stopped.`, 'warn');
  }

  try {
    const response = await fetch(info.events_url, { cache: 'no-store' });
    if (!response.ok) throw new HttpError(response.status);
    renderTimeline(parseTimeline(await response.text()));
  } catch {
    els.count.textContent = '';
    els.timeline.replaceChildren(el('li', { className: 'muted small', text: 'The prompt timeline could not be loaded.' }));
  }
}

els.video.addEventListener('timeupdate', highlight);
els.video.addEventListener('seeked', highlight);
els.video.addEventListener('loadedmetadata', () => {
  const { videoWidth: w, videoHeight: h } = els.video;
  if (w && h) els.stage.style.setProperty('--ar', `${w} / ${h}`);
});
els.video.addEventListener('error', () => {
  showMessage('The video could not be played in this browser. Try the download link.', 'warn');
});

start();
