// channels.js: the host console's channel picker, in the Connection card. A channel is a watch link
// that lasts (POST /v1/channels): the host picks one of the key's channels, or names a new one
// (title, optional host name), and Connect opens the connection on it, so the link shared before
// the event stays the same across connections, reloads and relay restarts. "None" keeps the old
// way: each connection a broadcast (and a watch link) of its own.

import { keepChannel, keptChannel } from '/static/tabstore.js';
import { HttpError, errorText, fetchJson } from '/static/whep.js';

const NEW = 'new'; // the option that shows the new channel's fields

export class ChannelPicker {
  #key;
  #log;
  #loadedFor = null; // the key the options were listed with

  /** key() is the API key to ask with; log(text, kind) is the console's log. */
  constructor({ key, log }) {
    this.#key = key;
    this.#log = log;
    const $ = (id) => document.getElementById(id);
    this.select = $('channel');
    this.form = $('channel-new');
    this.title = $('channel-title');
    this.hostName = $('channel-host');
    this.select.addEventListener('change', () => {
      this.form.hidden = this.select.value !== NEW;
      if (this.select.value !== NEW) keepChannel(this.select.value);
      else this.title.focus();
    });
  }

  set disabled(off) {
    for (const field of [this.select, this.title, this.hostName]) field.disabled = off;
  }

  /** The key's channels as options (titles as text), keeping the choice this tab made before. */
  async refresh() {
    const key = this.#key();
    if (!key || key === this.#loadedFor) return;
    let channels;
    try {
      channels = (await fetchJson('/v1/channels', { headers: { Authorization: `Bearer ${key}` } })).channels;
    } catch (err) {
      // A wrong key is said by Connect; anything else is worth a line.
      if (!(err instanceof HttpError && err.status === 401)) this.#log(`Channels: ${errorText(err)}`, 'error');
      return;
    }
    this.#loadedFor = key;
    const wanted = this.select.value || keptChannel(); // a choice made while the list loaded stands
    const options = [new Option('None: a new watch link for each connection', '')];
    for (const c of channels) options.push(new Option(c.host_name ? `${c.title} (${c.host_name})` : c.title, c.channel_id));
    options.push(new Option('New channel…', NEW));
    this.select.replaceChildren(...options);
    this.select.value = wanted === NEW || channels.some((c) => c.channel_id === wanted) ? wanted : '';
    this.form.hidden = this.select.value !== NEW;
  }

  /** What Connect sends: the chosen channel (made first when it is a new one); null when none could be made. */
  async connectBody() {
    if (this.select.value !== NEW) return this.select.value ? { channel_id: this.select.value } : {};
    const title = this.title.value.trim();
    if (!title) {
      setTimeout(() => this.title.focus(), 0); // once the console has enabled the fields again
      throw Object.assign(new Error('Give the new channel a title (or choose "None").'), { plain: true });
    }
    const hostName = this.hostName.value.trim();
    const channel = await fetchJson('/v1/channels', {
      method: 'POST',
      headers: { Authorization: `Bearer ${this.#key()}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(hostName ? { title, host_name: hostName } : { title }),
    });
    this.#log(`Channel "${channel.title}" created: its watch link lasts across connections.`);
    keepChannel(channel.channel_id);
    this.#loadedFor = null;
    this.select.value = '';
    await this.refresh();
    this.title.value = '';
    return { channel_id: channel.channel_id };
  }
}
