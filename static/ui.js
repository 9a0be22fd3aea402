// ui.js: small DOM helpers shared by the watch page, the host console and the replay page.
// Nothing here parses HTML: user text (prompts, names) only ever becomes textContent.

/** document.createElement with text content, attributes and children; never parses HTML. */
export function el(tag, { className = '', text = null, attrs = {}, dataset = {} } = {}, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null && text !== undefined) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}

/** "m:ss" for a number of milliseconds (rounded up, so a countdown never shows 0:00 early). */
export function clock(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

/** A settings number as people write it: 5, 2.5. */
export function seconds(n) {
  const v = Number(n);
  if (!Number.isFinite(v)) return '';
  return Number.isInteger(v) ? `${v}` : `${Math.round(v * 10) / 10}`;
}

/**
 * A deadline from the relay's wall clock (`ends_at`), kept on this browser's clock. A phone's
 * clock may be off by minutes, so the remaining time is capped at the setting's full length.
 */
export class Deadline {
  #key = null;
  #at = 0;

  update(endsAt, maxSeconds) {
    if (!endsAt) {
      this.#key = null;
      return;
    }
    if (endsAt === this.#key) return;
    this.#key = endsAt;
    const now = Date.now();
    const parsed = Date.parse(endsAt);
    let left = Number.isFinite(parsed) ? parsed - now : 0;
    const cap = Number(maxSeconds) * 1000;
    if (Number.isFinite(cap) && cap > 0) left = Math.min(left, cap);
    this.#at = now + Math.max(0, left);
  }

  get active() {
    return this.#key !== null;
  }

  get left() {
    return this.#key === null ? 0 : Math.max(0, this.#at - Date.now());
  }
}

/**
 * Makes `list`'s children match `items`, reusing each item's element by key, so a row's
 * buttons survive a state update (a click isn't lost to a re-render between press and release).
 * `create(item)` builds a row; `update(row, item)` fills it. Returns the rows by key.
 */
export function syncList(list, items, keyOf, create, update, rows = new Map()) {
  const seen = new Set();
  const ordered = items.map((item) => {
    const key = keyOf(item);
    seen.add(key);
    let row = rows.get(key);
    if (!row) {
      row = create(item);
      rows.set(key, row);
    }
    update(row, item);
    return row;
  });
  for (const key of [...rows.keys()]) if (!seen.has(key)) rows.delete(key);
  const current = [...list.children];
  if (current.length !== ordered.length || current.some((node, i) => node !== ordered[i])) list.replaceChildren(...ordered);
  return rows;
}
