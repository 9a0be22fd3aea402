// chat.js: the watch page's chat panel (messages and reactions on the events socket).
//
// watch.js hands every events message to ChatPanel.onEvent() and gives it a send() that writes
// to that socket. The relay moderates and fans out; this module shows what it says:
//   out: chat {text}, reaction {emoji}
//   in:  hello {participant_id, chat: {enabled, reactions, max_chars, history}}, chat, chat_result,
//        chat_cleared, chat_state {enabled}, reactions {counts}, reaction_result
// Messages and names are other people's text: they only ever go in via textContent.

import { el } from '/static/ui.js';

const ROWS_MAX = 200;          // rows kept on the page; older ones scroll away for good
const BURST_MS = 2500;         // how long a round of reaction counts stays up

// The relay's refusals, for a person (the relay's own `message` is the fallback).
const REASONS = {
  chat_off: 'Chat is off: the host has turned it off.',
  blocked: 'The host has muted you: your messages are not shown.',
  too_long: 'That message is too long.',
  invalid_text: 'That message contains characters that cannot be sent.',
  empty: 'Type a message first.',
  blocked_word: 'That message contains a word that is not allowed here.',
  rate_limited: 'Not so fast: wait a moment before sending again.',
  unknown_reaction: 'That reaction is not offered here.',
  unknown_participant: 'Not connected yet: try again in a moment.',
  cooldown: 'Slow mode: wait a moment before your next message.',
  chat_busy: 'The chat is very busy: try again in a moment.',
};

export class ChatPanel {
  #send;
  #els;
  #me = null;
  #open = false;
  #fatal = false;
  #enabled = true;
  #seenHello = false;
  #reactions = [];
  #rows = new Map();   // message_id -> li
  #burstTimer = null;
  #unanswered = null;  // the text sent last, until its chat_result: put back if it was refused

  constructor({ send }) {
    this.#send = send;
    const $ = (id) => document.getElementById(id);
    this.#els = {
      section: $('chat'), off: $('chat-off'), log: $('chat-log'), form: $('chat-form'),
      text: $('chat-text'), sendButton: $('chat-send'), result: $('chat-result'),
      reactions: $('chat-reactions'), burst: $('chat-burst'),
    };
    this.#els.form.addEventListener('submit', (e) => {
      e.preventDefault();
      const text = this.#els.text.value.trim();
      if (!text) {
        this.#showResult(REASONS.empty, 'error');
        return;
      }
      if (!this.#send({ type: 'chat', text })) {
        this.#showResult('Not connected: try again in a moment.', 'error');
        return;
      }
      // Cleared now, not when the answer comes: what is typed meanwhile (the next message) is never wiped.
      this.#unanswered = text;
      this.#els.text.value = '';
    });
    this.#render();
  }

  // ---------- from watch.js ----------

  setConnected(open) {
    this.#open = open;
    if (!open) this.#me = null;
    this.#render();
  }

  setFatal(fatal) {
    this.#fatal = Boolean(fatal);
    this.#render();
  }

  onEvent(msg) {
    switch (msg.type) {
      case 'hello':
        if (typeof msg.participant_id === 'string') this.#me = msg.participant_id;
        if (msg.chat && typeof msg.chat === 'object') this.#onHello(msg.chat);
        break;
      case 'chat':
        this.#add(msg);
        break;
      case 'chat_cleared':
        this.#rows.get(msg.message_id)?.remove();
        this.#rows.delete(msg.message_id);
        break;
      case 'chat_state':
        this.#enabled = Boolean(msg.enabled);
        if (this.#enabled) this.#showResult('', 'ok');
        this.#render();
        break;
      case 'chat_result': {
        const refused = this.#unanswered;
        this.#unanswered = null;
        if (msg.status === 'sent') {
          this.#showResult('', 'ok');
        } else {
          // Refused: the words come back to the field to edit or resend, unless something new is typed there.
          if (refused && !this.#els.text.value) this.#els.text.value = refused;
          this.#showResult(this.#reason(msg), 'error');
        }
        break;
      }
      case 'reaction_result':
        if (msg.status !== 'sent') this.#showResult(this.#reason(msg), 'error');
        break;
      case 'reactions':
        this.#showBurst(msg.counts);
        break;
      default:
        break;
    }
  }

  // ---------- rendering ----------

  #onHello(chat) {
    this.#seenHello = true;
    this.#enabled = chat.enabled !== false;
    const max = Number(chat.max_chars);
    if (Number.isFinite(max) && max > 0) this.#els.text.maxLength = max;
    // A (re)joined socket's history is the truth: rebuild, so messages cleared meanwhile go.
    this.#els.log.replaceChildren();
    this.#rows.clear();
    for (const message of Array.isArray(chat.history) ? chat.history : []) this.#add(message);
    const reactions = Array.isArray(chat.reactions) ? chat.reactions.filter((r) => typeof r === 'string') : [];
    if (reactions.join() !== this.#reactions.join()) {
      this.#reactions = reactions;
      this.#els.reactions.replaceChildren(...reactions.map((emoji) => {
        const button = el('button', { className: 'reaction', text: emoji, attrs: { type: 'button', 'aria-label': `React ${emoji}` } });
        button.addEventListener('click', () => this.#send({ type: 'reaction', emoji }));
        return button;
      }));
    }
    this.#render();
  }

  #add(msg) {
    if (typeof msg.message_id !== 'string' || typeof msg.text !== 'string' || this.#rows.has(msg.message_id)) return;
    const mine = msg.participant_id === this.#me;
    const who = mine ? 'You' : (typeof msg.name === 'string' && msg.name) || 'Anonymous';
    const li = el('li', { className: `entry chat-line${mine ? ' mine' : ''}` },
      el('span', { className: 'who', text: `${who}: ` }),
      el('span', { className: 'text wrap', text: msg.text }));
    this.#els.log.append(li);
    this.#rows.set(msg.message_id, li);
    while (this.#rows.size > ROWS_MAX) {
      const [oldest, row] = this.#rows.entries().next().value;
      row.remove();
      this.#rows.delete(oldest);
    }
    this.#els.log.scrollTop = this.#els.log.scrollHeight;
  }

  #showBurst(counts) {
    if (!counts || typeof counts !== 'object') return;
    const parts = Object.entries(counts).filter(([, n]) => Number.isFinite(n) && n > 0).map(([e, n]) => `${e} ${n}`);
    this.#els.burst.textContent = parts.join('  ');
    clearTimeout(this.#burstTimer);
    this.#burstTimer = setTimeout(() => { this.#els.burst.textContent = ''; }, BURST_MS);
  }

  #reason(msg) {
    return REASONS[msg.reason] ?? (typeof msg.message === 'string' ? msg.message : 'That did not go through.');
  }

  #showResult(text, kind) {
    const r = this.#els.result;
    r.textContent = text;
    r.dataset.kind = kind;
    r.hidden = !text;
  }

  #render() {
    const e = this.#els;
    e.section.hidden = this.#fatal || !this.#seenHello;
    const usable = this.#open && this.#enabled;
    e.off.hidden = this.#enabled;
    e.text.disabled = !usable;
    e.sendButton.disabled = !usable;
    for (const button of e.reactions.children) button.disabled = !usable;
    if (!this.#enabled) this.#showResult('', 'ok');  // "Chat is off" says it already
    document.body.classList.toggle('with-side', Boolean(document.querySelector('.watch-side > :not([hidden])')));
  }
}
