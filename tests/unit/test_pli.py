"""PliCoalescer: a burst of keyframe requests inside the window is one PLI, the next window's burst
another (not before the window ends); a request before media flows is dropped, or (WHIP) owed
and sent with the first packet; close cancels the PLI on its way."""

from __future__ import annotations

import asyncio
import time

from relay.media.pli import PliCoalescer
from tests.conftest import eventually

INTERVAL = 0.1


class Upstream:
    """The sender side: records each PLI's SSRC and when it arrived."""

    def __init__(self) -> None:
        self.plis: list[tuple[int, float]] = []

    async def send(self, ssrc: int) -> None:
        self.plis.append((ssrc, time.monotonic()))


async def test_requests_inside_the_window_make_one_pli():
    upstream = Upstream()
    pli = PliCoalescer(upstream.send, name="test-pli", interval=INTERVAL)
    pli.media(1234)
    for _ in range(5):
        pli.request()
    await eventually(lambda: pli.sent == 1, timeout=2, what="the first PLI")
    for _ in range(5):
        pli.request()  # the next window: one more, not before the window ends
    await eventually(lambda: pli.sent == 2, timeout=2, what="the second PLI")
    for _ in range(3):
        await asyncio.sleep(0)  # any third PLI would have been created by now
    assert [ssrc for ssrc, _ in upstream.plis] == [1234, 1234] and pli.sent == 2
    assert upstream.plis[1][1] - upstream.plis[0][1] >= INTERVAL * 0.95
    await pli.close()


async def test_whip_owes_a_pli_until_media_flows():
    upstream = Upstream()
    pli = PliCoalescer(upstream.send, name="test-pli", owed_until_media=True, interval=INTERVAL)
    pli.request()
    await eventually(lambda: pli._task is None, timeout=2, what="the request handled")
    assert upstream.plis == []  # no SSRC to name yet
    pli.media(77)
    await eventually(lambda: pli.sent == 1, timeout=2, what="the owed PLI with the first packet")
    assert upstream.plis[0][0] == 77
    pli.media(77)  # later packets owe nothing
    assert pli._task is None
    await pli.close()


async def test_edge_drops_a_request_before_media():
    upstream = Upstream()
    pli = PliCoalescer(upstream.send, name="test-pli", interval=INTERVAL)
    pli.request()
    await eventually(lambda: pli._task is None, timeout=2, what="the request handled")
    pli.media(5)
    assert pli._task is None and upstream.plis == [] and pli.sent == 0
    await pli.close()


async def test_close_cancels_the_pli_on_its_way_and_is_idempotent():
    upstream = Upstream()
    pli = PliCoalescer(upstream.send, name="test-pli", interval=60.0)
    pli.media(9)
    pli.request()
    await eventually(lambda: pli.sent == 1, timeout=2, what="the first PLI")
    pli.request()  # waits out a 60 s window
    task = pli._task
    assert task is not None
    await pli.close()
    await pli.close()
    assert task.cancelled() and pli.sent == 1
    pli.request()
    assert pli._task is None
