"""Storage under pressure: replay links that keep their expiry, Range answers, a bounded job store, a full disk."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from relay.api.common import RECORDINGS
from relay.recordings import owner_id
from tests.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
VIDEO = bytes(range(256)) * 40  # 10,240 bytes: what is served is what is on disk, whatever it holds


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def seed_recording(data_dir, stream_id: str = "a" * 32) -> str:
    """A finished recording as the recorder leaves it (metadata and video), without running a stream."""
    directory = data_dir / "recordings" / stream_id
    directory.mkdir(parents=True)
    (directory / "video.mp4").write_bytes(VIDEO)
    now = time.time()
    (directory / "metadata.json").write_text(json.dumps({
        "stream_id": stream_id, "owner": owner_id(API_KEY), "width": 320, "height": 176, "fps": 25,
        "started_at": now - 10, "ended_at": now - 5, "duration_seconds": 5.0, "frame_count": 125,
        "status": "complete", "error": None}))
    return stream_id


def expiry(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["expires"][0])


# ------------------------------------------------------------------------------ replay links


async def test_a_replay_link_hands_on_links_that_expire_with_it(relay_factory, tmp_path, http):
    relay = await relay_factory()
    stream_id = seed_recording(tmp_path / "data")
    store = relay.app[RECORDINGS]
    # A link minted 50 minutes ago: ten minutes left.
    leaked = store.signed_url(f"/recordings/{stream_id}", now=time.time() - 3000)
    async with http.get(f"{relay.url}{leaked.replace(f'/recordings/{stream_id}', f'/recordings/{stream_id}/info')}") as r:
        assert r.status == 200
        info = await r.json()
    for field in ("replay_url", "video_url", "events_url", "thumbnail_url", "preview_url"):
        assert expiry(info[field]) == expiry(leaked), field  # not renewed for another hour
    # Following its own replay_url again and again never moves the expiry either.
    again = urlsplit(info["replay_url"])
    async with http.get(f"{relay.url}{again.path}/info?{again.query}") as r:
        assert expiry((await r.json())["replay_url"]) == expiry(leaked)
    # Once it has expired, the info call and the files it named are refused.
    gone = store.signed_url(f"/recordings/{stream_id}", now=time.time() - 3601)
    async with http.get(f"{relay.url}/recordings/{stream_id}/info?{urlsplit(gone).query}") as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"
    # Only the owner's authenticated GET mints fresh links (an hour).
    async with http.get(f"{relay.url}/v1/recordings/{stream_id}", headers=AUTH) as r:
        fresh = await r.json()
    assert expiry(fresh["replay_url"]) >= time.time() + 3500


# ------------------------------------------------------------------------------------ Range


async def test_one_satisfiable_range_is_served_as_206(relay_factory, tmp_path, http):
    relay = await relay_factory()
    stream_id = seed_recording(tmp_path / "data")
    url = relay.url + relay.app[RECORDINGS].signed_url(f"/v1/recordings/{stream_id}/video.mp4")
    size = len(VIDEO)
    for header, first, last in (("bytes=100-199", 100, 199), ("bytes=10000-", 10000, size - 1),
                                ("bytes=-40", size - 40, size - 1), ("bytes=10200-99999", 10200, size - 1)):
        async with http.get(url, headers={"Range": header}) as r:
            assert r.status == 206, header
            assert r.headers["Content-Range"] == f"bytes {first}-{last}/{size}", header
            assert await r.read() == VIDEO[first:last + 1], header
    async with http.get(url) as r:
        assert r.status == 200 and await r.read() == VIDEO


@pytest.mark.parametrize("header", [
    "bytes=-0",  # an empty suffix: no bytes, never the whole file as 206
    f"bytes={len(VIDEO)}-",  # starts at the end
    "bytes=99999-100000",  # past the end
    "bytes=0-9,20-29",  # several ranges
    "bytes=0-9, 20-29",
    "bytes=200-100",  # ends before it starts
    "bytes=-",
    "bytes=abc",
    "items=0-9",
    "bytes=0x10-",
    "bytes=\u0663-",  # a non-ASCII digit
])
async def test_an_unsatisfiable_or_malformed_range_is_416_in_the_error_shape(relay_factory, tmp_path, http, header):
    relay = await relay_factory()
    stream_id = seed_recording(tmp_path / "data")
    url = relay.url + relay.app[RECORDINGS].signed_url(f"/v1/recordings/{stream_id}/video.mp4")
    async with http.get(url, headers={"Range": header}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{len(VIDEO)}"
        body = await r.json()
    assert body["error"]["code"] == "RANGE_NOT_SATISFIABLE"
    assert body["error"]["details"] == {"size": len(VIDEO)}
    assert set(body["error"]) == {"code", "message", "action", "details"}
