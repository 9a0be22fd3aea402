"""spectators_per_address across the cluster: three `relay serve` nodes on one real Redis, real aiortc
spectators from two loopback addresses. One address holds at most its share of a broadcast's seats at every
node together (the origin and its edges), refused with 429 RATE_LIMITED past it; another address still joins;
a killed edge's seats (and its address's count) come back within node_timeout_seconds."""

from __future__ import annotations

import time

import aiohttp

from relay.client import RelayAPIError, Spectator
from tests.cluster.test_cluster_core import all_joined
from tests.cluster.test_counts import HEARTBEAT, NODE_TIMEOUT, live_broadcast, whep
from tests.conftest import eventually
from tests.integration.test_whep_hardening import candidate_less, make_offer


async def test_one_address_holds_its_share_of_seats_across_nodes(cluster, http):
    nodes = await cluster(3, limits={"spectators_per_address": 2, "spectators_per_broadcast": 10})
    a, b, c = nodes
    await all_joined(http, nodes)
    broadcast, _ = await live_broadcast(http, a)
    token = broadcast["spectator_token"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as neighbour:
        # 127.0.0.1's two seats: one at each edge.
        at_b, at_c = Spectator(whep(b, broadcast), token, session=http), Spectator(whep(c, broadcast), token,
                                                                                   session=http)
        joined: list[Spectator] = [at_b, at_c]
        try:
            await at_b.join()
            await at_c.join()
            # A third at the origin, where 127.0.0.1 holds nothing yet: refused, as at any node.
            offer = candidate_less(await make_offer())
            for node in (a, b):
                async with http.post(whep(node, broadcast), data=offer, headers={
                        "Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}) as r:
                    body = await r.json()
                    assert r.status == 429 and body["error"]["code"] == "RATE_LIMITED", body
                    assert body["error"]["details"] == {"limit": 2} and r.headers["Retry-After"] == "10"
            # Another address still finds the broadcast's seats, at the origin and at an edge.
            for node in (a, c):
                joined.append(other := Spectator(whep(node, broadcast), token, session=neighbour))
                await other.join()
            # c killed -9: its seat lapses with it (no longer refreshed), and 127.0.0.1 may hold one again.
            c.kill()
            killed = time.monotonic()
            again = Spectator(whep(a, broadcast), token, session=http)
            await eventually(lambda: _joins(again), timeout=5, what="127.0.0.1's seat at c given back")
            joined.append(again)
            left = time.monotonic() - killed
            assert left <= NODE_TIMEOUT + HEARTBEAT + 1.0, f"seated {left:.2f} s after the kill"
            # And no more than its share: the seat at b still counts.
            extra = Spectator(whep(b, broadcast), token, session=http)
            try:
                await extra.join()
                raise AssertionError("a third seat for 127.0.0.1")
            except RelayAPIError as err:
                assert (err.status, err.code) == (429, "RATE_LIMITED")
            finally:
                await extra.leave()
        finally:
            for viewer in joined:
                if viewer.whep_url.startswith(c.url):  # c is dead: nobody to say DELETE to
                    if viewer.pc is not None:
                        await viewer.pc.close()
                else:
                    await viewer.leave()


async def _joins(spectator: Spectator) -> bool:
    """Whether the spectator was admitted now (429: not yet)."""
    try:
        await spectator.join()
    except RelayAPIError as err:
        assert (err.status, err.code) == (429, "RATE_LIMITED"), err
        await spectator.leave()
        return False
    return True


async def test_a_proxied_ipv6_client_is_counted_by_its_64_across_nodes(cluster, http):
    # Behind a trusted proxy (127.0.0.1 here), X-Forwarded-For names the client; IPv6 counts by its /64.
    nodes = await cluster(3, limits={"spectators_per_address": 2, "spectators_per_broadcast": 10},
                          server={"trusted_proxies": ["127.0.0.1"]})
    a, b, c = nodes
    await all_joined(http, nodes)
    broadcast, _ = await live_broadcast(http, a)
    offer = candidate_less(await make_offer())  # pending sessions: seats held as well

    async def offer_from(node, client: str) -> aiohttp.ClientResponse:
        return await http.post(whep(node, broadcast), data=offer, headers={
            "Content-Type": "application/sdp", "Authorization": f"Bearer {broadcast['spectator_token']}",
            "X-Forwarded-For": f"{client}, 127.0.0.1"})

    for node, client in ((b, "2001:db8:0:1::1"), (c, "2001:db8:0:1::2")):
        async with await offer_from(node, client) as r:
            assert r.status == 201, await r.text()
    async with await offer_from(a, "2001:db8:0:1:ffff::3") as r:  # the same /64, at the origin
        assert r.status == 429 and (await r.json())["error"]["code"] == "RATE_LIMITED"
    async with await offer_from(a, "2001:db8:0:2::1") as r:  # the next /64 is another client
        assert r.status == 201, await r.text()
