"""The WHEP edge cascade on real parts: two relays on loopback (A the origin with a live stream, B an
edge for it through an EdgeManager), real aiortc spectators at B, the origin's own WHEP endpoint."""

from __future__ import annotations

import asyncio
import gc
import threading

import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection

from relay.api.app import create_app
from relay.client import RelayAPIError, RelayClient, Spectator
from relay.cluster.directory import Origin
from relay.cluster.edge import EdgeManager
from relay.errors import cluster_unavailable
from relay.web import EDGES, IS_NODE, SESSIONS
from tests.conftest import API_KEY, eventually, frames_for, make_settings, mean_rgb

NODE_AUTHORIZATION = "Node test-cluster-secret"
LINGER = 1.0
HEARTBEAT = 0.2  # how often an edge asks the directory whether its feeds' origins still live


def is_node(request: web.Request) -> bool:
    return request.headers.get("Authorization") == NODE_AUTHORIZATION


async def start(aiohttp_server, tmp_path, name: str, origins: dict[str, Origin] | None = None, *,
                origin_of=None, **sections):
    settings = make_settings(tmp_path / name, cluster={"edge_linger_seconds": LINGER, "heartbeat_seconds": HEARTBEAT},
                             limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60}, **sections)
    app = create_app(settings)
    app[IS_NODE] = is_node
    edges = None
    if origins is not None:
        async def origin_of(broadcast_id: str) -> Origin | None:
            return origins.get(broadcast_id)
    if origin_of is not None:
        edges = app[EDGES] = EdgeManager(settings, origin_of, lambda: NODE_AUTHORIZATION)
    server = await aiohttp_server(app)
    return app, str(server.make_url("")).rstrip("/"), edges


@pytest.fixture
async def cluster(aiohttp_server, tmp_path):
    """(origin app, origin URL, edge app, edge URL, edges, host connection, origins table)."""
    origin_app, origin_url, _ = await start(aiohttp_server, tmp_path, "a")
    origins: dict[str, Origin] = {}
    edge_app, edge_url, edges = await start(aiohttp_server, tmp_path, "b", origins)
    async with RelayClient(origin_url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        origins[b["broadcast_id"]] = Origin("a", origin_url, b["spectator_token"])
        yield origin_app, origin_url, edge_app, edge_url, edges, conn
        await edges.close()


def edge_whep(edge_url: str, broadcast: dict) -> str:
    return f"{edge_url}/v1/broadcasts/{broadcast['broadcast_id']}/whep"


def origin_peers(origin_app, broadcast_id: str):
    return origin_app[SESSIONS].broadcast(broadcast_id).spectators


async def test_edge_serves_spectators_from_one_uncounted_origin_peer(cluster):
    origin_app, origin_url, edge_app, edge_url, edges, conn = cluster
    b = conn.broadcast
    viewers = [Spectator(edge_whep(edge_url, b), b["spectator_token"]) for _ in range(3)]
    try:
        for v in viewers:
            await v.join()
        await asyncio.gather(*(asyncio.wait_for(v.track.recv(), 10) for v in viewers))
        counts = await asyncio.gather(*(frames_for(v.track, 2.0) for v in viewers))
        for frames in counts:
            assert len(frames) / 2.0 >= 22, f"only {len(frames)} frames in 2 s through the edge"
            assert (frames[-1].width, frames[-1].height) == (320, 176)

        # The origin holds ONE peer for the edge, however many spectators there: uncounted.
        peers = origin_peers(origin_app, b["broadcast_id"])
        assert len(peers) == 1 and not next(iter(peers.values())).counted
        assert peers.viewers == 0
        async with RelayClient(origin_url, API_KEY) as client:
            assert (await client.get_stream(conn.stream_id))["spectators"] == 0
        edge = edges.edges[b["broadcast_id"]]
        assert edge.spectators.viewers == 3
        assert edge.media.fanout.outputs == 3  # packetized once at the edge, for its three peers
        # Three joiners' keyframe requests went upstream as few PLIs (coalesced), and nothing was lost.
        assert edge.feed.plis_sent <= 3 and edge.feed.frames >= max(len(frames) for frames in counts)
        assert edge.feed._depacketizer.dropped == 0

        # A prompt at the origin changes the picture seen through the edge.
        before = mean_rgb(counts[0][-1])
        drift = np.abs(mean_rgb(counts[0][0]) - before).sum()
        await conn.interact("neon night over a lava desert")
        changed = 0.0
        for _ in range(75):
            changed = np.abs(mean_rgb(await asyncio.wait_for(viewers[0].track.recv(), 5)) - before).sum()
            if changed > max(30.0, 4 * drift):
                break
        assert changed > max(30.0, 4 * drift), (changed, drift)
    finally:
        for v in viewers:
            await v.leave()


async def test_wrong_token_at_the_edge_is_401_and_unknown_broadcast_404(cluster, http):
    origin_app, origin_url, edge_app, edge_url, edges, conn = cluster
    b = conn.broadcast
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        with pytest.raises(RelayAPIError) as refused:
            async with Spectator(edge_whep(edge_url, b), "wrong-token"):
                pass
        assert refused.value.status == 401 and refused.value.code == "UNAUTHORIZED"
        async with http.post(f"{edge_url}/v1/broadcasts/nope/whep", data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp",
                                      "Authorization": f"Bearer {b['spectator_token']}"}) as r:
            assert r.status == 404
        assert not edges.edges  # neither opened a feed from the origin
        assert len(origin_peers(origin_app, b["broadcast_id"])) == 0
    finally:
        await pc.close()


async def test_a_session_call_at_the_edge_rechecks_its_token_as_the_origin_does(cluster, http):
    # A stranger who guesses (or is handed) a session URL without its token gets 401/404, never a teardown.
    origin_app, origin_url, edge_app, edge_url, edges, conn = cluster
    b = conn.broadcast
    async with Spectator(edge_whep(edge_url, b), b["spectator_token"]) as viewer:
        session_id = viewer.location.rsplit("/", 1)[1]
        spectators = edges.edges[b["broadcast_id"]].spectators
        wrong = {"Authorization": "Bearer wrong-token"}
        fragment = {"Content-Type": "application/trickle-ice-sdpfrag"}
        async with http.patch(viewer.location, data="a=end-of-candidates\r\n", headers={**wrong, **fragment}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"
        async with http.delete(viewer.location, headers=wrong) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"
        async with http.delete(viewer.location, params={"token": "wrong-token"}) as r:
            assert r.status == 401
        assert session_id in spectators  # still watching
        right = {"Authorization": f"Bearer {b['spectator_token']}"}
        async with http.delete(viewer.location[:-len(session_id)] + "0" * 32, headers=right) as r:
            assert r.status == 404  # no such session
        async with http.delete(f"{edge_url}/v1/broadcasts/nope/whep/{session_id}", headers=right) as r:
            assert r.status == 404  # no such broadcast here
        async with http.patch(viewer.location, data="a=end-of-candidates\r\n", headers={**right, **fragment}) as r:
            assert r.status == 204
        async with http.delete(viewer.location, headers=right) as r:
            assert r.status == 200
        assert session_id not in spectators
        viewer.location = None  # left already


async def test_last_viewer_leaving_drops_the_feed_after_the_linger(cluster, http):
    origin_app, origin_url, edge_app, edge_url, edges, conn = cluster
    b = conn.broadcast
    peers = origin_peers(origin_app, b["broadcast_id"])
    first = Spectator(edge_whep(edge_url, b), b["spectator_token"])
    await first.join()
    await asyncio.wait_for(first.track.recv(), 10)
    feed = edges.edges[b["broadcast_id"]].feed
    async with http.delete(first.location) as r:  # WHEP DELETE at the edge ends the edge's session
        assert r.status == 200
    assert len(edges.edges[b["broadcast_id"]].spectators) == 0
    async with http.delete(first.location) as r:
        assert r.status == 404
    first.location = None
    await first.leave()
    # A viewer back within the linger finds the feed warm: the same one, still one origin peer.
    async with Spectator(edge_whep(edge_url, b), b["spectator_token"]) as again:
        await asyncio.wait_for(again.track.recv(), 10)
        assert edges.edges[b["broadcast_id"]].feed is feed and len(peers) == 1
    loop = asyncio.get_running_loop()
    left = loop.time()
    await eventually(lambda: not edges.edges, timeout=LINGER + 3, what="the edge dropping its feed")
    assert loop.time() - left >= LINGER * 0.9  # not before the linger
    assert feed.closed
    await eventually(lambda: len(peers) == 0, timeout=3, what="the origin's node peer closing")


async def test_origin_broadcast_ending_closes_the_edge_and_nothing_leaks(aiohttp_server, tmp_path):
    threads_before = {t.ident for t in threading.enumerate()}
    origin_app, origin_url, _ = await start(aiohttp_server, tmp_path, "a")
    origins: dict[str, Origin] = {}
    edge_app, edge_url, edges = await start(aiohttp_server, tmp_path, "b", origins)
    async with RelayClient(origin_url, API_KEY) as client:
        async with client.connect() as conn:
            await conn.start_stream("a calm ocean")
            b = conn.broadcast
            origins[b["broadcast_id"]] = Origin("a", origin_url, b["spectator_token"])
            viewer = Spectator(edge_whep(edge_url, b), b["spectator_token"])
            await viewer.join()
            await asyncio.wait_for(viewer.track.recv(), 10)
        # The host left: the origin closed its broadcast and with it the edge's peer.
        del origins[b["broadcast_id"]]
        await eventually(lambda: not edges.edges, timeout=10, what="the edge noticing its origin is gone")
        await viewer.leave()
    await edges.close()
    await edges.close()  # twice is safe
    # No peer connection, task or decoder thread of the edge's left behind.
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"]
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and "relay-edge" in t.get_name()]
    assert not tasks
    await eventually(lambda: not [t for t in threading.enumerate()
                                  if t.ident not in threads_before and "decoder" in t.name],
                     timeout=5, what="decoder threads ending")


async def test_edge_cuts_hls_from_the_same_packets_and_lingers_out_without_requests(aiohttp_server, tmp_path, http):
    import io

    import av

    fast = {"keyframe_interval_seconds": 0.5}
    origin_app, origin_url, _ = await start(aiohttp_server, tmp_path, "a", media=fast)
    origins: dict[str, Origin] = {}
    edge_app, edge_url, edges = await start(aiohttp_server, tmp_path, "b", origins, media=fast)
    try:
        async with RelayClient(origin_url, API_KEY) as client, client.connect() as conn:
            await conn.start_stream("a calm ocean")
            b = conn.broadcast
            origins[b["broadcast_id"]] = Origin("a", origin_url, b["spectator_token"])
            base = f"{edge_url}/v1/broadcasts/{b['broadcast_id']}/hls"
            async with http.get(f"{base}/index.m3u8?token=wrong") as r:
                assert r.status == 401
            async with http.get(f"{base}/index.m3u8?token={b['spectator_token']}") as r:
                assert r.status == 200
                playlist = await r.text()
            segments = [line for line in playlist.splitlines() if line.endswith(f"?token={b['spectator_token']}")]
            assert len(segments) >= 3, playlist
            async with http.get(f"{base}/{segments[-1]}") as r:
                assert r.status == 200 and r.content_type == "video/mp2t"
                data = await r.read()
            with av.open(io.BytesIO(data)) as container:
                frames = [f for f in container.decode(video=0)]
            assert frames and (frames[0].width, frames[0].height) == (320, 176)
            # No viewer and no more requests: the feed goes after the linger; the origin's peer with it.
            await eventually(lambda: not edges.edges, timeout=LINGER + 3, what="the HLS-only edge lingering out")
            await eventually(lambda: len(origin_peers(origin_app, b["broadcast_id"])) == 0, timeout=3,
                             what="the origin's node peer closing")
    finally:
        await edges.close()


async def test_an_origin_gone_from_the_directory_drops_the_feed_even_while_its_peer_still_flows(
        aiohttp_server, tmp_path, http):
    # What an origin killed -9 looks like to an edge: its peer says nothing for ~30 s (ICE consent), but
    # its directory entry lapses within node_timeout. The edge believes the directory; with Redis away
    # (origin_of raises) it keeps the feed: live streams go on.
    origin_app, origin_url, _ = await start(aiohttp_server, tmp_path, "a")
    directory: dict[str, Origin | Exception] = {}

    async def origin_of(broadcast_id: str) -> Origin | None:
        found = directory.get(broadcast_id)
        if isinstance(found, Exception):
            raise found
        return found

    edge_app, edge_url, edges = await start(aiohttp_server, tmp_path, "b", origin_of=origin_of)
    try:
        async with RelayClient(origin_url, API_KEY) as client, client.connect() as conn:
            await conn.start_stream("a calm ocean")
            b = conn.broadcast
            directory[b["broadcast_id"]] = Origin("a", origin_url, b["spectator_token"])
            async with Spectator(edge_whep(edge_url, b), b["spectator_token"]) as viewer:
                await asyncio.wait_for(viewer.track.recv(), 10)
                feed = edges.edges[b["broadcast_id"]].feed
                directory[b["broadcast_id"]] = cluster_unavailable(1.0)  # Redis away: kept
                await frames_for(viewer.track, 4 * HEARTBEAT)
                assert edges.edges[b["broadcast_id"]].feed is feed and not feed.closed
                directory[b["broadcast_id"]] = Origin("c", origin_url, b["spectator_token"])  # moved: dropped
                await eventually(lambda: not edges.edges, timeout=3 * HEARTBEAT + 1, what="the feed dropped")
                assert feed.closed
                await eventually(lambda: len(origin_peers(origin_app, b["broadcast_id"])) == 0, timeout=3,
                                 what="the origin's node peer closing")
                del directory[b["broadcast_id"]]  # gone: WHEP at the edge is 404 from now on
                with pytest.raises(RelayAPIError) as refused:
                    async with Spectator(edge_whep(edge_url, b), b["spectator_token"]):
                        pass
                assert refused.value.status == 404
        # No feed, no housekeeping task: nothing of the edge's runs on.
        await eventually(lambda: not [t for t in asyncio.all_tasks() if t.get_name() == "relay-edges"], timeout=1,
                         what="the edges' ticker ending")
    finally:
        await edges.close()
