// resume.js: a participant's resume token on the watch page.
//
// hello hands one out; it is kept per tab (sessionStorage) and per broadcast and presented on every
// reconnect, so a participant's identity survives a dropped socket and a reload.

export class ResumeToken {
  constructor(broadcastId) {
    this.key = `relay.resume.${broadcastId}`;
  }

  value() {
    try {
      return sessionStorage.getItem(this.key) ?? '';
    } catch {
      return '';
    }
  }

  /** Keep `token`; '' forgets it (the next socket is someone new). */
  keep(token) {
    try {
      if (token) sessionStorage.setItem(this.key, token);
      else sessionStorage.removeItem(this.key);
    } catch {
      // storage disabled: each socket is a new participant, as before
    }
  }
}
