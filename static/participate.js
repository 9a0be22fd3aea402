// participate.js: audience participation on the watch page (queue, vote, turns).
//
// The page's events socket carries everything: watch.js hands every message to
// Participation.onEvent() and gives it a send() that writes to that socket. The
// relay decides; this module only shows its state and asks:
//   out: hello {name}, input {prompt}, vote {candidate_id}, raise_hand, release_turn
//   in:  hello {participant_id, orchestration}, orchestration {...}, input_result,
//        vote_result, turn_result, prompt_applied, stream_started
// What it says is kept true as things move on: "Queued" becomes "Applied" when the relay applies
// that prompt (prompt_applied carries its author), a vote round's winner is announced to all (and
// to its author as theirs), and what was said about a round goes when the round does.
// Prompts and names are other people's text: they only ever go in via textContent.

import { Deadline, clock, el, seconds } from '/static/ui.js';

const NAME_STORAGE = 'relay.displayName';
const RECENT_MAX = 8;
const TICK_MS = 250;

const MODE_LABELS = { host: 'Host only', queue: 'Queue', vote: 'Vote', turns: 'Turns' };

// The relay's rejection reasons, said for a person rather than a developer.
const REASONS = {
  host_only: 'Only the host is prompting right now.',
  not_your_turn: 'It is not your turn: raise your hand and wait for it.',
  already_queued: 'You already have a prompt waiting in the queue.',
  empty: 'Type a prompt first.',
  too_long: 'That prompt is too long.',
  blocked_word: 'That prompt contains a word that is not allowed here.',
  invalid_text: 'That prompt contains characters that cannot be sent (control codes or a broken emoji).',
  cooldown: 'Not so fast: wait a moment before sending again.',
  duplicate: 'That prompt was just sent: try something different.',
  queue_full: 'The queue is full: try again in a moment.',
  already_proposed: 'You already proposed a prompt this round: vote for one instead.',
  too_many_candidates: 'This round has as many candidates as it can take: vote for one.',
  blocked: 'The host has muted you: your prompts and votes are not counted.',
  unknown_participant: 'Not connected yet: try again in a moment.',
  wrong_mode: 'That is not possible in the current mode.',
  window_closed: 'That round has closed.',
  rate_limited: 'Too much at once: wait a moment and try again.',
  invite_required: 'Only invited participants can take part: ask the host for an invite link.',
  unknown_candidate: 'That candidate is no longer in the running.',
  has_turn: 'You already have the turn.',
  already_raised: 'Your hand is already raised.',
};

export class Participation {
  #send;
  #els;
  #me = null;            // our participant_id (a new one per socket)
  #orch = null;          // the last orchestration state
  #open = false;         // events socket open
  #fatal = false;
  #myVote = null;        // candidate_id we support this round
  #names = new Map();    // participant_id -> display name, as learned from the state
  #sentInputs = [];      // prompts awaiting their input_result, oldest first
  #cooldownUntil = 0;
  #voteDeadline = new Deadline();
  #turnDeadline = new Deadline();
  #candidateItems = new Map(); // candidate_id -> {li, ...parts}
  #recent = [];
  #timer = null;
  #myName = '';
  #resultScope = '';     // what the shown result is about: 'round' (cleared when the round closes), 'prompt', ''

  constructor({ send }) {
    this.#send = send;
    const $ = (id) => document.getElementById(id);
    this.#els = {
      section: $('participate'),
      chip: $('mode-chip'),
      conn: $('participate-conn'),
      help: $('mode-help'),
      queuePanel: $('queue-panel'),
      queue: $('queue'),
      queueCount: $('queue-count'),
      votePanel: $('vote-panel'),
      candidates: $('candidates'),
      voteCountdown: $('vote-countdown'),
      turnsPanel: $('turns-panel'),
      turnBox: $('turn-box'),
      turnHolder: $('turn-holder'),
      turnCountdown: $('turn-countdown'),
      raise: $('raise-hand'),
      release: $('release-turn'),
      hands: $('hands'),
      handsCount: $('hands-count'),
      form: $('input-form'),
      label: $('input-label'),
      input: $('input-prompt'),
      sendBtn: $('input-send'),
      result: $('input-result'),
      winner: $('round-winner'),
      chars: $('input-chars'),
      nameForm: $('name-form'),
      name: $('name'),
      nameCurrent: $('name-current'),
      recentSection: $('recent'),
      recent: $('recent-prompts'),
    };
    try {
      this.#myName = (localStorage.getItem(NAME_STORAGE) ?? '').slice(0, 40);
    } catch {
      this.#myName = '';
    }
    this.#els.name.value = this.#myName;
    this.#bind();
    this.#render();
  }

  // ---------- from watch.js ----------

  /** The events socket opened (true) or closed (false). A socket that resumed (watch.js keeps the
   *  resume token) is the same participant again; its hello says who we are either way. */
  setConnected(open) {
    this.#open = open;
    if (!open) {
      this.#me = null;
      this.#myVote = null;
      this.#sentInputs = [];
    }
    this.#render();
  }

  /** The broadcast cannot be watched (bad link, ended): nothing to take part in. */
  setFatal(fatal) {
    this.#fatal = Boolean(fatal);
    this.#render();
  }

  /** Orchestration state from the polling fallback (GET /v1/broadcasts/{id}). */
  applyState(orch) {
    if (orch && typeof orch === 'object') this.#setState(orch);
  }

  onEvent(msg) {
    switch (msg.type) {
      case 'hello':
        // A hello again on the same socket (a cluster's catch-up) keeps the name the relay holds: it is
        // sent again only to a new participant id (a new socket), not once per hello to every page at once.
        if (typeof msg.participant_id === 'string' && msg.participant_id !== this.#me) {
          this.#me = msg.participant_id;
          if (this.#myName) this.#send({ type: 'hello', name: this.#myName });
        }
        if (msg.orchestration) this.#setState(msg.orchestration);
        break;
      case 'orchestration':
        this.#setState(msg);
        break;
      case 'input_result':
        this.#onInputResult(msg);
        break;
      case 'vote_result':
        if (msg.status === 'voted') {
          this.#myVote = msg.candidate_id ?? this.#myVote;
          this.#showResult('Vote counted. You can change it until the round ends.', 'ok', 'round');
        } else {
          this.#showResult(this.#reason(msg), 'error');
        }
        this.#render();
        break;
      case 'turn_result':
        if (msg.status === 'raised') this.#showResult('Hand raised: you will get the turn when it is yours.', 'ok');
        else if (msg.status === 'released') this.#showResult('Done: the turn passes on.', 'ok');
        else this.#showResult(this.#reason(msg), 'error');
        this.#render();
        break;
      case 'prompt_applied':
        this.#onApplied(msg);
        this.#addRecent({
          prompt: msg.prompt,
          source: msg.source,
          participantId: msg.participant_id,
          name: typeof msg.name === 'string' ? msg.name : null,
          mode: msg.mode,
        });
        break;
      case 'stream_started':
        if (typeof msg.prompt === 'string' && msg.prompt) {
          this.#addRecent({ prompt: msg.prompt, source: 'host', start: true });
        }
        break;
      default:
        break;
    }
  }

  // ---------- state ----------

  #setState(orch) {
    const prevMode = this.#orch?.mode;
    const held = this.#holdsTurn();
    this.#orch = orch;
    const settings = orch.settings ?? {};
    for (const p of [...(orch.queue ?? []), ...(orch.turn?.hands ?? []), orch.turn?.holder]) {
      if (p && p.participant_id && p.name) this.#names.set(p.participant_id, p.name);
    }
    const candidates = orch.candidates ?? [];
    if (this.#myVote && !candidates.some((c) => c.candidate_id === this.#myVote)) this.#myVote = null;
    this.#voteDeadline.update(orch.window_ends_at, settings.vote_window_seconds);
    this.#turnDeadline.update(orch.turn?.ends_at, settings.turn_seconds);
    if (prevMode && prevMode !== orch.mode) {
      this.#showResult('', 'ok');
      this.#els.winner.hidden = true;
    }
    // The round closed: what was said about it ("Proposed…", "Vote counted…") is no longer true.
    if (this.#resultScope === 'round' && candidates.length === 0) this.#showResult('', 'ok');
    if (!held && this.#holdsTurn()) this.#showResult('Your turn! Your prompts go straight to the world.', 'ok');
    else if (held && !this.#holdsTurn() && orch.mode === 'turns') this.#showResult('Your turn is over.', 'ok');
    const max = Number(settings.max_prompt_chars);
    if (Number.isFinite(max) && max > 0) this.#els.input.maxLength = max;
    this.#render();
  }

  #onInputResult(msg) {
    const prompt = this.#sentInputs.shift();
    const settings = this.#orch?.settings ?? {};
    if (msg.status === 'rejected') {
      let text = this.#reason(msg);
      if (msg.reason === 'too_long' && settings.max_prompt_chars) {
        text = `That prompt is too long (at most ${settings.max_prompt_chars} characters).`;
      }
      if ((msg.reason === 'cooldown' || msg.reason === 'rate_limited') && Number.isFinite(msg.retry_after)) {
        this.#cooldownUntil = Date.now() + msg.retry_after * 1000;
      }
      this.#showResult(text, 'error');
    } else {
      const cooldown = Number(settings.cooldown_seconds);
      if (Number.isFinite(cooldown) && cooldown > 0) this.#cooldownUntil = Date.now() + cooldown * 1000;
      if (prompt !== undefined && this.#els.input.value.trim() === prompt) this.#els.input.value = '';
      if (msg.status === 'queued') {
        this.#showResult('Queued: your prompt is applied when its turn in the queue comes.', 'ok', 'prompt');
      } else if (msg.status === 'candidate') {
        const existed = (this.#orch?.candidates ?? []).some((c) => c.candidate_id === msg.candidate_id);
        if (msg.candidate_id) this.#myVote = msg.candidate_id;
        this.#showResult(existed
          ? 'Someone proposed the same: your vote goes to it.'
          : 'Proposed: it is a candidate now, with your vote.', 'ok', 'round');
      } else if (msg.status === 'forwarded') {
        this.#showResult('Sending to the world…', 'ok', 'prompt');
      } else {
        this.#showResult('Received.', 'ok');
      }
    }
    this.#render();
  }

  /** A prompt reached the world. Ours: say so (it was "Queued" or "Sending" until now). A vote
   *  round's: that is the round's winner, announced to everyone. */
  #onApplied(msg) {
    if (msg.source !== 'participant' || typeof msg.prompt !== 'string') return;
    const mine = Boolean(this.#me) && msg.participant_id === this.#me;
    if (msg.mode === 'vote') {
      const who = mine ? 'you' : (typeof msg.name === 'string' && msg.name) || this.#who(msg.participant_id, 'someone');
      this.#els.winner.textContent = `Last round won by ${who}: “${msg.prompt}”`;
      this.#els.winner.hidden = false;
      if (mine) this.#showResult('Your prompt won the vote: it is on screen now.', 'ok', 'prompt');
    } else if (mine) {
      this.#showResult('Applied: your prompt is on screen now.', 'ok', 'prompt');
    }
  }

  #reason(msg) {
    return REASONS[msg.reason] ?? (msg.reason ? `Not accepted (${msg.reason}).` : 'Not accepted.');
  }

  #showResult(text, kind, scope = '') {
    this.#resultScope = text ? scope : '';
    const r = this.#els.result;
    r.hidden = !text;
    r.textContent = text;
    r.dataset.kind = kind;
  }

  #who(participantId, fallback = 'Someone') {
    if (participantId && participantId === this.#me) return 'You';
    return (participantId && this.#names.get(participantId)) || fallback;
  }

  // ---------- actions ----------

  #bind() {
    const e = this.#els;
    e.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const prompt = e.input.value.trim();
      if (!prompt) {
        this.#showResult(REASONS.empty, 'error');
        e.input.focus();
        return;
      }
      if (e.sendBtn.disabled || !this.#send({ type: 'input', prompt })) return;
      this.#sentInputs.push(prompt);
    });
    e.input.addEventListener('input', () => this.#renderChars());
    e.raise.addEventListener('click', () => this.#send({ type: 'raise_hand' }));
    e.release.addEventListener('click', () => this.#send({ type: 'release_turn' }));
    e.nameForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.#myName = e.name.value.replace(/\s+/g, ' ').trim().slice(0, 40);
      e.name.value = this.#myName;
      try {
        if (this.#myName) localStorage.setItem(NAME_STORAGE, this.#myName);
        else localStorage.removeItem(NAME_STORAGE);
      } catch {
        // Private mode: the name lasts for this page only.
      }
      // Sent again as a hello: the relay renames us (an empty name makes us anonymous).
      this.#send({ type: 'hello', name: this.#myName });
      e.name.closest('details')?.removeAttribute('open');
      this.#render();
    });
  }

  #vote(candidateId) {
    if (candidateId === this.#myVote) return;
    this.#send({ type: 'vote', candidate_id: candidateId });
  }

  // ---------- rendering ----------

  #render() {
    const e = this.#els;
    const orch = this.#orch;
    const mode = orch?.mode ?? 'host';
    // Hidden in host mode (nothing to do) and when the link is broken.
    e.section.hidden = this.#fatal || !orch || mode === 'host';
    e.section.dataset.mode = mode;
    e.chip.textContent = MODE_LABELS[mode] ?? mode;
    e.chip.dataset.mode = mode;
    e.conn.hidden = this.#open;
    e.nameCurrent.textContent = this.#myName || 'anonymous';
    e.recentSection.hidden = this.#fatal || this.#recent.length === 0;
    this.#layout();
    if (e.section.hidden) {
      this.#stopTimer();
      return;
    }

    const s = orch.settings ?? {};
    e.help.textContent = {
      queue: `Prompts are applied in order, one every ${seconds(s.queue_interval_seconds ?? 5)} s. You can have one waiting at a time.`,
      vote: `Propose a prompt or vote for one. When the round ends (${seconds(s.vote_window_seconds ?? 15)} s), the most voted prompt is applied.`,
      turns: `Raise your hand. When it is your turn, your prompts go straight to the world for ${seconds(s.turn_seconds ?? 30)} s.`,
    }[mode] ?? '';

    e.queuePanel.hidden = mode !== 'queue';
    e.votePanel.hidden = mode !== 'vote';
    e.turnsPanel.hidden = mode !== 'turns';
    if (mode === 'queue') this.#renderQueue(orch.queue ?? []);
    if (mode === 'vote') this.#renderCandidates(orch.candidates ?? []);
    else this.#candidateItems.clear();
    if (mode === 'turns') this.#renderTurns(orch.turn ?? {});

    this.#renderInput();
    this.#tick();
    if (mode === 'vote' || mode === 'turns' || this.#cooldownUntil > Date.now()) this.#startTimer();
    else this.#stopTimer();
  }

  #myQueuePosition() {
    const queue = this.#orch?.queue ?? [];
    const i = queue.findIndex((q) => q.participant_id === this.#me);
    return i < 0 ? 0 : i + 1;
  }

  #holdsTurn() {
    return Boolean(this.#me) && this.#orch?.turn?.holder?.participant_id === this.#me;
  }

  #renderInput() {
    const e = this.#els;
    const mode = this.#orch?.mode;
    let blockedWhy = '';
    let label = 'Your prompt';
    let placeholder = 'What should happen next?';
    if (mode === 'queue') {
      const pos = this.#myQueuePosition();
      if (pos) blockedWhy = `Yours is #${pos} in the queue`;
    } else if (mode === 'vote') {
      label = 'Propose a prompt';
    } else if (mode === 'turns' && !this.#holdsTurn()) {
      blockedWhy = 'wait';
      placeholder = 'Wait for your turn';
    }
    if (mode === 'turns' && this.#holdsTurn()) label = 'Your turn: steer the world';
    e.label.textContent = label;
    e.input.placeholder = blockedWhy && blockedWhy !== 'wait' ? blockedWhy : placeholder;
    const disabled = !this.#open || Boolean(blockedWhy) || !this.#me;
    e.input.disabled = disabled;
    e.sendBtn.disabled = disabled || this.#cooldownUntil > Date.now();
    e.form.dataset.blocked = blockedWhy ? 'true' : 'false';
    this.#renderChars();
  }

  #renderChars() {
    const e = this.#els;
    const max = e.input.maxLength > 0 ? e.input.maxLength : 0;
    const n = e.input.value.length;
    // Only worth showing once it matters.
    e.chars.textContent = max && n > max * 0.6 ? `${n}/${max}` : '';
  }

  #renderQueue(queue) {
    const e = this.#els;
    e.queueCount.textContent = queue.length ? `(${queue.length})` : '';
    e.queue.replaceChildren(...queue.map((q, i) => {
      const mine = q.participant_id === this.#me;
      return el('li', { className: mine ? 'entry mine' : 'entry' },
        el('span', { className: 'pos', text: `${i + 1}` }),
        el('span', { className: 'prompt wrap', text: q.prompt ?? '' }),
        el('span', { className: 'who', text: this.#who(q.participant_id, q.name || 'Anonymous') }));
    }));
  }

  #renderCandidates(candidates) {
    const e = this.#els;
    const total = candidates.reduce((n, c) => n + (Number(c.votes) || 0), 0);
    const top = Math.max(0, ...candidates.map((c) => Number(c.votes) || 0));
    const seen = new Set();
    const items = candidates.map((c) => {
      seen.add(c.candidate_id);
      let item = this.#candidateItems.get(c.candidate_id);
      if (!item) {
        // Kept per candidate, so a tally update doesn't replace the button under a finger.
        const prompt = el('span', { className: 'prompt wrap' });
        const bar = el('span', { className: 'bar' });
        const meter = el('span', { className: 'meter', attrs: { 'aria-hidden': 'true' } }, bar);
        const votes = el('span', { className: 'votes' });
        const button = el('button', { className: 'vote-btn', attrs: { type: 'button' } });
        button.addEventListener('click', () => this.#vote(c.candidate_id));
        const li = el('li', { className: 'entry candidate', dataset: { candidateId: c.candidate_id } },
          prompt, votes, meter, button);
        item = { li, prompt, bar, votes, button };
        this.#candidateItems.set(c.candidate_id, item);
      }
      const n = Number(c.votes) || 0;
      const mine = c.candidate_id === this.#myVote;
      item.prompt.textContent = c.prompt ?? '';
      item.votes.textContent = `${n} ${n === 1 ? 'vote' : 'votes'}`;
      item.votes.dataset.votes = String(n);
      item.bar.style.width = `${total ? Math.round((100 * n) / total) : 0}%`;
      item.li.classList.toggle('mine', mine);
      item.li.classList.toggle('leading', n > 0 && n === top);
      item.button.textContent = mine ? 'Your vote' : 'Vote';
      item.button.setAttribute('aria-pressed', String(mine));
      item.button.classList.toggle('primary', mine);
      item.button.disabled = !this.#open || !this.#me;
      return item.li;
    });
    for (const id of [...this.#candidateItems.keys()]) if (!seen.has(id)) this.#candidateItems.delete(id);
    // Only touch the DOM when the set or order changed.
    const current = [...e.candidates.children];
    if (current.length !== items.length || current.some((li, i) => li !== items[i])) e.candidates.replaceChildren(...items);
  }

  #renderTurns(turn) {
    const e = this.#els;
    const holder = turn.holder ?? null;
    const mine = this.#holdsTurn();
    const hands = turn.hands ?? [];
    const raised = hands.some((h) => h.participant_id === this.#me);
    e.turnHolder.textContent = holder ? this.#who(holder.participant_id, holder.name || 'Anonymous') : 'Nobody';
    e.turnBox.classList.toggle('mine', mine);
    e.raise.hidden = mine;
    e.raise.disabled = !this.#open || !this.#me || raised;
    e.raise.textContent = raised ? 'Hand raised' : 'Raise hand';
    e.raise.setAttribute('aria-pressed', String(raised));
    e.release.hidden = !(mine || raised);
    e.release.disabled = !this.#open;
    e.release.textContent = mine ? 'End my turn' : 'Lower hand';
    e.handsCount.textContent = hands.length ? `(${hands.length})` : '';
    e.hands.replaceChildren(...hands.map((h, i) => {
      const me = h.participant_id === this.#me;
      return el('li', { className: me ? 'entry mine' : 'entry' },
        el('span', { className: 'pos', text: `${i + 1}` }),
        el('span', { className: 'prompt wrap', text: me ? 'You' : this.#who(h.participant_id, h.name || 'Anonymous') }));
    }));
  }

  #tick() {
    const e = this.#els;
    const mode = this.#orch?.mode;
    const voting = mode === 'vote' && this.#voteDeadline.active && (this.#orch?.candidates ?? []).length > 0;
    e.voteCountdown.hidden = !voting;
    if (voting) {
      const left = this.#voteDeadline.left;
      e.voteCountdown.textContent = left > 0 ? `${clock(left)} left` : 'Counting…';
      e.voteCountdown.dataset.urgent = String(left <= 5000);
    }
    const turning = mode === 'turns' && this.#turnDeadline.active && Boolean(this.#orch?.turn?.holder);
    e.turnCountdown.hidden = !turning;
    if (turning) {
      const left = this.#turnDeadline.left;
      e.turnCountdown.textContent = `${clock(left)} left`;
      e.turnCountdown.dataset.urgent = String(left <= 5000);
    }
    const wait = this.#cooldownUntil - Date.now();
    if (wait > 0 && !e.input.disabled) {
      e.sendBtn.disabled = true;
      e.sendBtn.textContent = `Wait ${Math.ceil(wait / 1000)} s`;
    } else {
      if (wait <= 0 && this.#cooldownUntil) {
        this.#cooldownUntil = 0;
        e.sendBtn.disabled = e.input.disabled;
      }
      e.sendBtn.textContent = 'Send';
    }
  }

  #startTimer() {
    if (!this.#timer) this.#timer = setInterval(() => this.#tick(), TICK_MS);
  }

  #stopTimer() {
    clearInterval(this.#timer);
    this.#timer = null;
  }

  // ---------- recent prompts ----------

  #addRecent({ prompt, source, participantId, name, mode, start = false }) {
    if (typeof prompt !== 'string') return;
    let who;
    if (source === 'participant') {
      who = participantId === this.#me ? 'You' : name || this.#who(participantId, 'Audience');
    } else {
      who = start ? 'Host · start' : 'Host';
    }
    const via = source === 'participant' && mode && mode !== 'host' ? ` · ${mode}` : '';
    this.#recent.unshift({ prompt, who: who + via, source: source === 'participant' ? 'participant' : 'host', at: new Date() });
    this.#recent.length = Math.min(this.#recent.length, RECENT_MAX);
    const e = this.#els;
    e.recent.replaceChildren(...this.#recent.map((r) => {
      const time = el('time', { className: 'at', text: r.at.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' }), attrs: { datetime: r.at.toISOString() } });
      return el('li', { className: 'entry', dataset: { source: r.source } },
        el('span', { className: 'prompt wrap', text: r.prompt }),
        el('span', { className: 'who', text: r.who }),
        time);
    }));
    e.recentSection.hidden = this.#fatal;
    this.#layout();
  }

  /** On a wide screen the side column (participate, recent prompts) sits beside the video. */
  #layout() {
    const e = this.#els;
    // Any visible card of the side column (the chat panel's too) puts the column beside the video.
    document.body.classList.toggle('with-side', Boolean(document.querySelector('.watch-side > :not([hidden])')));
  }
}
