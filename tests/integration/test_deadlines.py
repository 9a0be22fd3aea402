"""Stalled peers are cut off: header, body and send deadlines; oversize bodies and parser errors in the error shape.

Raw sockets (asyncio.open_connection) play the peers no real client would be: one that never finishes
its headers, one that declares a body it never sends, one that stops reading its WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlsplit

import pytest

from relay.client import RelayClient, Spectator
from tests.conftest import API_KEY, eventually, frames_for, start_relay_process, twin_session

LIMIT = 64 * 1024  # conftest's max_body_bytes


async def raw(url: str, *, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting, so the window the relay sees is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    return await asyncio.open_connection(sock=sock)


async def closed_after(reader: asyncio.StreamReader, timeout: float) -> float:
    """Seconds until the relay closes the connection (EOF or reset), reading and dropping what it says."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionResetError:
        pass
    return loop.time() - began


async def response(reader: asyncio.StreamReader, timeout: float = 2.0) -> tuple[int, dict, dict]:
    """One HTTP response: status, headers (lower-case names), JSON body."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    return int(status_line.split()[1]), headers, json.loads(body)


def assert_error_shape(body: dict, code: str = "INVALID_REQUEST") -> None:
    assert set(body["error"]) == {"code", "message", "action", "details"} and body["error"]["code"] == code, body


async def test_partial_headers_and_silent_connections_are_closed_at_the_header_deadline(relay_factory):
    relay = await relay_factory(server={"header_timeout_seconds": 1})
    host = urlsplit(relay.url).netloc
    partial = await raw(relay.url)
    partial[1].write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
    silent = await raw(relay.url)
    waited = await asyncio.gather(closed_after(partial[0], 5), closed_after(silent[0], 5))
    assert all(0.8 <= w < 2.0 for w in waited), waited
    for _, writer in (partial, silent):
        writer.close()

    # A client that finishes its headers in time is served as ever.
    reader, writer = await raw(relay.url)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status = (await asyncio.wait_for(reader.readline(), 2)).split()[1]
    assert status == b"200"
    writer.close()


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(relay_factory):
    relay = await relay_factory()
    reader, writer = await raw(relay.url)
    # 10x the limit declared, not one byte sent: the answer may not wait for it.
    writer.write(f"POST /v1/connections HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {10 * LIMIT}\r\n\r\n".encode())
    status, headers, body = await response(reader, timeout=1.0)
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert_error_shape(body)
    assert body["error"]["details"] == {"limit_bytes": LIMIT}
    assert await closed_after(reader, 5) < 3  # and the connection, with its unread body, is let go
    writer.close()


async def test_a_body_that_never_arrives_gets_408_at_the_body_deadline(relay_factory):
    relay = await relay_factory(server={"body_timeout_seconds": 1})
    reader, writer = await raw(relay.url)
    writer.write(f"POST /v1/simulations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":".encode())
    loop = asyncio.get_running_loop()
    began = loop.time()
    status, _, body = await response(reader, timeout=5)
    assert status == 408 and 0.8 <= loop.time() - began < 2.5
    assert_error_shape(body)
    writer.close()


async def test_a_strangers_body_is_not_read_before_its_credentials_are_checked(relay_factory):
    # The whole allowed body declared and not sent, without credentials: answered 401 at once. Were
    # the body read first, each such connection would hold max_body_bytes for body_timeout_seconds.
    relay = await relay_factory(server={"body_timeout_seconds": 30})
    reader, writer = await raw(relay.url)
    writer.write(f"POST /v1/simulations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {LIMIT}\r\n\r\n{{".encode())
    status, _, body = await response(reader, timeout=2)
    assert status == 401
    assert_error_shape(body, "UNAUTHORIZED")
    writer.close()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server-to-client WebSocket frame (unmasked, not compressed): opcode and payload."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length >= 126:
        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
    return first & 0x0F, await reader.readexactly(length)


async def test_an_events_socket_that_stops_reading_is_closed_at_the_send_deadline(relay_factory):
    relay = await relay_factory(server={"send_timeout_seconds": 0.5})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        reader, writer = await raw(relay.url, rcvbuf=4096)
        writer.write(f"GET /v1/broadcasts/{b['broadcast_id']}/events?token={b['spectator_token']} HTTP/1.1\r\n"
                     "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        opcode, hello = await asyncio.wait_for(read_frame(reader), 5)
        participant_id = json.loads(hello)["participant_id"]

        # A burst it does not read: far more than the socket buffers hold (loopback's grow to a few
        # MB), fewer messages than its outbox holds (so this is the send deadline at work, not the
        # outbox overflowing).
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(200):
            broadcast.emit({"type": "prompt_applied", "prompt": "x" * 60_000, "source": "host", "mode": "host"})
        await eventually(lambda: not broadcast.orchestrator.is_present(participant_id), timeout=6,
                         what="the stalled socket cut off")
        assert loop.time() - began < 2.5

        # Reading again, it gets its backlog, then why: 1008 "too slow", then the end.
        while (frame := await asyncio.wait_for(read_frame(reader), 5))[0] != 0x8:
            pass
        payload = frame[1]
        assert (int.from_bytes(payload[:2], "big"), payload[2:]) == (1008, b"too slow")
        assert await closed_after(reader, 5) < 3
        writer.close()


async def test_spectators_keep_their_frame_rate_while_100_slowloris_connections_are_held(relay_factory):
    relay = await relay_factory(server={"header_timeout_seconds": 3}, limits={"stream_max_seconds": 30})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a harbour at dusk")
        b = conn.broadcast
        viewers = [Spectator(b["whep_url"], b["spectator_token"]) for _ in range(2)]
        for v in viewers:
            await v.join()
        peers = []
        try:
            await asyncio.gather(*(v.track.recv() for v in viewers))
            peers = await asyncio.gather(*(raw(relay.url) for _ in range(100)))
            for _, writer in peers:  # headers begun, never finished
                writer.write(b"POST /v1/connections HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            counts = await asyncio.gather(*(frames_for(v.track, 1.5) for v in viewers))
            for frames in counts:
                assert len(frames) / 1.5 >= 22, f"only {len(frames)} frames in 1.5 s"
            # ... and every one of them is let go at the header deadline.
            waited = await asyncio.gather(*(closed_after(reader, 6) for reader, _ in peers))
            assert max(waited) < 3, max(waited)
        finally:
            for _, writer in peers:
                writer.close()
            for v in viewers:
                await v.leave()


@pytest.fixture
async def served(tmp_path):
    """`relay serve` itself: the parser's answers come from its connection handler, before any middleware."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nport = 0\ndata_dir = "{tmp_path / "data"}"\n[auth]\napi_keys = ["{API_KEY}"]\n')
    proc, base = await start_relay_process(config)
    yield base
    proc.terminate()
    await proc.wait()


@pytest.mark.parametrize("headers", [
    "X-Big: " + "a" * 9000 + "\r\n",  # one header over 8 KB
    "".join(f"X-Many-{i}: 1\r\n" for i in range(200)),  # 200 headers
], ids=["header-over-8KB", "200-headers"])
async def test_headers_the_parser_refuses_are_answered_in_the_error_shape(served, headers):
    reader, writer = await raw(served)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    status, response_headers, body = await response(reader)
    assert status == 431 and response_headers["content-type"].startswith("application/json")
    assert_error_shape(body)
    writer.close()


async def test_a_malformed_request_line_is_answered_in_the_error_shape(served):
    reader, writer = await raw(served)
    writer.write(b"GET /healthz HTTP/9 9\r\nHost: x\r\n\r\n")
    status, _, body = await response(reader)
    assert status == 400
    assert_error_shape(body)
    writer.close()


def masked_frame(text: str) -> bytes:
    """One client-to-server text frame (clients must mask; a zero mask keeps the payload as is)."""
    payload = text.encode()
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def test_a_control_socket_that_sends_but_never_reads_is_closed_at_the_send_deadline(relay_factory):
    relay = await relay_factory(server={"send_timeout_seconds": 0.5})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        reader, writer = await raw(relay.url, rcvbuf=4096)
        writer.write(f"GET /v1/connections/{conn.connection_id}/control HTTP/1.1\r\n"
                     f"Host: x\r\nAuthorization: Bearer {API_KEY}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        sessions_conn = relay.sessions.connection(conn.connection_id)
        await eventually(lambda: sessions_conn.control_sockets == 1, timeout=5, what="the control socket counted")
        # Every refresh_token is answered on the socket itself: a peer that asks and never reads
        # leaves the handler's own reply waiting on it, while nothing else is sent.
        loop = asyncio.get_running_loop()
        began = loop.time()
        writer.write(masked_frame('{"type": "refresh_token"}') * 30_000)
        await eventually(lambda: sessions_conn.control_sockets == 0, timeout=10, what="the stalled socket cut off")
        assert loop.time() - began < 4  # ~1 s to take the flood in, then the deadline, then the close
        assert await closed_after(reader, 5) < 3  # its descriptor is gone too (what it never read, lost)
        writer.close()


async def test_a_signalling_socket_that_sends_but_never_reads_is_closed_at_the_send_deadline(relay_factory, http):
    # The /odyssey signalling socket answers garbage with invalid_message: a client that floods it and
    # never reads must be cut off like the control socket, not hold its handler and descriptor.
    from relay.odyssey.server import TWIN

    relay = await relay_factory(server={"send_timeout_seconds": 0.5})
    session_id, url = await twin_session(http, relay.url)
    path = url[url.index("/", len("ws://")):]
    reader, writer = await raw(relay.url, rcvbuf=4096)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    twin = relay.app[TWIN]
    await eventually(lambda: session_id in twin.live, timeout=5, what="the signalling session live")
    loop = asyncio.get_running_loop()
    began = loop.time()
    writer.write(masked_frame("not json at all") * 30_000)  # each answered invalid_message, never read
    await eventually(lambda: session_id not in twin.live, timeout=10, what="the stalled socket cut off")
    assert loop.time() - began < 6  # the flood taken in, then the deadline, then the close
    assert await closed_after(reader, 5) < 3  # its descriptor is gone too
    writer.close()
