"""Chromium as a WHIP publisher, the most common one: a page draws a moving canvas, captures it
(`captureStream`) and publishes it to a kind = "whip" connection with its own fetch; a real aiortc
spectator of the broadcast receives the picture at rate, and it moves.

The page is served by the test from its own origin, not by the relay: a publisher page is the
publisher's (a world model's front end, a streaming tool), and a page on another origin is what
the relay's CORS must let through (the preflight of a POST with Authorization, Location exposed).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from aiohttp import web

from relay.client import RelayClient, Spectator
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM
from tests.conftest import API_KEY, eventually, frames_for, mean_rgb

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

FPS = 25
WINDOW = 2.0  # seconds of the broadcast a spectator counts (at >= half of 25 fps, 25 frames prove the rate)
LONG = {"stream_max_seconds": 30, "idle_timeout_seconds": 60}

PAGE = """<!doctype html>
<title>canvas publisher</title>
<canvas id="c" width="320" height="176"></canvas>
<script>
let pc = null, session = null;
// A hue that cycles and a square that slides: every frame differs from the one before.
function draw() {
  const ctx = document.getElementById('c').getContext('2d');
  let t = 0;
  setInterval(() => {
    t += 1;
    ctx.fillStyle = `hsl(${(t * 9) % 360}, 80%, 50%)`;
    ctx.fillRect(0, 0, 320, 176);
    ctx.fillStyle = '#fff';
    ctx.fillRect((t * 4) % 280, 68, 40, 40);
  }, 1000 / %(fps)d);
}
// The codec asked for first, then (unless `only`) the browser's others: the offer says what it prefers.
function prefer(transceiver, codec, only) {
  const all = RTCRtpSender.getCapabilities('video').codecs;
  const first = all.filter(c => c.mimeType === 'video/' + codec && !/packetization-mode=0/.test(c.sdpFmtpLine || ''));
  transceiver.setCodecPreferences(only ? first : [...first, ...all.filter(c => !first.includes(c))]);
}
async function publish(whipUrl, token, codec, only) {
  draw();
  const track = document.getElementById('c').captureStream(%(fps)d).getVideoTracks()[0];
  pc = new RTCPeerConnection();
  const transceiver = pc.addTransceiver(track, {direction: 'sendonly'});
  if (codec) prefer(transceiver, codec, only);  // none: the browser's own offer (Chromium: VP8 first)
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== 'complete') {  // one offer with every candidate: no PATCH needed
    await new Promise(done => pc.addEventListener('icegatheringstatechange',
      () => pc.iceGatheringState === 'complete' && done()));
  }
  const response = await fetch(whipUrl, {
    method: 'POST', body: pc.localDescription.sdp,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + token},
  });
  if (response.status !== 201) return {status: response.status, body: await response.text()};
  session = new URL(response.headers.get('Location'), whipUrl).href;
  await pc.setRemoteDescription({type: 'answer', sdp: await response.text()});
  return {status: 201, location: session};
}
async function sentCodec() {
  for (const report of (await pc.getStats()).values()) {
    if (report.type === 'outbound-rtp' && report.kind === 'video' && report.codecId) {
      return (await pc.getStats()).get(report.codecId).mimeType;
    }
  }
  return null;
}
async function unpublish(token) {
  const response = await fetch(session, {method: 'DELETE', headers: {'Authorization': 'Bearer ' + token}});
  pc.close();
  return response.status;
}
</script>
""".replace("%(fps)d", str(FPS))


async def serve_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


@pytest.fixture
async def page_url(aiohttp_server) -> str:
    app = web.Application()
    app.router.add_get("/publish.html", serve_page)
    server = await aiohttp_server(app)
    return str(server.make_url("/publish.html"))


async def publishers_by_path(http, relay_url: str) -> dict[str, float]:
    async with http.get(f"{relay_url}/metrics") as response:
        text = await response.text()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'relay_whip_publishers\{path="(\w+)"\} (\S+)', text)}


# A browser that offers H.264 alone, or its own default offer (VP8 first, H.264 among the rest), has H.264
# chosen and forwarded as it is; one that offers VP8 alone has it decoded and encoded once.
@pytest.mark.parametrize("codec, only, sent, path", [
    pytest.param("H264", True, "H264", "passthrough", id="H264-only"),
    pytest.param(None, False, "H264", "passthrough", id="browser-default"),
    pytest.param("VP8", True, "VP8", "transcode", id="VP8-only"),
])
async def test_a_canvas_published_from_chromium_reaches_a_spectator_at_rate(codec, only, sent, path, relay_factory,
                                                                           open_page, page_url, http):
    relay = await relay_factory(world_model={"kind": "whip"}, limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        assert conn.whip_url and conn.publish_token
        before = await publishers_by_path(http, relay.url)  # the gauge is the process's, shared by tests
        page = await open_page(page_url)
        published = await page.evaluate("([url, token, codec, only]) => publish(url, token, codec, only)",
                                        [conn.whip_url, conn.publish_token, codec, only])
        assert published["status"] == 201, published
        await page.wait_for_function("pc.connectionState === 'connected'", timeout=15_000)
        sending = await page.wait_for_function("async () => await sentCodec()", timeout=10_000)
        assert await sending.json_value() == f"video/{sent}"

        async def path_taken() -> bool:  # the relay decides at the publisher's first keyframe
            return (await publishers_by_path(http, relay.url)).get(path, 0) == before.get(path, 0) + 1

        await eventually(path_taken, what=f"the {path} path in /metrics")

        await conn.start_stream("a canvas from a browser")
        async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"], audio=False) as viewer:
            await viewer.track.recv()  # the first picture; then count a window of them
            frames = await frames_for(viewer.track, WINDOW)
        assert len(frames) >= 0.5 * FPS * WINDOW, f"{len(frames)} frames in {WINDOW} s of a {FPS} fps canvas"
        colours = {tuple(np.round(mean_rgb(frame), -1)) for frame in frames}
        assert len(colours) >= 5, f"the picture does not move: {colours}"

        assert await page.evaluate("token => unpublish(token)", conn.publish_token) in (200, 204)
