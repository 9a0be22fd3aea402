// whep.js: a small WHEP (WebRTC-HTTP Egress Protocol) client, shared by the
// watch page and the host console's preview (the host is a spectator too).
//
// Two layers:
//   * WhepSession: one negotiated RTCPeerConnection plus its server-side
//     session (the Location URL). Opening it is the whole WHEP handshake;
//     closing it DELETEs the session and closes the pc, in one place, so a
//     peer connection can never be left behind.
//   * WhepPlayer: keeps a <video> fed from a broadcast. It owns at most one
//     WhepSession at a time, watches its health, and replaces it with backoff
//     after a network drop or a stall.
// Plus the few helpers the pages need: HttpError / fetchJson / errorText (the
// relay's JSON error shape), wsUrl, and getIceServers.

const ICE_GATHERING_MAX_MS = 2000;    // post the offer after this even if gathering goes on
const DISCONNECTED_GRACE_MS = 3000;   // "disconnected" often heals by itself; give it this long
const NO_FRAMES_MS = 5000;            // live but no decoded frame for this long = stalled
const CONNECT_TIMEOUT_MS = 15000;     // ICE never reached "connected"
const BACKOFF_MAX_MS = 10000;
const TICK_MS = 1000;

// Statuses whose cause retrying cannot fix: bad token, unknown broadcast,
// malformed offer, no codec in common. Everything else (503 spectator cap,
// 429, 5xx, network errors) is worth another try later.
const FATAL_STATUSES = new Set([400, 401, 403, 404, 410, 415, 422]);

/** An HTTP error from the relay, carrying its `{error: {code, message, action, details}}` body. */
export class HttpError extends Error {
  constructor(status, { code = '', message = '', action = '', details = null } = {}, retryAfterSeconds = null) {
    super(message || `Request failed (HTTP ${status})`);
    this.name = 'HttpError';
    this.status = status;
    this.code = code;
    this.action = action;
    this.details = details;
    this.retryAfterSeconds = retryAfterSeconds;
  }

  get fatal() {
    return FATAL_STATUSES.has(this.status);
  }
}

/** Builds an HttpError from a failed response; never throws, whatever the body is. */
export async function readHttpError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's HTML page, an empty body): fall back to the status.
  }
  const err = body && typeof body.error === 'object' && body.error !== null ? body.error : {};
  const retryAfter = Number.parseInt(response.headers.get('Retry-After') ?? '', 10);
  return new HttpError(
    response.status,
    {
      code: typeof err.code === 'string' ? err.code : '',
      message: typeof err.message === 'string' ? err.message : '',
      action: typeof err.action === 'string' ? err.action : '',
      details: err.details ?? null,
    },
    Number.isFinite(retryAfter) && retryAfter >= 0 ? retryAfter : null,
  );
}

/** fetch() that returns parsed JSON (null for an empty body) and throws HttpError on non-2xx. */
export async function fetchJson(url, options = {}) {
  const response = await fetch(url, { cache: 'no-store', ...options });
  if (!response.ok) throw await readHttpError(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** What a person reads for an error fetchJson threw: the relay's message and its advice, or "no network". */
export function errorText(err) {
  if (err instanceof HttpError) return err.action ? `${err.message} ${err.action}` : err.message;
  return 'Network error: could not reach the relay.';
}

/** ws:// or wss:// URL for a same-origin path (matches the page's scheme, so https pages get wss). */
export function wsUrl(path) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

/** Adds ?token= to a URL (the relay accepts it there, which avoids a CORS preflight for the POST). */
export function withToken(url, token) {
  const u = new URL(url, window.location.href);
  if (token) u.searchParams.set('token', token);
  return u.href;
}

let lastIceServers = [];

/**
 * The relay's STUN/TURN list from GET /config. Fetched per attempt (credentials
 * may rotate); on failure the last good list is used, since an empty list still
 * works on a LAN.
 */
export async function getIceServers(configUrl = '/config') {
  try {
    const config = await fetchJson(configUrl);
    if (config && Array.isArray(config.iceServers)) lastIceServers = config.iceServers;
  } catch {
    // Keep lastIceServers.
  }
  return lastIceServers;
}

function waitForIceGathering(pc, maxMs) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === 'complete') done();
    };
    const timer = setTimeout(done, maxMs);
    pc.addEventListener('icegatheringstatechange', check);
  });
}

/** Per-mid m= lines of an SDP, needed to frame trickled candidates (RFC 8840). */
function mediaLinesByMid(sdp) {
  const byMid = new Map();
  for (const section of sdp.split(/\r?\n(?=m=)/).slice(1)) {
    const lines = section.split(/\r?\n/);
    const mid = lines.find((l) => l.startsWith('a=mid:'));
    if (mid) byMid.set(mid.slice(6), lines[0]);
  }
  return byMid;
}

/** One WHEP session: a receive-only RTCPeerConnection and its Location on the relay. */
export class WhepSession {
  #closed = false;
  #posted = false;
  #late = [];           // candidates found after the offer was posted, waiting for the Location
  #flushTimer = null;

  constructor(pc, token, sessionAuth = true) {
    this.pc = pc;
    this.token = token;
    this.sessionAuth = sessionAuth;
    this.location = null;
  }

  /**
   * Runs the WHEP handshake. `onTrack` is attached before the answer is applied,
   * because that is when the browser fires `track`. On any failure the session
   * is closed before the error is rethrown.
   *
   * `sessionAuth: false` keeps the token off the session's PATCH and DELETE (the Location is
   * the capability): for a token the relay accepts on the offer only, such as the host
   * preview's client_token.
   */
  static async open({ endpoint, token, iceServers = [], onTrack, sessionAuth = true }) {
    const pc = new RTCPeerConnection({ iceServers });
    const session = new WhepSession(pc, token, sessionAuth);
    try {
      // Both lines, video then audio: the relay's contract (and the hosted SDKs) expect
      // exactly this shape; the answer may leave audio inactive.
      pc.addTransceiver('video', { direction: 'recvonly' });
      pc.addTransceiver('audio', { direction: 'recvonly' });
      if (onTrack) pc.addEventListener('track', onTrack);
      pc.addEventListener('icecandidate', (e) => session.#onCandidate(e.candidate));

      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc, ICE_GATHERING_MAX_MS);
      if (session.#closed) throw new Error('closed');

      session.#posted = true;
      const response = await fetch(withToken(endpoint, token), {
        method: 'POST',
        headers: { 'Content-Type': 'application/sdp' },
        body: pc.localDescription.sdp,
        cache: 'no-store',
      });
      if (response.status !== 201 && response.status !== 200) throw await readHttpError(response);
      const location = response.headers.get('Location');
      // A relative Location resolves against the URL it came from (RFC 9110), which
      // for an absolute-path Location is the page's origin anyway.
      if (location) session.location = new URL(location, response.url || window.location.href).href;
      const answer = await response.text();
      if (session.#closed) throw new Error('closed');
      await pc.setRemoteDescription({ type: 'answer', sdp: answer });
      session.#flushCandidates();
      return session;
    } catch (err) {
      session.close();
      throw err;
    }
  }

  get closed() {
    return this.#closed;
  }

  /**
   * Ends the session: DELETE on the relay (so the spectator slot frees at once)
   * and close the pc. Idempotent. `keepalive` lets the DELETE outlive the page.
   */
  close({ keepalive = false } = {}) {
    if (this.#closed) return Promise.resolve();
    this.#closed = true;
    clearTimeout(this.#flushTimer);
    this.pc.close();
    if (!this.location) return Promise.resolve();
    return fetch(this.location, { method: 'DELETE', keepalive, headers: this.#authHeaders() })
      .then(() => undefined, () => undefined);
  }

  #authHeaders() {
    // The Location is a capability URL already; the token is sent too in case the
    // relay checks it, and a header keeps it out of access logs.
    return this.token && this.sessionAuth ? { Authorization: `Bearer ${this.token}` } : {};
  }

  // Candidates gathered before the POST are inside the offer. Those found later
  // (gathering ran past ICE_GATHERING_MAX_MS, e.g. a slow STUN server) are trickled
  // with PATCH once the Location is known. Best effort: errors are ignored.
  #onCandidate(candidate) {
    if (!this.#posted || this.#closed || !candidate || !candidate.candidate) return;
    this.#late.push(candidate);
    if (this.location) this.#scheduleFlush();
  }

  #scheduleFlush() {
    clearTimeout(this.#flushTimer);
    this.#flushTimer = setTimeout(() => this.#flushCandidates(), 50); // batch a burst into one PATCH
  }

  #flushCandidates() {
    if (!this.location || this.#closed || this.#late.length === 0) return;
    const batch = this.#late.splice(0);
    const sdp = this.pc.localDescription?.sdp ?? '';
    const ufrag = /a=ice-ufrag:(\S+)/.exec(sdp)?.[1];
    const pwd = /a=ice-pwd:(\S+)/.exec(sdp)?.[1];
    if (!ufrag || !pwd) return;
    const mlines = mediaLinesByMid(sdp);
    const lines = [`a=ice-ufrag:${ufrag}`, `a=ice-pwd:${pwd}`];
    const mids = [...new Set(batch.map((c) => c.sdpMid ?? '0'))];
    for (const mid of mids) {
      lines.push(mlines.get(mid) ?? 'm=video 9 UDP/TLS/RTP/SAVPF 0', `a=mid:${mid}`);
      for (const c of batch) if ((c.sdpMid ?? '0') === mid) lines.push(`a=${c.candidate}`);
    }
    fetch(this.location, {
      method: 'PATCH',
      headers: { 'Content-Type': 'application/trickle-ice-sdpfrag', ...this.#authHeaders() },
      body: `${lines.join('\r\n')}\r\n`,
    }).catch(() => {});
  }
}

/**
 * Plays a broadcast into a <video>, reconnecting as needed.
 *
 * onStatus({state, message, retryInMs, error}) with state one of:
 *   "connecting"   first attempt under way (message/retryInMs set while waiting to retry)
 *   "connected"    media path is up (frames may or may not be flowing: see setLive)
 *   "reconnecting" it was up, dropped, and is being rebuilt
 *   "failed"       a fatal error (bad token, unknown broadcast): no more retries
 *   "stopped"      stop() was called
 * onAudio(hasAudio): whether audible audio is arriving (decides the Unmute button).
 * token: a string, or a function giving the token for each attempt (it may change over time).
 * endpoint, configUrl: strings, or functions giving them for each attempt (the watch page moves to
 *   another node of a cluster when its node dies).
 * onRetry(error): an attempt failed or a session dropped (error: an HttpError, another Error for a
 *   network failure, or null for a lost connection); a retry is scheduled.
 * sessionAuth: see WhepSession.open.
 */
export class WhepPlayer {
  #endpoint;
  #token;
  #video;
  #onStatus;
  #onAudio;
  #onRetry;
  #configUrl;
  #sessionAuth;

  #running = false;
  #gen = 0;              // bumped on every teardown; callbacks of older attempts check it and bail
  #session = null;
  #retryTimer = null;
  #tickTimer = null;
  #attempt = 0;          // backoff index: 1 s, 2 s, 4 s, 8 s, 10 s, 10 s...
  #everConnected = false;
  #state = 'stopped';

  #live = false;
  #liveSince = 0;
  #openedAt = 0;
  #connectedAt = 0;
  #badSince = null;
  #frames = 0;
  #lastFrameAt = 0;
  #audioTrack = null;
  #hasAudio = false;
  #statsBusy = false;
  #jitter = { delay: 0, emitted: 0 }; // the video jitter buffer's running totals, for a per-tick average
  #behindMs = null;

  constructor({
    endpoint, token, video, onStatus = () => {}, onAudio = () => {}, onRetry = () => {}, configUrl = '/config',
    sessionAuth = true,
  }) {
    this.#endpoint = endpoint;
    this.#configUrl = configUrl;
    this.#onRetry = onRetry;
    this.#token = token;
    this.#sessionAuth = sessionAuth;
    this.#video = video;
    this.#onStatus = onStatus;
    this.#onAudio = onAudio;
  }

  get state() {
    return this.#state;
  }

  /** How far behind the sender the picture is, in ms (half the round trip plus the jitter buffer's
   *  hold over the last tick), or null before the browser has said. */
  get behindMs() {
    return this.#behindMs;
  }

  /** True if a video frame was decoded in the last two seconds. */
  get receiving() {
    return this.#lastFrameAt > 0 && performance.now() - this.#lastFrameAt < 2000;
  }

  start() {
    if (this.#running) return;
    this.#running = true;
    this.#attempt = 0;
    this.#connect();
  }

  /** Stops for good (until start()). `keepalive` for pagehide, so the DELETE still goes out. */
  stop({ keepalive = false } = {}) {
    if (!this.#running) return;
    this.#running = false;
    this.#teardown({ keepalive });
    this.#video.srcObject = null;
    this.#setAudio(false);
    this.#emit('stopped');
  }

  /**
   * Tells the player whether the broadcast is live (from the events socket or the
   * host's control socket). Only while live does a lack of frames count as a stall:
   * between streams the relay legitimately sends nothing.
   */
  setLive(live) {
    live = Boolean(live);
    if (live && !this.#live) this.#liveSince = performance.now();
    this.#live = live;
  }

  /** Drops the current session and reconnects now (e.g. the broadcast changed). */
  restart() {
    if (!this.#running) return this.start();
    this.#teardown();
    this.#attempt = 0;
    this.#connect();
  }

  #emit(state, extra = {}) {
    this.#state = state;
    this.#onStatus({ state, message: '', retryInMs: 0, error: null, ...extra });
  }

  async #connect() {
    const gen = ++this.#gen;
    this.#emit(this.#everConnected ? 'reconnecting' : 'connecting');
    const resolve = (value) => (typeof value === 'function' ? value() : value);
    const iceServers = await getIceServers(resolve(this.#configUrl));
    if (gen !== this.#gen) return;

    const stream = new MediaStream();
    let session;
    try {
      session = await WhepSession.open({
        endpoint: resolve(this.#endpoint),
        token: resolve(this.#token),
        sessionAuth: this.#sessionAuth,
        iceServers,
        onTrack: (e) => {
          if (gen === this.#gen) this.#onTrack(e.track, stream);
        },
      });
    } catch (err) {
      if (gen !== this.#gen) return;
      this.#onOpenFailed(err);
      return;
    }
    if (gen !== this.#gen) {
      // stop() or restart() ran while we were negotiating: this session is orphaned.
      session.close();
      return;
    }

    this.#session = session;
    this.#openedAt = performance.now();
    this.#connectedAt = 0;
    this.#badSince = null;
    this.#frames = 0;
    this.#lastFrameAt = 0;
    session.pc.addEventListener('connectionstatechange', () => {
      if (gen === this.#gen) this.#checkConnection();
    });
    this.#tickTimer = setInterval(() => this.#tick(gen), TICK_MS);
    this.#checkConnection();
  }

  #onTrack(track, stream) {
    stream.addTrack(track);
    if (this.#video.srcObject !== stream) {
      // One MediaStream per session: swapping it in keeps the last frame of the old
      // session on screen until the new one has a track.
      this.#video.srcObject = stream;
      this.#video.play().catch(() => {}); // autoplay may be refused; the muted attribute usually avoids that
    }
    if (track.kind === 'audio') {
      this.#audioTrack = track;
      this.#setAudio(false); // decided by #pollAudio from the stats, not by the track's mere presence
    }
  }

  #onOpenFailed(err) {
    if (err instanceof HttpError && err.fatal) {
      this.#running = false;
      this.#teardown();
      this.#emit('failed', { message: err.message, error: err });
      return;
    }
    const message = err instanceof HttpError ? err.message : 'Network error: could not reach the relay';
    this.#scheduleRetry(message, err instanceof HttpError ? err.retryAfterSeconds : null, err);
  }

  #scheduleRetry(message, retryAfterSeconds = null, error = null) {
    this.#teardown();
    let delay = Math.min(1000 * 2 ** this.#attempt, BACKOFF_MAX_MS);
    this.#attempt += 1;
    // A Retry-After (503 spectator cap) is the relay telling us when trying again makes sense.
    if (retryAfterSeconds != null) delay = Math.max(delay, retryAfterSeconds * 1000);
    this.#emit(this.#everConnected ? 'reconnecting' : 'connecting', { message, retryInMs: delay, error });
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      if (this.#running) this.#connect();
    }, delay);
    this.#onRetry(error);  // it may restart() (at another node) before the timer fires: that cancels it
  }

  /** Closes the current session (if any) and cancels every timer of the current attempt. */
  #teardown({ keepalive = false } = {}) {
    this.#gen += 1;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    clearInterval(this.#tickTimer);
    this.#tickTimer = null;
    if (this.#session) {
      this.#session.close({ keepalive });
      this.#session = null;
    }
    this.#audioTrack = null;
    this.#jitter = { delay: 0, emitted: 0 }; // a new session counts from zero
    this.#behindMs = null;
  }

  #checkConnection() {
    const session = this.#session;
    if (!session) return;
    const now = performance.now();
    const cs = session.pc.connectionState;
    if (cs === 'connected') {
      this.#badSince = null;
      if (!this.#connectedAt) {
        this.#connectedAt = now;
        this.#everConnected = true;
        // Between streams there are no frames to prove health, so a clean connect is enough.
        if (!this.#live) this.#attempt = 0;
        this.#emit('connected');
      }
    } else if (cs === 'failed' || cs === 'closed') {
      // "failed" never heals without an ICE restart; a fresh session is simpler.
      this.#scheduleRetry('Connection lost');
    } else if (cs === 'disconnected') {
      if (this.#badSince === null) this.#badSince = now;
      if (now - this.#badSince > DISCONNECTED_GRACE_MS) this.#scheduleRetry('Connection lost');
    } else if (!this.#connectedAt && now - this.#openedAt > CONNECT_TIMEOUT_MS) {
      this.#scheduleRetry('Could not establish the media connection');
    }
  }

  async #tick(gen) {
    this.#checkConnection();
    const session = this.#session;
    if (gen !== this.#gen || !session || this.#statsBusy) return;
    this.#statsBusy = true;
    let report;
    try {
      report = await session.pc.getStats();
    } catch {
      return;
    } finally {
      this.#statsBusy = false;
    }
    if (gen !== this.#gen) return;

    const now = performance.now();
    let frames = 0;
    let audioEnergy = null;
    let rtt = null;
    let jitter = null;
    report.forEach((s) => {
      if (s.type === 'candidate-pair' && s.nominated && typeof s.currentRoundTripTime === 'number') {
        rtt = s.currentRoundTripTime;
      }
      if (s.type !== 'inbound-rtp') return;
      const kind = s.kind ?? s.mediaType;
      if (kind === 'video') {
        frames = Math.max(frames, s.framesDecoded ?? s.framesReceived ?? 0);
        if (typeof s.jitterBufferDelay === 'number') jitter = { delay: s.jitterBufferDelay, emitted: s.jitterBufferEmittedCount ?? 0 };
      }
      if (kind === 'audio' && typeof s.totalAudioEnergy === 'number') audioEnergy = s.totalAudioEnergy;
    });
    this.#measureBehind(rtt, jitter);
    if (frames > this.#frames) {
      this.#frames = frames;
      this.#lastFrameAt = now;
      this.#attempt = 0; // frames flowing: the path is healthy, so the next drop starts at 1 s again
    }
    this.#pollAudio(audioEnergy);

    if (this.#live && this.#connectedAt) {
      const since = Math.max(this.#lastFrameAt, this.#liveSince, this.#connectedAt);
      if (now - since > NO_FRAMES_MS) this.#scheduleRetry('No video received for 5 seconds');
    }
  }

  #measureBehind(rtt, jitter) {
    if (!jitter) return;
    const emitted = jitter.emitted - this.#jitter.emitted;
    const held = emitted > 0 ? (jitter.delay - this.#jitter.delay) / emitted : null;
    this.#jitter = jitter;
    if (held === null || held < 0) return;
    this.#behindMs = Math.round(1000 * (held + (rtt ?? 0) / 2));
  }

  // Honest audio: the relay may answer with audio inactive, or send silence. Only
  // report audio once RTP is arriving (track unmuted) and, where the browser
  // reports it (energy !== null), it carries some sound.
  #pollAudio(energy) {
    const track = this.#audioTrack;
    if (!track || this.#hasAudio) return;
    if (track.readyState === 'live' && !track.muted && (energy === null || energy > 0)) this.#setAudio(true);
  }

  #setAudio(hasAudio) {
    if (hasAudio === this.#hasAudio) return;
    this.#hasAudio = hasAudio;
    this.#onAudio(hasAudio);
  }
}
