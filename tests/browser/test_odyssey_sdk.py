"""The hosted world-model API's official SDK, unmodified, in real Chromium, against the relay's twin (/odyssey).

The SDK is `@odysseyml/odyssey` at the version relay/worldmodel/hosted_protocol.py follows, fetched with
`npm pack` from the npm registry (integrity checked against the pinned one) into a cache dir, never
vendored. Its ESM build (`dist/index.js`) is self-contained: its only import is a dynamic `import('ws')`
that runs only where there is no global WebSocket (Node < 22), so a browser loads it as is, no bundler.
The page and the SDK are served by a second, test-only server (another origin), so every call the SDK
makes to the relay is cross-origin, CORS included, as for a real app.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from aiohttp import web

from relay.worldmodel import hosted_protocol as protocol
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM
from tests.conftest import eventually
from tests.conftest import API_KEY

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

SDK_SPEC = f"{protocol.SDK_PACKAGE}@{protocol.SDK_VERSION}"
# `npm view @odysseyml/odyssey@1.3.1 dist.integrity`: the tarball the protocol notes were written from.
SDK_INTEGRITY = "sha512-CI59PRXr9yssyQ0RHDCKFPVRKaVROONItBcZ8SV2VmBIjdTA6oPC0iwh42r7nX5tKo92vibVheyW2thpFVLCKA=="
CACHE_DIR = Path(os.environ.get("RELAY_TEST_CACHE", Path.home() / ".cache" / "relay-tests"))
MS = 15_000


def _npm_pack(destination: str) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: cannot fetch {SDK_SPEC} (install Node.js with npm)")
    try:
        packed = subprocess.run([npm, "pack", SDK_SPEC, "--json", "--pack-destination", destination,
                                 "--fetch-retries=1", "--fetch-timeout=30000"],
                                capture_output=True, text=True, timeout=90, check=True)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm pack {SDK_SPEC} timed out: is the npm registry reachable?")
    except subprocess.CalledProcessError as exc:
        first = (exc.stderr.strip().splitlines() or ["no output"])[0]
        pytest.skip(f"npm pack {SDK_SPEC} failed (is the npm registry reachable?): {first[:200]}")
    return Path(destination) / json.loads(packed.stdout)[0]["filename"]


def sdk_module() -> Path:
    """dist/index.js of the pinned SDK: extracted before, or from the tarball .ci/run fetched into the
    cache dir, or from `npm pack` now; skips (with the reason) when npm cannot fetch it."""
    target = CACHE_DIR / f"odyssey-{protocol.SDK_VERSION}" / "index.js"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tarball = CACHE_DIR / f"odysseyml-odyssey-{protocol.SDK_VERSION}.tgz"
        if not tarball.is_file():
            tarball = _npm_pack(tmp)
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        assert integrity == SDK_INTEGRITY, f"{tarball} is not the {SDK_SPEC} tarball pinned here"
        with tarfile.open(tarball) as tar:
            source = tar.extractfile("package/dist/index.js").read()  # type: ignore[union-attr]
    # Self-contained, or the page needs an import map: no static imports at all.
    assert not re.search(rb"^\s*import\s", source, re.M), "the SDK's ESM build grew static imports"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(source)
    partial.replace(target)
    return target


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Odyssey SDK on the relay</title></head>
<body>
<video id="owner" autoplay muted playsinline width="320"></video>
<video id="spectator" autoplay muted playsinline width="320"></video>
<script type="module">
import { Odyssey } from "/sdk/odyssey.js";
window.Odyssey = Odyssey;
window.events = [];
const log = (...e) => window.events.push(e);
window.handlers = {
  onConnected: () => log("connected"),
  onStreamStarted: (id) => log("started", id),
  onInteractAcknowledged: (prompt) => log("ack", prompt),
  onBroadcastReady: (info) => { window.broadcastInfo = info; log("broadcast", info); },
  onStreamEnded: () => log("ended"),
  onStreamError: (reason, message) => log("stream_error", reason, message),
  onError: (error, fatal) => log("error", error.message, fatal),
};
// The SDK reads the API URL when a client is constructed: set it first, no trailing slash.
window.makeClient = (apiUrl, apiKey) => {
  window.__ODYSSEY_API_URL__ = apiUrl;
  return new Odyssey({ apiKey });
};
window.decoded = (id) => document.getElementById(id).getVideoPlaybackQuality().totalVideoFrames;
window.meanColor = (id) => {
  const canvas = Object.assign(document.createElement("canvas"), { width: 32, height: 18 });
  const g = canvas.getContext("2d", { willReadFrequently: true });
  g.drawImage(document.getElementById(id), 0, 0, 32, 18);
  const d = g.getImageData(0, 0, 32, 18).data;
  const sum = [0, 0, 0];
  for (let i = 0; i < d.length; i += 4) { sum[0] += d[i]; sum[1] += d[i + 1]; sum[2] += d[i + 2]; }
  return sum.map((v) => v / (d.length / 4));
};
window.ready = true;
</script>
</body></html>
"""


@pytest.fixture
async def page_origin(aiohttp_server):
    """A test-only server (another origin than the relay) with the page and the SDK's ESM build."""
    sdk = sdk_module()
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def module(request: web.Request) -> web.FileResponse:
        return web.FileResponse(sdk, headers={"Content-Type": "text/javascript"})

    app.router.add_get("/", page)
    app.router.add_get("/sdk/odyssey.js", module)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


async def test_the_unmodified_sdk_streams_interacts_broadcasts_and_disconnects(relay_factory, page_origin, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 30, "streamers": 2,
                                        "concurrent_streams": 1})
    api_url = relay.url + "/odyssey"
    assert page_origin.split("/")[2] != relay.url.split("/")[2]  # cross-origin: CORS is exercised
    page = await open_page(page_origin)
    await page.wait_for_function("window.ready === true", timeout=MS)

    # A wrong key: the SDK's own message for a 401 from /auth/token.
    message = await page.evaluate("""async ([api]) => {
        try { await makeClient(api, "not-a-key").connect(); return "connected?!"; }
        catch (e) { return e.message; } }""", [api_url])
    assert message == "Invalid API key"

    # connect(): token, regions, session request, session token, /config, socket, offer/answer, channels.
    await page.evaluate("""async ([api, key]) => {
        window.client = makeClient(api, key);
        const stream = await client.connect(handlers);
        document.getElementById("owner").srcObject = stream;
        return stream.getVideoTracks().length; }""", [api_url, API_KEY])
    assert await page.evaluate("client.status") == "connected"
    (conn,) = relay.sessions.connections.values()
    assert conn.control_sockets == 1 and relay.sessions.streamers_free == 1

    stream_id = await page.evaluate("""client.startStream({ prompt: "a calm ocean at sunset", portrait: false,
                                                          broadcast: true })""")
    stream = relay.sessions.stream(stream_id)  # the id the SDK got is the core's stream
    assert stream.live and stream.prompt == "a calm ocean at sunset" and not stream.portrait
    await page.wait_for_function("decoded('owner') > 5", timeout=MS)  # H.264 frames play in the page
    assert await page.evaluate("document.getElementById('owner').videoWidth") == 320

    # A second stream for the same key while this one is live: the SDK's ConcurrentLimitReachedError.
    name = await page.evaluate("""async ([api, key]) => {
        try { await makeClient(api, key).connect(); return "connected?!"; }
        catch (e) { return e.name + ": " + (e.details && e.details.limit); } }""", [api_url, API_KEY])
    assert name == "ConcurrentLimitReachedError: 1"
    assert relay.sessions.streamers_free == 1  # refused before a streamer was reserved

    # onBroadcastReady -> a spectator with the SDK's own WHEP client, on the relay's WHEP routes.
    await page.wait_for_function("window.broadcastInfo !== undefined", timeout=MS)
    info = await page.evaluate("window.broadcastInfo")
    assert info["webrtcUrl"] == f"{relay.url}/v1/broadcasts/{conn.broadcast.broadcast_id}"
    await page.evaluate("""async () => {
        const { webrtcUrl, spectatorToken } = window.broadcastInfo;
        window.spectator = await Odyssey.connectToStream(webrtcUrl, spectatorToken);
        document.getElementById("spectator").srcObject = spectator.stream; }""")
    await page.wait_for_function("decoded('spectator') > 5", timeout=MS)
    assert len(conn.broadcast.spectators) == 1

    # interact(): acknowledged with the applied prompt, and the picture changes.
    before = await page.evaluate("meanColor('owner')")
    acknowledged = await page.evaluate("client.interact({ prompt: 'neon night over a lava desert' })")
    assert acknowledged == "neon night over a lava desert"
    assert stream.last_applied_prompt == "neon night over a lava desert"
    await page.wait_for_function(
        """(before) => meanColor('owner').reduce((s, v, i) => s + Math.abs(v - before[i]), 0) > 30""",
        arg=before, timeout=MS)

    await page.evaluate("client.endStream()")
    assert not stream.live and stream.end_reason == "ended"
    await page.evaluate("spectator.disconnect()")
    await eventually(lambda: not conn.broadcast.spectators, what="the spectator's WHEP DELETE")
    await page.evaluate("client.disconnect()")
    await eventually(lambda: relay.sessions.streamers_free == 2, what="disconnect freeing the streamer")
    assert relay.sessions.connections == {}

    events = await page.evaluate("window.events")
    kinds = [e[0] for e in events]
    assert ["connected", "started", "broadcast", "ack", "ended"] == [k for k in kinds
                                                                     if k in ("connected", "started", "broadcast",
                                                                              "ack", "ended")]
    assert ["started", stream_id] in events and "stream_error" not in kinds
