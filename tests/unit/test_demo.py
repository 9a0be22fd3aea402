"""Demo mode keeps a broadcast live for as long as the server runs."""

from __future__ import annotations

import asyncio

from relay.channels import ChannelStore
from relay.config import Settings
from relay.demo import DemoHost
from relay.host import broadcast_links
from relay.sessions import SessionManager
from relay.worldmodel.synthetic import SyntheticWorldModel
from tests.conftest import eventually


async def test_demo_streams_one_scene_after_another_and_outlives_its_connection():
    settings = Settings.from_dict({
        "auth": {"api_keys": ["k"]},
        # The shortest caps config takes: two streams fit in the connection's life, which then ends.
        "limits": {"connection_max_seconds": 1, "stream_max_seconds": 0.5},
        "world_model": {"width": 64, "height": 48},
    })
    sessions = SessionManager(settings, SyntheticWorldModel(64, 48, 25))
    demo = DemoHost(sessions, "k")
    first_path = await demo.open()
    first = next(iter(sessions.connections.values()))
    tasks = [asyncio.create_task(demo.run()), asyncio.create_task(sessions.run_reaper())]
    try:
        await eventually(lambda: first.streams_started >= 2, timeout=5, what="a second stream")
        await eventually(lambda: first.closed, timeout=5, what="the connection's end")
        # A new connection takes over (with a new watch URL) and streams again.
        await eventually(lambda: any(c.stream and c.stream.live for c in sessions.connections.values()),
                         timeout=5, what="a live stream on the next connection")
        assert first_path not in [f"/watch/{b}" for b in sessions.broadcasts]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sessions.close()


async def test_demo_keeps_one_watch_url_across_connections_and_restarts(tmp_path):
    settings = Settings.from_dict({
        "auth": {"api_keys": ["k"]},
        "limits": {"connection_max_seconds": 1, "stream_max_seconds": 1},
        "world_model": {"width": 64, "height": 48},
    })
    sessions = SessionManager(settings, SyntheticWorldModel(64, 48, 25), channels=ChannelStore(tmp_path, 5))
    demo = DemoHost(sessions, "k")
    path = await demo.open()
    first = next(iter(sessions.connections.values()))
    tasks = [asyncio.create_task(demo.run()), asyncio.create_task(sessions.run_reaper())]
    try:
        await eventually(lambda: first.closed, timeout=5, what="the first connection's end")
        await eventually(lambda: any(c.stream and c.stream.live for c in sessions.connections.values()),
                         timeout=5, what="a live stream on the next connection")
        assert broadcast_links(next(iter(sessions.connections.values())).broadcast, "")["watch_url"] == path
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sessions.close()
    # A restarted server, with another generated key, prints the same link.
    restarted = SessionManager(settings, SyntheticWorldModel(64, 48, 25), channels=ChannelStore(tmp_path, 5))
    try:
        assert await DemoHost(restarted, "another-key").open() == path
    finally:
        await restarted.close()


async def test_demo_prompts_pause_while_the_audience_has_control():
    settings = Settings.from_dict({
        "auth": {"api_keys": ["k"]},
        "limits": {"stream_max_seconds": 30},
        "world_model": {"width": 64, "height": 48},
    })
    sessions = SessionManager(settings, SyntheticWorldModel(64, 48, 25))
    demo = DemoHost(sessions, "k", prompt_every_seconds=0.05)
    await demo.open()
    conn = next(iter(sessions.connections.values()))
    prompts: list[str] = []  # every prompt the demo applied, in order
    conn.broadcast.prompt_applied = lambda prompt, source, participant_id=None: prompts.append(prompt)
    task = asyncio.create_task(demo.run())
    try:
        await eventually(lambda: len(prompts) >= 2, timeout=5, what="the demo's scripted prompts")
        for mode in ("queue", "vote", "turns"):
            conn.broadcast.audience.configure({"mode": mode})
            # The demo's first interval in this mode: a prompt under way before the switch has landed.
            start = demo.beats["paused"]
            await eventually(lambda: demo.beats["paused"] > start, timeout=5, what=f"the demo paused ({mode})")
            sent, paused_at = demo.beats["prompted"], len(prompts)
            # Three more of its own intervals, and not one prompt.
            await eventually(lambda: demo.beats["paused"] >= start + 4, timeout=5, what="three more intervals")
            assert (demo.beats["prompted"], len(prompts)) == (sent, paused_at), mode
        conn.broadcast.audience.configure({"mode": "host"})
        await eventually(lambda: len(prompts) > paused_at, timeout=5, what="the demo's prompts resumed")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sessions.close()
