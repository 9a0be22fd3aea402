// tabstore.js: what the host console keeps for its tab (sessionStorage: gone when the tab
// closes, never shared with another tab): the API key, and the open connection, so that a
// reloaded console re-attaches to it (within the relay's idle timeout) instead of ending the
// broadcast. Storage may be off: then a reload simply starts over.

const KEY_STORAGE = 'relay.apiKey';
const CONN_STORAGE = 'relay.connection'; // {id, clientToken, tokenLifeMs, tokenExpiresAt, expiresAt, broadcast}
const CHANNEL_STORAGE = 'relay.channel';   // the channel_id the picker had chosen ('' for none)
const HISTORY_STORAGE = 'relay.history';   // "Streams this session": [{id, prompt, reason}], newest first
const HISTORY_KEPT = 50;

function read(name) {
  try {
    return sessionStorage.getItem(name);
  } catch {
    return null;
  }
}

function write(name, value) {
  try {
    if (value) sessionStorage.setItem(name, value);
    else sessionStorage.removeItem(name);
  } catch {
    // storage off: nothing kept
  }
}

export const keptKey = () => read(KEY_STORAGE) ?? '';
export const keepKey = (key) => write(KEY_STORAGE, key);
export const keptChannel = () => read(CHANNEL_STORAGE) ?? '';
export const keepChannel = (channelId) => write(CHANNEL_STORAGE, channelId);

export function keepConnection(c) {
  const { id, clientToken, tokenLifeMs, tokenExpiresAt, expiresAt, broadcast } = c;
  write(CONN_STORAGE, JSON.stringify({ id, clientToken, tokenLifeMs, tokenExpiresAt, expiresAt, broadcast }));
}

export const forgetConnection = () => write(CONN_STORAGE, '');

/** This tab's connection, if one is kept and its client token can still open the control socket. */
export function keptConnection() {
  try {
    const saved = JSON.parse(read(CONN_STORAGE) ?? 'null');
    if (saved && typeof saved.id === 'string' && typeof saved.clientToken === 'string'
      && Number(saved.tokenExpiresAt) > Date.now()) return saved;
  } catch {
    // unreadable: start over
  }
  forgetConnection();
  return null;
}

export const keepHistory = (rows) => write(HISTORY_STORAGE, JSON.stringify(rows.slice(0, HISTORY_KEPT)));

/** The streams this tab has run, newest first, as keepHistory() left them. */
export function keptHistory() {
  try {
    const rows = JSON.parse(read(HISTORY_STORAGE) ?? '[]');
    if (Array.isArray(rows)) return rows.filter((r) => r && typeof r.id === 'string').slice(0, HISTORY_KEPT);
  } catch {
    // unreadable: start over
  }
  return [];
}
