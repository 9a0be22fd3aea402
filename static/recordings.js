// recordings.js: the host console's way to recordings: the "Recording" button of each stream in
// its history (kept for the tab by tabstore.js, so a reload shows it again), and the library of the
// key's past recordings (GET /v1/recordings).
//
// A replay link is signed by the relay (GET /v1/recordings/{id} with the API key) and expires,
// so it is asked for on each click, never kept.

import { endedText, showId } from '/static/hostview.js';
import { keepHistory, keptHistory } from '/static/tabstore.js';
import { HttpError, errorText, fetchJson } from '/static/whep.js';

const RECORDING_WAIT_MS = 15000;      // a recording finishes about a second after its stream
const LIBRARY_SIZE = 20;              // the newest recordings listed
const LIBRARY_AFTER_END_MS = 2000;    // a stream's recording is listed once it is finished
const RETRY_MS = 400;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The button that opens stream `id`'s replay in a new tab; hidden until the stream has ended.
 * key() is the API key to ask with, read on each click; log(text, kind) is the console's log.
 */
function recordingButton(id, { key, log }) {
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'recording small-btn';
  button.textContent = 'Recording';
  button.hidden = true; // until the stream has ended
  button.title = 'Open the replay of this stream in a new tab';
  button.addEventListener('click', () => openRecording(id, button, key(), log));
  return button;
}

/**
 * Opens a stream's replay page. The tab is opened synchronously, inside the click, so no popup
 * blocker stops it; it is pointed at the replay page once the link is known. A recording takes
 * a moment to finish after its stream ends ("recording"): retried briefly.
 */
async function openRecording(id, button, key, log) {
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
  const label = button.textContent;
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
      await sleep(RETRY_MS);
    }
    if (!rec?.replay_url) throw new Error('The relay gave no replay link.');
    if (tab && !tab.closed) tab.location.replace(rec.replay_url);
    else window.open(rec.replay_url, '_blank', 'noopener');
    log(`Opened the recording of ${id}${rec.status && rec.status !== 'complete' ? ` (${rec.status})` : ''}.`);
    button.textContent = label;
  } catch (err) {
    if (tab && !tab.closed) tab.close();
    const text = err instanceof HttpError ? errorText(err) : err.message || 'Network error: could not reach the relay.';
    log(`Recording of ${id}: ${text}`, 'error');
    button.textContent = err instanceof HttpError && err.status === 404 ? 'No recording' : 'Retry recording';
  } finally {
    button.disabled = false;
  }
}

/** "Streams this session": each stream as it starts, its end in words, then its recording. */
export class StreamHistory {
  #rows = new Map(); // stream_id -> <li>
  #kept = [];        // what the tab keeps of them (tabstore.js), newest first: a reload shows them again

  /**
   * key() is the API key to ask with; log(text, kind) is the console's log. A stream that was live at
   * the reload reads "ended" until the re-attached console hears it is still live (add() again).
   */
  constructor(list, { key, log }) {
    this.list = list;
    this.key = key;
    this.log = log;
    for (const row of keptHistory().reverse()) {
      this.add(row.id, row.prompt);
      this.end(row.id, row.reason || 'ended');
    }
  }

  add(id, prompt) {
    const row = this.#rows.get(id);
    if (row) { // the reloaded console's live stream
      const reason = row.querySelector('.reason');
      reason.dataset.live = '';
      reason.textContent = 'live';
      row.querySelector('.recording').hidden = true;
      this.#keep(id, null);
      return;
    }
    const li = document.createElement('li');
    const idEl = document.createElement('span');
    idEl.className = 'id';
    showId(idEl, id);
    const reason = document.createElement('span');
    reason.className = 'reason';
    reason.dataset.live = '';
    reason.textContent = 'live';
    const p = document.createElement('span');
    p.className = 'prompt';
    p.textContent = prompt || '';
    li.append(idEl, reason, p, recordingButton(id, { key: this.key, log: this.log }));
    this.list.prepend(li); // newest first
    this.#rows.set(id, li);
    this.#kept.unshift({ id, prompt: prompt || '', reason: null });
    keepHistory(this.#kept);
  }

  end(id, reasonCode) {
    const row = this.#rows.get(id);
    const reason = row?.querySelector('.reason');
    if (!reason) return;
    delete reason.dataset.live;
    reason.textContent = endedText(reasonCode);
    row.querySelector('.recording').hidden = false;
    this.#keep(id, reasonCode);
  }

  #keep(id, reason) {
    const kept = this.#kept.find((r) => r.id === id);
    if (kept) kept.reason = reason;
    keepHistory(this.#kept);
  }
}

/** The key's newest recordings, each with its replay a click away. */
export class RecordingsLibrary {
  #key;
  #log;
  #timer = null;

  constructor({ key, log }) {
    this.#key = key;
    this.#log = log;
    this.list = document.getElementById('library');
    this.status = document.getElementById('library-status');
    document.getElementById('library-refresh').addEventListener('click', () => this.refresh());
  }

  /** Again shortly: a stream just ended, and its recording is finishing. */
  refreshSoon() {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.refresh(), LIBRARY_AFTER_END_MS);
  }

  async refresh() {
    const key = this.#key();
    if (!key) {
      this.status.textContent = 'Paste the API key to list them.';
      return;
    }
    this.status.textContent = 'Loading…';
    try {
      const page = await fetchJson(`/v1/recordings?limit=${LIBRARY_SIZE}`, {
        headers: { Authorization: `Bearer ${key}` },
      });
      const items = Array.isArray(page?.recordings) ? page.recordings : [];
      this.list.replaceChildren(...items.map((rec) => this.#row(rec)));
      const total = Number(page?.total) || items.length;
      this.status.textContent = total > items.length ? `newest ${items.length} of ${total}` : '';
    } catch (err) {
      this.status.textContent = err instanceof HttpError && err.status === 401
        ? 'The relay did not accept this API key.'
        : 'Could not load the recordings.';
    }
  }

  #row(rec) {
    const li = document.createElement('li');
    const when = document.createElement('time');
    const started = Date.parse(rec.started_at ?? '');
    if (Number.isFinite(started)) {
      when.dateTime = rec.started_at;
      when.textContent = new Date(started).toLocaleString();
    }
    const id = document.createElement('span');
    id.className = 'id';
    id.textContent = `${String(rec.stream_id).slice(0, 8)}…`;
    id.title = rec.stream_id;
    const length = document.createElement('span');
    length.className = 'muted';
    const secs = Number(rec.duration_seconds);
    length.textContent = Number.isFinite(secs) ? `${Math.round(secs)} s` : '';
    const button = recordingButton(rec.stream_id, { key: this.#key, log: this.#log });
    button.hidden = false;
    button.textContent = 'Replay';
    li.append(when, id, length, button);
    return li;
  }
}
