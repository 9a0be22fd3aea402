// hostview.js: how the host console says things: why a stream ended in plain words, ids shown
// short with the whole one copyable, errors a host can act on, and the control room's figures.
// Like ui.js, nothing here parses HTML: every value becomes textContent.

import { HttpError, errorText } from '/static/whep.js';

const $ = (id) => document.getElementById(id);

// Why a stream ended, as the host reads it.
const END_REASONS = {
  ended: 'ended',
  duration_limit: 'ended: it reached the time limit',
  upstream_error: 'ended: the world model failed',
  disconnected: 'ended: the connection closed',
};

export function endedText(reason) {
  return END_REASONS[reason] ?? `ended: ${String(reason).replaceAll('_', ' ')}`;
}

/** An id as people read it: its first 8 characters, the whole one in the title and copied on click. */
export function showId(target, id) {
  target.replaceChildren();
  if (!id) return;
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'id-chip';
  button.textContent = short(id);
  button.title = `${id} (click to copy)`;
  // The name starts with the words shown (WCAG 2.5.3, label in name), then says what a click does.
  button.setAttribute('aria-label', `${button.textContent}: copy the whole id`);
  button.addEventListener('click', async () => {
    const ok = await copyText(id);
    button.dataset.copied = ok ? 'yes' : 'no';
    setTimeout(() => delete button.dataset.copied, 1500);
  });
  target.append(button);
}

export const short = (id) => (id && id.length > 10 ? `${id.slice(0, 8)}…` : id || '');

export function formatSeconds(total) {
  const s = Math.max(0, Math.ceil(total));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

export async function copyText(text) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    // navigator.clipboard needs a secure context (https or localhost): fall back.
    const ta = document.createElement('textarea');
    ta.value = text;
    ta.setAttribute('readonly', '');
    ta.style.position = 'fixed';
    ta.style.opacity = '0';
    document.body.append(ta);
    ta.select();
    try {
      ok = document.execCommand('copy');
    } catch {
      ok = false;
    }
    ta.remove();
  }
  return ok;
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

/** The relay's answer to {type: 'status'}: who is watching, who takes part, how the stream is doing. */
export function showRoom(msg) {
  const health = $('room-health');
  const webrtc = Number(msg.viewers?.webrtc) || 0;
  const hls = Number(msg.viewers?.hls) || 0;
  $('room-viewers').textContent = `${webrtc + hls} (${webrtc} live · ${hls} over HLS)`;
  $('room-participants').textContent = plural(Number(msg.participants) || 0, 'person', 'people');
  const s = msg.stream;
  if (!s) health.textContent = 'no stream live';
  else if (s.fps === null) health.textContent = 'measuring…';
  else {
    health.textContent = `${s.fps} fps · ${(s.bitrate_kbps / 1000).toFixed(1)} Mbps · `
      + `${plural(s.keyframes_forced, 'keyframe', 'keyframes')} forced`;
  }
  health.dataset.state = s && s.fps !== null && s.fps < 15 ? 'warn' : '';
  $('room').hidden = false;
}

/** What a host reads for a failed call: plain words for the usual causes, else the relay's. */
export function hostErrorText(err) {
  if (err?.plain) return err.message; // the console's own words (channels.js: a missing title)
  if (err instanceof HttpError && err.status === 401) {
    return 'The relay did not accept this API key. Check that you pasted all of it, then try again.';
  }
  if (err instanceof HttpError && err.status === 403) return 'This API key may not do that.';
  return errorText(err);
}

/** One line of the console's log (as text: lines carry user prompts), kept to the newest `max`. */
export function appendLog(list, text, kind, max) {
  const li = document.createElement('li');
  if (kind) li.dataset.kind = kind;
  const time = document.createElement('time');
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString();
  li.append(time, document.createTextNode(text));
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 24;
  list.append(li);
  while (list.childElementCount > max) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}
