// control.js: the host console's control socket (host.js keeps everything else).
//
// The connection's WebSocket, opened with its client_token and kept up. One beat sends a
// keepalive (the open socket already counts as life; explicit keepalives also cover proxies
// that don't surface socket-level activity) and asks for a fresh client_token once the current
// one is past half its life; the control room's status is asked for every STATUS_MS. A dropped
// socket is reopened with backoff only after the relay says the connection is still there, so a
// connection that ended (idle timeout, max age) doesn't get retried forever.

import { HttpError, fetchJson, wsUrl } from '/static/whep.js';

const KEEPALIVE_MS = 10000;           // well inside the relay's idle_timeout_seconds (default 40)
const SOCKET_BACKOFF_MAX_MS = 2000;   // short: a relay that restarted is found out within seconds
const STATUS_MS = 2000;               // how often the control room asks for counts and health

export class ControlSocket {
  /**
   * conn: the console's connection state, read at each use (phase, id, apiKey, clientToken,
   * tokenExpiresAt, tokenLifeMs). Hooks: onMessage(msg); onChange() when the socket opens or
   * drops; onGone(text) when the relay no longer has the connection; onLost() when the socket
   * cannot be reopened (its client_token expired while it was down); onStreamGone() when the
   * relay says no stream is live (it may have ended while nobody listened); log(text, kind).
   */
  constructor(conn, { onMessage, onChange, onGone, onLost, onStreamGone, log }) {
    this.conn = conn;
    Object.assign(this, { onMessage, onChange, onGone, onLost, onStreamGone, log });
    this.ws = null;
    this.isOpen = false;
    this.attempt = 0;
    this.retryTimer = null;
    this.beatTimer = null;
    this.statusTimer = null;
  }

  send(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  /** A connection taken up (new, or this tab's after a reload): open at once, backoff from scratch. */
  start() {
    this.attempt = 0;
    this.open();
  }

  open() {
    const conn = this.conn;
    const url = wsUrl(`/v1/connections/${encodeURIComponent(conn.id)}/control?token=${encodeURIComponent(conn.clientToken)}`);
    const ws = new WebSocket(url);
    this.ws = ws;

    ws.addEventListener('open', () => {
      if (this.ws !== ws) return;
      this.isOpen = true;
      this.attempt = 0;
      this.log('Control channel open.');
      this.stopTimers();
      // The same beat keeps the client_token fresh (often enough for however short a life the relay gives it).
      this.keepTokenFresh();
      this.beatTimer = setInterval(() => {
        this.send({ type: 'keepalive' });
        this.keepTokenFresh();
      }, Math.min(KEEPALIVE_MS, conn.tokenLifeMs / 4));
      this.send({ type: 'status' });
      this.statusTimer = setInterval(() => this.send({ type: 'status' }), STATUS_MS);
      this.onChange();
    });

    ws.addEventListener('message', (e) => {
      if (this.ws !== ws) return;
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        this.log('Unreadable message on the control channel.', 'error');
        return;
      }
      if (msg && typeof msg.type === 'string') this.onMessage(msg);
    });

    ws.addEventListener('close', () => {
      if (this.ws !== ws) return; // a socket we already replaced or closed on purpose
      this.ws = null;
      this.isOpen = false;
      this.stopTimers();
      this.onChange();
      if (conn.phase !== 'connected') return;
      this.recover();
    });
  }

  /** Close on purpose (disconnect, connection gone, page hidden): no recovery follows. */
  close(reason) {
    const ws = this.ws;
    this.ws = null; // first, so its close handler knows this was on purpose
    this.isOpen = false;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.stopTimers();
    if (ws) ws.close(1000, reason);
  }

  stopTimers() {
    clearInterval(this.beatTimer);
    clearInterval(this.statusTimer);
    this.beatTimer = this.statusTimer = null;
  }

  /** The socket dropped (or the page came back): ask whether the connection is still there, then reopen. */
  async recover() {
    const conn = this.conn;
    try {
      const state = await fetchJson(`/v1/connections/${encodeURIComponent(conn.id)}`, {
        headers: { Authorization: `Bearer ${conn.apiKey}` },
      });
      if (conn.phase !== 'connected') return;
      if (state && ['closed', 'ended', 'expired', 'disconnected'].includes(state.status)) {
        this.onGone('This connection has ended. Connect again to go on broadcasting.');
        return;
      }
      // Keep the relay's idle timer happy while the socket is down.
      fetch(`/v1/connections/${encodeURIComponent(conn.id)}/keepalive`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${conn.apiKey}` },
      }).catch(() => {});
      // The stream may have ended while we weren't listening.
      if (state && 'stream' in state && !state.stream) this.onStreamGone();
    } catch (err) {
      if (conn.phase !== 'connected') return;
      // 404: the relay does not know it (it restarted, or reaped it); 401: nor the key or token
      // (a restarted relay with other keys). Either way it will not come back: say so and stop.
      if (err instanceof HttpError && (err.status === 404 || err.status === 401)) {
        this.onGone('This connection is gone: the relay restarted or closed it. Its watch link no longer works. Connect again to start a new broadcast.');
        return;
      }
      // Network trouble: fall through and retry the socket.
    }
    if (Date.now() > conn.tokenExpiresAt) {
      // The client_token only opens sockets during its lifetime; after that we can't get back in.
      this.onLost();
      return;
    }
    const delay = Math.min(1000 * 2 ** this.attempt, SOCKET_BACKOFF_MAX_MS);
    this.attempt += 1;
    if (this.attempt === 1) this.log('Lost the control channel; reconnecting…');
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      if (conn.phase === 'connected') this.open();
    }, delay);
  }

  /** Past half its life, ask for a new client_token (the relay mints one only then). */
  keepTokenFresh() {
    const conn = this.conn;
    if (conn.tokenLifeMs && conn.tokenExpiresAt - Date.now() < conn.tokenLifeMs / 2) this.send({ type: 'refresh_token' });
  }
}
