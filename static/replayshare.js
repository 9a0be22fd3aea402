// replayshare.js: the host console's "offer spectators the replay" switch (the watch link card).
//
// Off by default: a recording belongs to the API key. On, each stream's end hands every spectator a
// signed link to that stream's replay (stream_ended's replay_url); the switch sends PATCH
// /v1/broadcasts/{id} {share_replay} and shows what the relay answered, never what it hoped.
// The choice is the connection's: a new connection (even on the same channel) starts with it off.

import { fetchJson } from '/static/whep.js';
import { hostErrorText } from '/static/hostview.js';

const $ = (id) => document.getElementById(id);

export class ReplayShare {
  /** apiKey(): the console's key, which the PATCH is authorized with. */
  constructor({ apiKey }) {
    this.apiKey = apiKey;
    this.box = $('share-replay');
    this.note = $('share-replay-note');
    this.broadcastId = null;
    this.box.addEventListener('change', () => this.send(this.box.checked));
  }

  show(broadcast) {
    this.broadcastId = broadcast.broadcast_id;
    this.box.disabled = false;
    if (typeof broadcast.share_replay === 'boolean') this.box.checked = broadcast.share_replay;
  }

  clear() {
    this.broadcastId = null;
    this.box.checked = false; // the next connection starts off; no stale "on" while there is none
    this.box.disabled = true;
    this.note.hidden = true;
  }

  async send(share) {
    const id = this.broadcastId;
    if (!id) return;
    this.box.disabled = true;
    try {
      const body = await fetchJson(`/v1/broadcasts/${encodeURIComponent(id)}`, {
        method: 'PATCH',
        headers: { Authorization: `Bearer ${this.apiKey()}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ share_replay: share }),
      });
      this.box.checked = body.share_replay === true;
      this.note.hidden = true;
    } catch (err) {
      this.box.checked = !share; // unchanged at the relay
      this.note.textContent = `Could not change it: ${hostErrorText(err)}`;
      this.note.hidden = false;
    } finally {
      if (this.broadcastId === id) this.box.disabled = false;
    }
  }
}
