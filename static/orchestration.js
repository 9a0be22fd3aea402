// orchestration.js: the host console's audience panel (modes, settings, queue, vote, turns,
// participants).
//
// The relay's host state ({mode, settings, queue, candidates, window_ends_at, turn,
// participants}) arrives in `connected` and in `orchestration` pushes; host.js hands it over
// with applyState() / onOrchestration(). The form shows the live settings until the host edits
// it; Apply sends {type: "orchestration", mode, ...settings} through host.js's send(), as do the
// per-participant actions (block/unblock, grant_turn/revoke_turn), and the chat's set_chat {enabled}
// and clear_chat {message_id}: the chat arrives in `connected` (applyChat) and as chat,
// chat_cleared, chat_state and reactions events (onChat). The relay decides: this panel shows its
// state and asks. Participants' names and messages are other people's text: textContent only.

import { Deadline, clock, el, syncList } from '/static/ui.js';

const ORCH_REPLY_MS = 5000;           // an orchestration change not confirmed by then: say so
const TICK_MS = 250;
const CHAT_ROWS_MAX = 100;            // the console keeps the latest messages; older ones scroll away

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

export class OrchestrationPanel {
  #send;
  #log;
  #link;
  #els;
  #state = null;          // the relay's last host state
  #selected = null;       // the mode picked in the switcher
  #dirty = false;         // the form differs from what the relay has (the host is editing)
  #pending = null;        // {timer} while a change waits for the relay's confirmation
  #pendingAction = null;  // block/unblock/grant_turn/revoke_turn sent, not yet answered
  #timer = null;          // countdowns
  #voteDeadline = new Deadline();
  #turnDeadline = new Deadline();
  #participantRows = new Map();
  #candidateRows = new Map();
  #chatRows = new Map();  // message_id -> li
  #chatOn = true;
  #chatAsked = null;      // set_chat {enabled} sent, not yet answered: the box shows what was asked

  /**
   * send(msg) writes to the control socket (false when it is not open); log(text, kind) writes
   * to the console's event log; link() says whether the console has a connection at all and
   * whether its control channel is open ({connection, canControl}).
   */
  constructor({ send, log, link }) {
    this.#send = send;
    this.#log = log;
    this.#link = link;
    const $ = (id) => document.getElementById(id);
    this.#els = {
      panel: $('orchestration'),
      liveMode: $('orch-live-mode'),
      form: $('orch-form'),
      help: $('orch-mode-help'),
      apply: $('orch-apply'),
      reset: $('orch-reset'),
      status: $('orch-status'),
      queueBox: $('orch-queue-box'),
      queue: $('orch-queue'),
      queueCount: $('orch-queue-count'),
      voteBox: $('orch-vote-box'),
      candidates: $('orch-candidates'),
      voteCountdown: $('orch-vote-countdown'),
      turnBox: $('orch-turn-box'),
      turnHolder: $('orch-turn-holder'),
      turnCountdown: $('orch-turn-countdown'),
      hands: $('orch-hands'),
      handsCount: $('orch-hands-count'),
      participants: $('participants'),
      participantsCount: $('participants-count'),
      chatOn: $('orch-chat-on'),
      chatLog: $('orch-chat-log'),
      chatReactions: $('orch-chat-reactions'),
    };
    this.#bind();
  }

  // ---------- from host.js ----------

  /** The host state, as `connected` carries it (or an `orchestration` push). */
  applyState(state) {
    if (!state || typeof state !== 'object' || !state.mode) return;
    this.#state = state;
    if (this.#pending) {
      clearTimeout(this.#pending.timer);
      this.#pending = null;
      this.#dirty = false;
      this.#setStatus(`Applied: ${MODES[state.mode]?.label ?? state.mode} mode.`, 'ok');
    }
    if (!this.#dirty) {
      this.#selectMode(state.mode);
      this.#fillSettings(state.settings);
    }
    const s = state.settings ?? {};
    this.#voteDeadline.update(state.window_ends_at, s.vote_window_seconds);
    this.#turnDeadline.update(state.turn?.ends_at, s.turn_seconds);
    this.render();
  }

  /** An `orchestration` push: the answer to any participant action we were waiting on. */
  onOrchestration(msg) {
    this.#pendingAction = null;
    this.applyState(msg);
  }

  /**
   * An error on the control channel: true if it refused an orchestration change or action of
   * ours (then it is said in this panel, next to what was refused), false if it is not ours.
   */
  refused(msg) {
    if (!['INVALID_REQUEST', 'NOT_FOUND'].includes(msg.code)) return false; // a stream error, not ours
    const field = msg.details?.field;
    const detail = field && !String(msg.message ?? '').includes(field) ? ` (${field})` : '';
    if (this.#pending) {
      clearTimeout(this.#pending.timer);
      this.#pending = null;
      this.#setStatus(`Not applied: ${msg.message || msg.code}${detail}`, 'error');
      this.render();
      return true;
    }
    if (this.#pendingAction) {
      this.#pendingAction = null;
      this.#chatAsked = null; // a refused set_chat: the box goes back to what the relay has
      this.#setStatus(`Refused: ${msg.message || msg.code}`, 'error');
      this.render();
      return true;
    }
    return false;
  }

  /** The chat as `connected` carries it: on or off and the recent messages. */
  applyChat(chat) {
    if (!chat || typeof chat !== 'object') return;
    this.#chatOn = chat.enabled !== false;
    this.#chatRows.clear();
    this.#els.chatLog.replaceChildren();
    for (const message of Array.isArray(chat.history) ? chat.history : []) this.#addChat(message);
    this.render();
  }

  /** A chat, chat_cleared, chat_state or reactions event. */
  onChat(msg) {
    if (msg.type === 'chat') this.#addChat(msg);
    else if (msg.type === 'chat_cleared') {
      this.#chatRows.get(msg.message_id)?.remove();
      this.#chatRows.delete(msg.message_id);
      if (this.#pendingAction === 'clear_chat') this.#pendingAction = null;
    } else if (msg.type === 'chat_state') {
      this.#chatOn = Boolean(msg.enabled);
      this.#chatAsked = null;
      if (this.#pendingAction === 'set_chat') this.#pendingAction = null;
      this.#setStatus(this.#chatOn ? 'Chat is on.' : 'Chat is off: participants are told so.', 'ok');
      this.render();
    } else if (msg.type === 'reactions' && msg.counts && typeof msg.counts === 'object') {
      this.#els.chatReactions.textContent = Object.entries(msg.counts).map(([e, n]) => `${e} ${n}`).join('  ');
    }
  }

  /** The connection is gone: forget its audience. */
  clear() {
    this.#state = null;
    this.#dirty = false;
    if (this.#pending) clearTimeout(this.#pending.timer);
    this.#pending = null;
    this.#participantRows.clear();
    this.#candidateRows.clear();
    this.#chatRows.clear();
    this.#els.chatLog.replaceChildren();
    this.#els.chatReactions.textContent = '';
    this.#els.participants.replaceChildren();
    this.#els.candidates.replaceChildren();
    this.#setStatus('');
  }

  /** A participant's display name, as the last state has it. */
  participantName(id, fallback = 'Anonymous') {
    const p = (this.#state?.participants ?? []).find((x) => x.participant_id === id);
    return p?.name || fallback;
  }

  render() {
    const e = this.#els;
    const state = this.#state;
    const { connection, canControl } = this.#link();
    e.panel.hidden = !state || !connection;
    if (e.panel.hidden) {
      this.#stopTimer();
      return;
    }
    const live = state.mode;
    const selected = this.#selected ?? live;
    e.liveMode.textContent = `Now: ${MODES[live]?.label ?? live}`;
    e.help.textContent = MODES[selected]?.help ?? '';
    const fields = MODE_SETTINGS[selected] ?? [];
    for (const label of e.form.querySelectorAll('.setting')) {
      label.hidden = !label.dataset.modes.split(' ').includes(selected);
    }
    e.form.querySelector('#orch-settings').hidden = fields.length === 0;
    for (const input of e.form.querySelectorAll('input')) input.disabled = !canControl;
    e.apply.disabled = !canControl || !this.#dirty || Boolean(this.#pending);
    e.apply.textContent = selected !== live ? `Switch to ${MODES[selected]?.label ?? selected}` : 'Apply';
    e.reset.hidden = !this.#dirty;

    e.queueBox.hidden = live !== 'queue';
    e.voteBox.hidden = live !== 'vote';
    e.turnBox.hidden = live !== 'turns';
    if (live === 'queue') this.#renderQueue(state.queue ?? []);
    if (live === 'vote') this.#renderCandidates(state.candidates ?? []);
    if (live === 'turns') this.#renderTurn(state.turn ?? {});
    this.#renderParticipants(state.participants ?? [], live, state.turn ?? {}, canControl);
    e.chatOn.checked = this.#chatAsked ?? this.#chatOn;
    e.chatOn.disabled = !canControl;
    for (const button of e.chatLog.querySelectorAll('button')) button.disabled = !canControl;
    this.#tick();
    if (live === 'vote' || live === 'turns') this.#startTimer();
    else this.#stopTimer();
  }

  // ---------- the form ----------

  #bind() {
    const e = this.#els;
    e.chatOn.addEventListener('change', (ev) => {
      const enabled = e.chatOn.checked;
      const sent = this.#hostAction({ type: 'set_chat', enabled }, enabled ? 'Turning chat on…' : 'Turning chat off…');
      this.#chatAsked = sent ? enabled : null;
      this.render();
    });
    e.form.addEventListener('change', (ev) => {
      if (ev.target.name === 'mode') this.#selectMode(ev.target.value);
      this.#dirty = true;
      this.#setStatus('');
      this.render();
    });
    e.form.addEventListener('input', () => {
      if (!this.#dirty) {
        this.#dirty = true;
        this.render();
      }
    });
    e.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      if (!e.apply.disabled) this.#apply();
    });
    e.reset.addEventListener('click', () => {
      this.#dirty = false;
      this.#setStatus('');
      if (this.#state) {
        this.#selectMode(this.#state.mode);
        this.#fillSettings(this.#state.settings);
      }
      this.render();
    });
  }

  #settingInput(name) {
    return this.#els.form.elements.namedItem(name);
  }

  #fillSettings(settings = {}) {
    for (const name of ['queue_interval_seconds', 'vote_window_seconds', 'turn_seconds', ...MODERATION]) {
      const input = this.#settingInput(name);
      if (!input || !(name in settings)) continue;
      const v = settings[name];
      input.value = Array.isArray(v) ? v.join(', ') : String(v ?? '');
    }
  }

  #selectMode(mode) {
    this.#selected = mode;
    for (const radio of this.#els.form.querySelectorAll('input[name="mode"]')) radio.checked = radio.value === mode;
  }

  #setStatus(text, kind = '') {
    this.#els.status.textContent = text;
    this.#els.status.dataset.kind = kind;
  }

  #readSettings(mode) {
    const body = {};
    for (const name of MODE_SETTINGS[mode] ?? []) {
      const input = this.#settingInput(name);
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

  #apply() {
    const mode = this.#selected ?? this.#state?.mode ?? 'host';
    if (!this.#els.form.reportValidity()) return;
    let settings;
    try {
      settings = this.#readSettings(mode);
    } catch (err) {
      this.#setStatus(err.message, 'error');
      return;
    }
    const msg = { type: 'orchestration', mode, ...settings };
    if (!this.#send(msg)) {
      this.#setStatus('The control channel is not open.', 'error');
      return;
    }
    this.#log(`orchestration: ${JSON.stringify({ mode, ...settings })}`, 'out');
    this.#setStatus('Applying…');
    this.#pending = {
      timer: setTimeout(() => {
        this.#pending = null;
        this.#setStatus('The relay has not confirmed the change.', 'error');
        this.render();
      }, ORCH_REPLY_MS),
    };
    this.render();
  }

  /** Sends one host action; the relay answers with the new state, or an error. False if not sent. */
  #hostAction(msg, text) {
    if (!this.#send(msg)) {
      this.#setStatus('The control channel is not open.', 'error');
      return false;
    }
    this.#log(`${msg.type}${msg.participant_id ? ` ${msg.participant_id}` : ''}`, 'out');
    if (text) this.#setStatus(text);
    this.#pendingAction = msg.type;
    return true;
  }

  // ---------- chat ----------

  #addChat(msg) {
    if (typeof msg.message_id !== 'string' || typeof msg.text !== 'string' || this.#chatRows.has(msg.message_id)) return;
    const who = typeof msg.name === 'string' && msg.name ? msg.name : 'Anonymous';
    const clear = el('button', { className: 'small-btn', text: 'Clear',
      attrs: { type: 'button', 'aria-label': `Clear the message from ${who}` } });
    clear.disabled = !this.#link().canControl;
    clear.addEventListener('click', () => this.#hostAction({ type: 'clear_chat', message_id: msg.message_id },
      `Cleared a message from ${who}.`));
    const li = el('li', { className: 'entry chat-line' },
      el('span', { className: 'who', text: `${who}: ` }),
      el('span', { className: 'text wrap', text: msg.text }),
      el('span', { className: 'actions' }, clear));
    this.#els.chatLog.append(li);
    this.#chatRows.set(msg.message_id, li);
    while (this.#chatRows.size > CHAT_ROWS_MAX) {
      const [oldest, row] = this.#chatRows.entries().next().value;
      row.remove();
      this.#chatRows.delete(oldest);
    }
    this.#els.chatLog.scrollTop = this.#els.chatLog.scrollHeight;
  }

  // ---------- the live state ----------

  #renderQueue(queue) {
    this.#els.queueCount.textContent = queue.length ? `(${queue.length})` : '';
    this.#els.queue.replaceChildren(...queue.map((q, i) => el('li', { className: 'entry' },
      el('span', { className: 'pos', text: `${i + 1}` }),
      el('span', { className: 'prompt wrap', text: q.prompt ?? '' }),
      el('span', { className: 'who', text: q.name || this.participantName(q.participant_id) }))));
  }

  #renderCandidates(candidates) {
    const total = candidates.reduce((n, c) => n + (Number(c.votes) || 0), 0);
    const top = Math.max(0, ...candidates.map((c) => Number(c.votes) || 0));
    syncList(this.#els.candidates, candidates, (c) => c.candidate_id, (c) => {
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
    }, this.#candidateRows);
  }

  #renderTurn(turn) {
    const holder = turn.holder;
    this.#els.turnHolder.textContent = holder ? (holder.name || this.participantName(holder.participant_id)) : 'Nobody';
    const hands = turn.hands ?? [];
    this.#els.handsCount.textContent = hands.length ? `(${hands.length})` : '';
    this.#els.hands.replaceChildren(...hands.map((h, i) => el('li', { className: 'entry' },
      el('span', { className: 'pos', text: `${i + 1}` }),
      el('span', { className: 'prompt wrap', text: h.name || this.participantName(h.participant_id) }))));
  }

  #renderParticipants(participants, mode, turn, canControl) {
    this.#els.participantsCount.textContent = participants.length ? `(${participants.length})` : '';
    const holder = turn.holder?.participant_id ?? null;
    const hands = new Set((turn.hands ?? []).map((h) => h.participant_id));
    const queued = new Set((this.#state?.queue ?? []).map((q) => q.participant_id));
    syncList(this.#els.participants, participants, (p) => p.participant_id, (p) => {
      const id = p.participant_id;
      const block = el('button', { className: 'small-btn', attrs: { type: 'button' }, dataset: { action: 'block' } });
      block.addEventListener('click', () => {
        const blocked = block.dataset.blocked === 'true';
        this.#hostAction({ type: blocked ? 'unblock' : 'block', participant_id: id },
          `${blocked ? 'Unblocked' : 'Blocked'} ${this.participantName(id)} (${id}).`);
      });
      const give = el('button', { className: 'small-btn', text: 'Give turn', attrs: { type: 'button' }, dataset: { action: 'grant' } });
      give.addEventListener('click', () => this.#hostAction({ type: 'grant_turn', participant_id: id },
        `Gave the turn to ${this.participantName(id)} (${id}).`));
      const revoke = el('button', { className: 'small-btn', text: 'Revoke turn', attrs: { type: 'button' }, dataset: { action: 'revoke' } });
      revoke.addEventListener('click', () => this.#hostAction({ type: 'revoke_turn' },
        `Revoked ${this.participantName(id)}\u2019s turn.`));
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
    }, this.#participantRows);
  }

  // ---------- countdowns ----------

  #tick() {
    const state = this.#state;
    if (!state) return;
    const e = this.#els;
    const voting = state.mode === 'vote' && this.#voteDeadline.active && (state.candidates ?? []).length > 0;
    e.voteCountdown.hidden = !voting;
    if (voting) {
      const left = this.#voteDeadline.left;
      e.voteCountdown.textContent = left > 0 ? `${clock(left)} left` : 'Counting…';
      e.voteCountdown.dataset.urgent = String(left <= 5000);
    }
    const turning = state.mode === 'turns' && this.#turnDeadline.active && Boolean(state.turn?.holder);
    e.turnCountdown.hidden = !turning;
    if (turning) {
      const left = this.#turnDeadline.left;
      e.turnCountdown.textContent = `${clock(left)} left`;
      e.turnCountdown.dataset.urgent = String(left <= 5000);
    }
  }

  #startTimer() {
    if (!this.#timer) this.#timer = setInterval(() => this.#tick(), TICK_MS);
  }

  #stopTimer() {
    clearInterval(this.#timer);
    this.#timer = null;
  }
}
