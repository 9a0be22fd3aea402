// preview.js: what spectators see, and where: the host console's watch link (with its copy
// button and the HLS link) and its preview, a WhepPlayer on the page's own relay (same origin),
// joined with a token the console hands it on every (re)connect, with a badge that tells a live
// stream from a connected but idle broadcast.

import { copyText } from '/static/hostview.js';
import { WhepPlayer } from '/static/whep.js';
import { ReplayShare } from '/static/replayshare.js';

const $ = (id) => document.getElementById(id);

/** The watch link card: the broadcast's watch URL, ready to paste, its HLS URL, and the replay switch. */
export class WatchLink {
  constructor({ apiKey }) {
    this.replay = new ReplayShare({ apiKey });
    this.url = $('watch-url');
    this.empty = $('watch-url-empty');
    this.copy = $('copy-watch-url');
    this.hlsRow = $('hls-row');
    this.hlsUrl = $('hls-url');
    this.copy.addEventListener('click', async () => {
      const ok = await copyText(this.url.href);
      this.copy.textContent = ok ? 'Copied' : 'Copy failed';
      setTimeout(() => {
        this.copy.textContent = 'Copy';
      }, 1500);
    });
  }

  show(broadcast) {
    // watch_url is absolute in the contract; resolve anyway, and add the spectator
    // token if the relay left it out, so the link works when pasted as is.
    const token = broadcast.spectator_token;
    const url = new URL(
      broadcast.watch_url || `/watch/${encodeURIComponent(broadcast.broadcast_id)}`,
      window.location.href,
    );
    if (token && !url.searchParams.has('token')) url.searchParams.set('token', token);
    this.url.href = url.href;
    this.url.textContent = url.href;
    this.url.hidden = false;
    this.empty.hidden = true;
    this.copy.disabled = false;
    // The same broadcast as live HLS (null when the relay has it off): for OBS, VLC or a CDN origin.
    const hls = broadcast.hls_url ? new URL(broadcast.hls_url, window.location.href).href : '';
    this.hlsUrl.href = hls || '#';
    this.hlsUrl.textContent = hls;
    this.hlsRow.hidden = !hls;
    this.replay.show(broadcast);
  }

  /** The connection is gone: no dead link left to copy. */
  clear() {
    this.url.hidden = true;
    this.url.removeAttribute('href');
    this.url.textContent = '';
    this.empty.hidden = false;
    this.copy.disabled = true;
    this.hlsRow.hidden = true;
    this.hlsUrl.textContent = '';
    this.replay.clear();
  }
}

const PREVIEW_LABELS = {
  connecting: ['connecting', 'Connecting'],
  connected: ['waiting', 'Connected'],
  reconnecting: ['reconnecting', 'Reconnecting'],
  failed: ['error', 'Unavailable'],
  stopped: ['idle', 'Off'],
};

export class HostPreview {
  #player = null;
  #live = false;

  /** token(): the token to join with, asked for on every (re)connect; log(text, kind): the console's log. */
  constructor({ video, stage, badge, token, log }) {
    this.video = video;
    this.badge = badge;
    this.token = token;
    this.log = log;
    const fit = () => {
      const { videoWidth: w, videoHeight: h } = video;
      if (w && h) stage.style.setProperty('--ar', `${w} / ${h}`);
    };
    video.addEventListener('loadedmetadata', fit);
    video.addEventListener('resize', fit);
  }

  start(broadcastId) {
    this.stop();
    this.#player = new WhepPlayer({
      endpoint: `/v1/broadcasts/${encodeURIComponent(broadcastId)}/whep`,
      token: this.token,
      // The relay takes the client_token on the offer only: its session's PATCH/DELETE would
      // refuse it (401) and the preview would linger. The Location is the capability anyway.
      sessionAuth: false,
      video: this.video,
      onStatus: ({ state, message, retryInMs }) => {
        let [badge, label] = PREVIEW_LABELS[state] ?? ['idle', state];
        if (state === 'connected' && this.#live) [badge, label] = ['live', 'Live'];
        this.#show(badge, label);
        if (message && (state === 'failed' || retryInMs)) this.log(`Preview: ${message}`, state === 'failed' ? 'error' : '');
      },
    });
    this.#player.setLive(this.#live);
    this.#player.start();
  }

  stop() {
    if (this.#player) this.#player.stop();
    this.#player = null;
  }

  /** A stream started or ended: the player expects frames (or not), and the badge says so. */
  setLive(live) {
    this.#live = live;
    if (!this.#player) return;
    this.#player.setLive(live);
    if (this.#player.state === 'connected') this.#show(live ? 'live' : 'waiting', live ? 'Live' : 'Connected');
  }

  #show(badge, label) {
    this.badge.dataset.state = badge;
    this.badge.textContent = label;
  }
}
