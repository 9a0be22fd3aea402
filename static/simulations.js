// simulations.js: the host console's simulations tab.
//
// Timed scripts run offline into recordings: POST/GET/DELETE /v1/simulations with the API key
// from the console's key field (a connection is not needed). The jobs list is polled every 2 s
// while any job is pending or running, and not at all otherwise. Server text only ever goes in
// via textContent, results only as URLs.

import { HttpError, errorText, fetchJson } from '/static/whep.js';
import { el, seconds, syncList } from '/static/ui.js';

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

const auth = (key) => ({ Authorization: `Bearer ${key}` });

function whenText(iso) {
  const t = Date.parse(iso ?? '');
  if (!Number.isFinite(t)) return '—';
  const d = new Date(t);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}

/** The submitted entry a 422 names, to show next to the reason (as text). */
function entryOf(body, details) {
  const script = details.script_index != null ? body.scripts?.[details.script_index] : body.script;
  return Array.isArray(script) && details.index != null ? script[details.index] : undefined;
}

export class Simulations {
  #keyField;
  #connectionKey;
  #log;
  #els;
  #key = '';             // the key the list shows the jobs of
  #jobs = [];
  #total = 0;
  #rows = new Map();     // job_id -> <li>
  #timer = null;         // the next poll
  #loading = false;
  #again = false;        // a refresh was asked for while one was in flight
  #submitting = false;
  #cancelling = new Set();

  /**
   * keyField is the console's API key field (read, focused when empty, followed on change);
   * connectionKey() the key the open connection was made with, used when the field is empty;
   * log(text, kind) the console's event log. Call refresh() once the field holds its key.
   */
  constructor({ keyField, connectionKey, log }) {
    this.#keyField = keyField;
    this.#connectionKey = connectionKey;
    this.#log = log;
    const $ = (id) => document.getElementById(id);
    this.#els = {
      form: $('sim-form'),
      script: $('sim-script'),
      portrait: $('sim-portrait'),
      submit: $('sim-submit'),
      example: $('sim-example'),
      refresh: $('sim-refresh'),
      message: $('sim-message'),
      active: $('sim-active'),
      count: $('sim-count'),
      listStatus: $('sim-list-status'),
      jobs: $('sim-jobs'),
    };
    this.#els.script.value = SIM_EXAMPLE;
    this.#bind();
    this.#renderControls();
  }

  /** Fetches the key's jobs and renders them; polls again in 2 s while any is still active. */
  async refresh() {
    clearTimeout(this.#timer);
    this.#timer = null;
    if (this.#loading) {
      this.#again = true;
      return;
    }
    const e = this.#els;
    const key = this.#apiKey();
    if (key !== this.#key) {
      this.#key = key;
      this.#jobs = [];
      this.#renderJobs();
    }
    if (!key) {
      e.listStatus.textContent = '';
      return;
    }
    this.#loading = true;
    let poll = false;
    try {
      const res = await fetchJson(`/v1/simulations?limit=${SIM_LIST_LIMIT}`, { headers: auth(key) });
      if (key === this.#apiKey()) {
        this.#jobs = Array.isArray(res?.jobs) ? res.jobs : [];
        this.#total = Number(res?.total) || this.#jobs.length;
        e.listStatus.textContent = '';
        this.#renderJobs();
        poll = this.#anyActive();
      }
    } catch (err) {
      const refused = err instanceof HttpError && (err.status === 401 || err.status === 403);
      e.listStatus.textContent = refused ? 'The API key was refused.' : `Could not load the jobs: ${errorText(err)}`;
      // A refused key won't get better by asking again; anything else is retried while jobs run.
      poll = !refused && this.#anyActive();
    } finally {
      this.#loading = false;
    }
    if (this.#again) {
      this.#again = false;
      return this.refresh();
    }
    if (poll && !document.hidden) this.#timer = setTimeout(() => this.refresh(), SIM_POLL_MS);
  }

  #bind() {
    const e = this.#els;
    e.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.#submit();
    });
    e.script.addEventListener('input', () => e.script.removeAttribute('aria-invalid'));
    e.example.addEventListener('click', () => {
      e.script.value = SIM_EXAMPLE;
      e.script.removeAttribute('aria-invalid');
      this.#setMessage('');
    });
    e.refresh.addEventListener('click', () => this.refresh());
    this.#keyField.addEventListener('change', () => this.refresh());
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && this.#anyActive()) this.refresh();
    });
  }

  #apiKey() {
    return this.#keyField.value.trim() || this.#connectionKey();
  }

  #anyActive() {
    return this.#jobs.some((j) => SIM_ACTIVE.has(j.status));
  }

  #setMessage(kind = '', ...content) {
    const message = this.#els.message;
    message.hidden = content.length === 0;
    message.dataset.kind = kind;
    message.replaceChildren(...content);
  }

  // ---------- submit and cancel ----------

  async #submit() {
    if (this.#submitting) return;
    const e = this.#els;
    const key = this.#apiKey();
    if (!key) {
      this.#setMessage('warn', 'Paste your API key above first.');
      this.#keyField.focus();
      return;
    }
    let parsed;
    try {
      parsed = JSON.parse(e.script.value);
    } catch (err) {
      this.#setMessage('error', el('strong', { text: 'Not valid JSON: ' }), String(err.message));
      e.script.setAttribute('aria-invalid', 'true');
      return;
    }
    let body;
    if (Array.isArray(parsed)) body = { script: parsed };
    else if (parsed && typeof parsed === 'object' && ('script' in parsed || 'scripts' in parsed)) body = { ...parsed };
    else {
      this.#setMessage('error', 'The script is a JSON array of entries (or an object with "script" or "scripts").');
      e.script.setAttribute('aria-invalid', 'true');
      return;
    }
    if (e.portrait.checked) body.portrait = true;

    this.#submitting = true;
    this.#renderControls();
    try {
      const res = await fetchJson('/v1/simulations', {
        method: 'POST',
        headers: { ...auth(key), 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      e.script.removeAttribute('aria-invalid');
      const wait = Number(res?.estimated_wait_seconds);
      this.#setMessage('info', `Submitted ${res?.job_id ?? ''}${Number.isFinite(wait) ? ` (about ${wait} s)` : ''}.`);
      this.#log(`Simulation ${res?.job_id ?? ''} submitted.`, 'out');
      await this.refresh();
    } catch (err) {
      this.#showError(err, body);
    } finally {
      this.#submitting = false;
      this.#renderControls();
    }
  }

  #showError(err, body) {
    if (!(err instanceof HttpError)) {
      this.#setMessage('error', errorText(err));
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
      const entry = entryOf(body, d);
      if (entry !== undefined) content.push(el('code', { className: 'sim-entry wrap', text: JSON.stringify(entry) }));
      this.#setMessage('error', ...content);
      this.#els.script.setAttribute('aria-invalid', 'true');
      return;
    }
    if (err.status === 429) {
      const content = [el('strong', { text: 'Queue full: ' }), err.message];
      if (err.action) content.push(` ${err.action}`);
      if (err.retryAfterSeconds != null) {
        const at = new Date(Date.now() + err.retryAfterSeconds * 1000).toLocaleTimeString();
        content.push(el('span', { className: 'sim-retry', text: ` Retry in ${err.retryAfterSeconds} s (about ${at}).` }));
      }
      this.#setMessage('warn', ...content);
      return;
    }
    this.#setMessage('error', errorText(err));
  }

  async #cancel(id) {
    const key = this.#apiKey();
    if (!key || this.#cancelling.has(id)) return;
    this.#cancelling.add(id);
    this.#renderJobs();
    try {
      await fetchJson(`/v1/simulations/${encodeURIComponent(id)}`, { method: 'DELETE', headers: auth(key) });
      this.#log(`Simulation ${id} cancelled.`, 'out');
    } catch (err) {
      // 409 NOT_CANCELLABLE: it started (or finished) meanwhile; the list will say which.
      this.#setMessage(err instanceof HttpError && err.status === 409 ? 'warn' : 'error', `${id}: ${errorText(err)}`);
    } finally {
      this.#cancelling.delete(id);
    }
    await this.refresh();
  }

  // ---------- the jobs list ----------

  #renderControls() {
    this.#els.submit.disabled = this.#submitting;
    this.#els.submit.textContent = this.#submitting ? 'Submitting…' : 'Submit';
  }

  #renderJobs() {
    const e = this.#els;
    const jobs = this.#jobs;
    const active = jobs.filter((j) => SIM_ACTIVE.has(j.status)).length;
    e.active.textContent = active ? `${active} active` : '';
    e.count.textContent = jobs.length ? `(${this.#total > jobs.length ? `${jobs.length} of ${this.#total}` : jobs.length})` : '';
    e.jobs.dataset.empty = this.#apiKey() ? 'No simulations yet.' : 'Paste your API key above to see your simulations.';
    syncList(e.jobs, jobs, (j) => j.job_id, (job) => this.#createRow(job), (row, job) => this.#updateRow(row, job), this.#rows);
  }

  #createRow(job) {
    const cancel = el('button', { className: 'small-btn danger sim-cancel', text: 'Cancel', attrs: { type: 'button' } });
    cancel.addEventListener('click', () => this.#cancel(job.job_id));
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

  #updateRow(row, job) {
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
    const cancelling = this.#cancelling.has(job.job_id);
    cancel.hidden = !SIM_CANCELLABLE.has(status);
    cancel.disabled = cancelling;
    cancel.textContent = cancelling ? 'Cancelling…' : 'Cancel';
    row.querySelector('.sim-row-actions').hidden = cancel.hidden;

    updateResults(row.querySelector('.sim-results'), status === 'completed' ? job.streams ?? [] : []);
  }
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
