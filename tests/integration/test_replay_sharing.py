"""Spectators can rewatch: the host's share_replay puts a signed replay link in stream_ended (off by
default), and a live broadcast offers its latest picture as the watch page's og:image."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import time
from html import escape
from urllib.parse import parse_qs, urlsplit

import av

from relay.client import RelayClient
from relay.media.recorder import StreamRecorder
from relay.web import RECORDINGS
from tests.conftest import API_KEY, eventually, frames_pass, next_of
from tests.integration.test_orchestration_api import join

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1)


async def recorded_stream(relay, conn, http, prompt: str) -> tuple[dict, dict]:
    """Start, let frames pass, end: (the events socket's stream_ended, its hello), the socket closed."""
    b = conn.broadcast
    async with http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}") as events:
        hello = await next_of(events, "hello")
        await conn.start_stream(prompt)
        await frames_pass(relay, b["broadcast_id"], 10)
        await conn.end_stream()
        return await next_of(events, "stream_ended"), hello


async def error_of(response, status: int, code: str) -> dict:
    assert response.status == status, (response.status, await response.text())
    body = await response.json()
    assert body["error"]["code"] == code and body["error"]["message"] and body["error"]["action"], body
    return body["error"]


async def finished_info(http, info_url: str) -> dict:
    """The replay page's info once the recording's files are written (just after the stream ends)."""
    box: dict = {}

    async def done() -> bool:
        async with http.get(info_url) as r:
            assert r.status == 200, await r.text()
            box.update(await r.json())
        return box["status"] not in ("recording", None)

    await eventually(done, timeout=15, what="the recording finished")
    return box


def info_url_of(replay_url: str) -> str:
    parts = urlsplit(replay_url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}/info?{parts.query}"


async def test_share_off_by_default_no_replay_url_and_links_fit_one_recording(relay_factory, http):
    relay = await relay_factory()
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        assert conn.broadcast["share_replay"] is False
        ended, _ = await recorded_stream(relay, conn, http, "a quiet harbour")
        assert "replay_url" not in ended
        private_id = ended["stream_id"]
        b = conn.broadcast
        assert relay.sessions.broadcast(b["broadcast_id"]).state()["replay_url"] is None

        # The host turns sharing on: the next stream's end carries a link to that stream only.
        async with http.patch(b["webrtc_url"], json={"share_replay": True}, headers=AUTH) as r:
            assert r.status == 200 and (await r.json())["share_replay"] is True
        ended, _ = await recorded_stream(relay, conn, http, "a busy harbour")
    shared = ended["replay_url"]
    query = urlsplit(shared).query
    # The same signature on another recording (the private one) is refused, page and files alike.
    for path in (f"/recordings/{private_id}/info", f"/v1/recordings/{private_id}/video.mp4",
                 f"/v1/recordings/{ended['stream_id']}/video.mp4"):
        async with http.get(f"{relay.url}{path}?{query}") as r:
            await error_of(r, 403, "FORBIDDEN")
    # Read-only: the link is no key to the owner's list.
    async with http.get(f"{relay.url}/v1/recordings?{query}") as r:
        await error_of(r, 401, "UNAUTHORIZED")


async def test_share_on_stream_ended_carries_a_replay_url_that_plays(relay_factory, http):
    relay = await relay_factory(recordings={"replay_link_seconds": 600})
    async with RelayClient(relay.url, API_KEY) as client, client.connect(share_replay=True) as conn:
        assert conn.broadcast["share_replay"] is True
        ended, hello = await recorded_stream(relay, conn, http, "a lighthouse in fog")
        assert hello["replay_url"] is None  # nothing ended yet
        replay_url = ended["replay_url"]
        assert urlsplit(replay_url).path == f"/recordings/{ended['stream_id']}"
        expires = int(parse_qs(urlsplit(replay_url).query)["expires"][0])
        assert abs(expires - (time.time() + 600)) < 30  # [recordings] replay_link_seconds

        # A page opened after the end learns it from hello, as the watch page's state.
        b = conn.broadcast
        async with http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}") as events:
            assert (await next_of(events, "hello"))["replay_url"] == replay_url

        async with http.get(replay_url) as r:
            assert r.status == 200 and r.content_type == "text/html"
        info = await finished_info(http, info_url_of(replay_url))
        assert info["status"] == "complete" and info["stream_id"] == ended["stream_id"]
        async with http.get(info["video_url"]) as r:
            assert r.status == 200 and r.content_type == "video/mp4"
            video = await r.read()
        with av.open(io.BytesIO(video)) as container:
            assert sum(1 for _ in container.decode(video=0)) >= 10

        # The host stops sharing: the page's state drops the link at once.
        async with http.patch(b["webrtc_url"], json={"share_replay": False}, headers=AUTH) as r:
            assert r.status == 200 and (await r.json())["share_replay"] is False
        async with http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}") as events:
            assert (await next_of(events, "hello"))["replay_url"] is None

    # An expired link: 403 in the error shape, the page's info and the files alike.
    store = relay.app[RECORDINGS]
    stale = store.signed_until(f"/recordings/{ended['stream_id']}", int(time.time()) - 1)
    async with http.get(f"{relay.url}{stale.replace('?', '/info?', 1)}") as r:
        await error_of(r, 403, "FORBIDDEN")


async def test_each_connection_on_a_channel_makes_its_own_choice(relay_factory, http):
    # A channel's broadcast outlives its hosts: one host's "share" must not carry over to the next.
    relay = await relay_factory(limits={"channel_release_seconds": 600})
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Weekly worlds")
        b = channel["broadcast"]
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        async with client.connect(channel["channel_id"], share_replay=True) as conn:
            assert conn.broadcast["share_replay"] is True
            ended, _ = await recorded_stream(relay, conn, http, "a shared harbour")
            assert ended["replay_url"]
        assert relay.sessions.broadcast(b["broadcast_id"]) is broadcast  # the same broadcast, kept

        async with client.connect(channel["channel_id"]) as conn:  # says nothing: shares nothing
            assert conn.broadcast["share_replay"] is False and broadcast.share_replay is False
            assert broadcast.state()["replay_url"] is None  # the last host's link is not this one's to offer
            ended, hello = await recorded_stream(relay, conn, http, "a private harbour")
            assert hello["replay_url"] is None and "replay_url" not in ended
            async with http.patch(b["webrtc_url"], json={"share_replay": True}, headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["share_replay"] is True

        async with client.connect(channel["channel_id"], share_replay=False) as conn:
            assert conn.broadcast["share_replay"] is False and broadcast.share_replay is False


async def shared_log(http, replay_url: str) -> tuple[dict, str]:
    """(the link's info once the recording is finished, the text its events_url serves)."""
    info = await finished_info(http, info_url_of(replay_url))
    async with http.get(info["events_url"]) as r:
        assert r.status == 200 and r.content_type == "application/x-ndjson", await r.text()
        return info, await r.text()


async def test_a_shared_link_never_serves_the_text_of_chat_the_host_cleared(relay_factory, http):
    relay = await relay_factory(limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60},
                                chat={"messages_per_second": 10, "burst": 10})
    async with RelayClient(relay.url, API_KEY) as client, client.connect(share_replay=True) as conn:
        b = conn.broadcast
        chat = f"{b['webrtc_url']}/chat/messages"
        async with http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}") as events:
            await next_of(events, "hello")
            stream_id = (await conn.start_stream("a quiet harbour"))["stream_id"]
            ana = await join(http, conn, "ana")
            sent = {}
            for text in ("keep me", "secret cleared live"):
                await ana.send(type="chat", text=text)
                sent[text] = (await ana.next("chat"))["message_id"]
            await frames_pass(relay, b["broadcast_id"], 5)
            async with http.delete(f"{chat}/{sent['secret cleared live']}", headers=AUTH) as r:
                assert r.status == 200, await r.text()
            await ana.next("chat_cleared")
            await conn.end_stream()
            replay_url = (await next_of(events, "stream_ended"))["replay_url"]
        info, text = await shared_log(http, replay_url)
        assert urlsplit(info["events_url"]).path == f"/recordings/{stream_id}/events.jsonl"
        assert "secret cleared live" not in text
        kept = [json.loads(line) for line in text.splitlines()]
        assert [e["text"] for e in kept if e["type"] == "chat"] == ["keep me"]
        # Served as a file: a reader resumes with Range, and a range past its end is a 416 in the error shape.
        async with http.get(info["events_url"], headers={"Range": "bytes=10-"}) as r:
            assert r.status == 206 and (await r.text()) == text[10:]
            assert r.headers["Content-Range"] == f"bytes 10-{len(text.encode()) - 1}/{len(text.encode())}"
        async with http.get(info["events_url"], headers={"Range": f"bytes={len(text.encode())}-"}) as r:
            await error_of(r, 416, "RANGE_NOT_SATISFIABLE")
        # A view the disk refuses to write (here: a directory in its place) is a 507, never the raw log or a 500.
        view = relay.app[RECORDINGS].path(stream_id, "events.jsonl").with_name("events.shared.jsonl")
        view.unlink()
        view.mkdir()
        async with http.get(info["events_url"]) as r:
            await error_of(r, 507, "INSUFFICIENT_STORAGE")
        assert sorted(p.name for p in view.parent.iterdir() if p.name.startswith(".")) == []  # no temp file left
        assert [e["prompt"] for e in kept if e["type"] == "stream_started"] == ["a quiet harbour"]

        # The owner's own call still reads the whole log, as recorded.
        owner = await client.request("GET", f"/v1/recordings/{stream_id}")
        async with http.get(owner["events_url"]) as r:
            assert "secret cleared live" in await r.text()
        # The link's signature opens neither the raw log nor another stream's shared one.
        query = urlsplit(info["events_url"]).query
        for path in (f"/v1/recordings/{stream_id}/events.jsonl", "/recordings/nope/events.jsonl"):
            async with http.get(f"{relay.url}{path}?{query}") as r:
                await error_of(r, 403, "FORBIDDEN")
        async with http.get(f"{relay.url}/recordings/{stream_id}/events.jsonl") as r:
            await error_of(r, 403, "FORBIDDEN")


async def test_a_message_cleared_after_its_stream_ended_leaves_that_streams_shared_log(relay_factory, http):
    # The chat history outlives a stream: the host may clear one of its messages later, even during
    # the next stream; the ended stream's log must learn it, or its link would still serve the text.
    relay = await relay_factory(limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60},
                                chat={"messages_per_second": 10, "burst": 10})
    async with RelayClient(relay.url, API_KEY) as client, client.connect(share_replay=True) as conn:
        b = conn.broadcast
        chat = f"{b['webrtc_url']}/chat/messages"
        async with http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}") as events:
            await next_of(events, "hello")
            first = (await conn.start_stream("a quiet harbour"))["stream_id"]
            ana = await join(http, conn, "ana")
            ids = {}
            for text in ("kept in the first", "secret cleared after the end", "secret cleared next stream"):
                await ana.send(type="chat", text=text)
                ids[text] = (await ana.next("chat"))["message_id"]
            await frames_pass(relay, b["broadcast_id"], 5)
            await conn.end_stream()
            replay_url = (await next_of(events, "stream_ended"))["replay_url"]
            _, text = await shared_log(http, replay_url)
            assert "secret cleared after the end" in text  # not cleared yet: the replay shows it

            async with http.delete(f"{chat}/{ids['secret cleared after the end']}", headers=AUTH) as r:
                assert r.status == 200, await r.text()
            second = (await conn.start_stream("a busy harbour"))["stream_id"]
            async with http.delete(f"{chat}/{ids['secret cleared next stream']}", headers=AUTH) as r:
                assert r.status == 200, await r.text()
            await conn.end_stream()
            second_url = (await next_of(events, "stream_ended"))["replay_url"]

        async def cleared() -> bool:
            _, text = await shared_log(http, replay_url)
            return "secret" not in text
        await eventually(cleared, timeout=10, what="the late clears in the first stream's shared log")
        _, text = await shared_log(http, replay_url)
        assert [json.loads(line)["text"] for line in text.splitlines()
                if json.loads(line)["type"] == "chat"] == ["kept in the first"]
        # The owner's log says what happened, and when: both clears, after the video's end.
        owner = await client.request("GET", f"/v1/recordings/{first}")
        async with http.get(owner["events_url"]) as r:
            raw = [json.loads(line) for line in (await r.text()).splitlines()]
        late = [e for e in raw if e["type"] == "chat_cleared"]
        assert {e["message_id"] for e in late} == {ids["secret cleared after the end"], ids["secret cleared next stream"]}
        assert all(e["after_end"] is True and e["offset_ms"] == round(owner["duration_seconds"] * 1000) for e in late)
        # The second stream never had those messages: its log has no text of them either.
        _, text = await shared_log(http, second_url)
        assert f"/recordings/{second}?" in second_url and "secret" not in text


class DiskFullRecorder(StreamRecorder):
    """The disk fills mid-stream: the recorder stops writing (its log keeps what it had)."""

    def _mux(self, data, pts, keyframe):
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_message_cleared_live_after_the_recording_failed_leaves_the_shared_log(relay_factory, http):
    # The message reached the log, then the recorder stopped writing: the live clear never reaches the
    # log through it, so the relay appends it once the recording has finished, as for a clear after the end.
    relay = await relay_factory(limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60},
                                chat={"messages_per_second": 10, "burst": 10})
    async with RelayClient(relay.url, API_KEY) as client, client.connect(share_replay=True) as conn:
        b = conn.broadcast
        async with http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}") as events:
            await next_of(events, "hello")
            stream_id = (await conn.start_stream("a quiet harbour"))["stream_id"]
            ana = await join(http, conn, "ana")
            await ana.send(type="chat", text="secret on disk")
            message_id = (await ana.next("chat"))["message_id"]

            def on_disk() -> bool:
                path = relay.app[RECORDINGS].path(stream_id, "events.jsonl")  # None until the writer made it
                return path is not None and b"secret on disk" in path.read_bytes()
            await eventually(on_disk, timeout=10, what="the message on disk")
            recorder = relay.sessions.broadcast(b["broadcast_id"]).media.recorder
            recorder.__class__ = DiskFullRecorder
            await eventually(lambda: recorder.failed, timeout=10, what="the recording failed")
            async with http.delete(f"{b['webrtc_url']}/chat/messages/{message_id}", headers=AUTH) as r:
                assert r.status == 200, await r.text()
            await conn.end_stream()
            replay_url = (await next_of(events, "stream_ended"))["replay_url"]

        async def cleared() -> bool:
            return "secret" not in (await shared_log(http, replay_url))[1]
        await eventually(cleared, timeout=10, what="the clear in the failed recording's shared log")
        owner = await client.request("GET", f"/v1/recordings/{stream_id}")
        assert owner["status"] == "failed"
        async with http.get(owner["events_url"]) as r:
            raw = [json.loads(line) for line in (await r.text()).splitlines()]
        assert [e for e in raw if e["type"] == "chat_cleared"] == [
            {"type": "chat_cleared", "offset_ms": round(owner["duration_seconds"] * 1000), "message_id": message_id,
             "after_end": True}]


async def test_share_replay_is_the_hosts_and_bounded(relay_factory, http):
    relay = await relay_factory()
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        url = b["webrtc_url"]
        async with http.patch(url, json={"share_replay": True}) as r:
            await error_of(r, 401, "UNAUTHORIZED")
        async with http.patch(url, json={"share_replay": True},
                              headers={"Authorization": f"Bearer {b['spectator_token']}"}) as r:
            await error_of(r, 403, "FORBIDDEN")
        for body in ({"share_replay": "yes"}, {"share_replay": 1}, {"title": "x" * 5000}):
            async with http.patch(url, json=body, headers=AUTH) as r:
                err = await error_of(r, 400, "INVALID_REQUEST")
                assert len(err["message"]) < 200
        async with http.post(f"{relay.url}/v1/connections", json={"share_replay": "on"}, headers=AUTH) as r:
            await error_of(r, 400, "INVALID_REQUEST")
        assert relay.sessions.broadcast(b["broadcast_id"]).share_replay is False


async def test_live_thumbnail_is_a_small_jpeg_made_at_most_once_per_period(relay_factory, http):
    relay = await relay_factory(recordings={"preview_width": 160, "thumbnail_seconds": 1})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        thumb = f"{b['webrtc_url']}/thumbnail.jpg?token={b['spectator_token']}"
        async with http.get(thumb) as r:  # nothing live yet
            await error_of(r, 404, "NOT_FOUND")
        await conn.start_stream("a red kite over hills")
        await frames_pass(relay, b["broadcast_id"], 5)
        broadcast = relay.sessions.broadcast(b["broadcast_id"])

        async def fetch(url: str = thumb) -> tuple[int, bytes, str]:
            async with http.get(url) as r:
                return r.status, await r.read(), r.content_type

        answers = await asyncio.gather(*(fetch() for _ in range(20)))
        assert {(status, ctype) for status, _, ctype in answers} == {(200, "image/jpeg")}
        assert len({body for _, body, _ in answers}) == 1
        assert broadcast.thumbnail.made == 1  # twenty asks, one decode
        jpeg = answers[0][1]
        assert jpeg[:3] == b"\xff\xd8\xff" and len(jpeg) < 64_000
        with av.open(io.BytesIO(jpeg)) as img:
            frame = next(img.decode(video=0))
        assert (frame.width, frame.height) == (160, 88)

        # Remade once the period has passed, never before.
        first_made_at = time.monotonic()
        await eventually(lambda: _made_again(fetch, broadcast), timeout=5, what="a fresh thumbnail")
        assert time.monotonic() - first_made_at > 0.5 and broadcast.thumbnail.made == 2

        # The watch page's og:image points at it, escaped like every og tag.
        async with http.get(f"{relay.url}/watch/{b['broadcast_id']}?token={b['spectator_token']}") as r:
            html = await r.text()
        assert f'<meta property="og:image" content="{escape(thumb)}">' in html
        assert 'content="summary_large_image"' in html

        for token in ("", "wrong", API_KEY + "x"):
            async with http.get(f"{b['webrtc_url']}/thumbnail.jpg?token={token}") as r:
                await error_of(r, 401, "UNAUTHORIZED")
        made = broadcast.thumbnail.made
        async with http.get(f"{relay.url}/v1/broadcasts/nope/thumbnail.jpg?token={b['spectator_token']}") as r:
            await error_of(r, 404, "NOT_FOUND")
        assert broadcast.thumbnail.made == made  # refusals cost no decode

        await conn.end_stream()
        async with http.get(thumb) as r:  # ended: no live picture
            await error_of(r, 404, "NOT_FOUND")
        async with http.get(f"{relay.url}/watch/{b['broadcast_id']}?token={b['spectator_token']}") as r:
            assert "og:image" not in await r.text()


async def _made_again(fetch, broadcast) -> bool:
    status, _, _ = await fetch()
    return status == 200 and broadcast.thumbnail.made >= 2
