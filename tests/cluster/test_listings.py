"""Jobs and recordings across nodes (three `relay serve` processes, one real Redis): a job's calls at any
node reach the node that admitted it; a recording made on one node is found and downloaded through
another; listings at any node show the whole key's, merged, partial when a node does not answer."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from tests.cluster.conftest import CLUSTER_KEY
from tests.cluster.test_cluster_core import all_joined
from tests.conftest import eventually

AUTH = {"Authorization": f"Bearer {CLUSTER_KEY}"}
STRANGER_KEY = "cluster-key-2"
STRANGER = {"Authorization": f"Bearer {STRANGER_KEY}"}
SHORT = [{"timestamp_ms": 0, "start": {"prompt": "a short calm sea"}}, {"timestamp_ms": 1000, "end": {}}]
LONG = [{"timestamp_ms": 0, "start": {"prompt": "a long calm sea"}}, {"timestamp_ms": 150_000, "end": {}}]
SECTIONS = {"recordings": {"enabled": True}, "auth": {"api_keys": [CLUSTER_KEY, STRANGER_KEY]}}


async def submit(http, node, script) -> str:
    async with http.post(f"{node.url}/v1/simulations", headers=AUTH, json={"script": script}) as r:
        assert r.status == 202, await r.text()
        return (await r.json())["job_id"]


async def job_at(http, node, job_id, headers=AUTH) -> tuple[int, dict]:
    async with http.get(f"{node.url}/v1/simulations/{job_id}", headers=headers) as r:
        return r.status, await r.json()


async def completed(http, node, job_id) -> dict | None:
    status, body = await job_at(http, node, job_id)
    assert status == 200, body
    assert body["status"] not in ("failed", "cancelled"), body
    return body if body["status"] == "completed" else None


async def wait_completed(http, node, job_id) -> dict:
    done: list[dict] = []

    async def check():
        body = await completed(http, node, job_id)
        if body is not None:
            done.append(body)
        return body is not None
    await eventually(check, timeout=60, what=f"job {job_id} completed")
    return done[0]


async def listing(http, node, path, headers=AUTH, **query) -> tuple[int, dict]:
    async with http.get(f"{node.url}{path}", headers=headers, params={k: str(v) for k, v in query.items()}) as r:
        return r.status, await r.json()


async def test_jobs_and_recordings_of_two_nodes_answer_and_list_at_any_node(cluster, http):
    a, b, c = await cluster(3, **SECTIONS)
    await all_joined(http, [a, b, c])
    short_a = await submit(http, a, SHORT)  # a's one worker takes it: the next stays pending
    long_a = await submit(http, a, LONG)
    short_b = await submit(http, b, SHORT)

    # A job admitted at a: read and cancelled at b, read at c; a stranger's key finds nothing at b.
    status, body = await job_at(http, b, long_a)
    assert status == 200 and body["job_id"] == long_a and body["status"] == "pending", body
    assert (await job_at(http, b, long_a, STRANGER))[0] == 404
    async with http.delete(f"{b.url}/v1/simulations/{long_a}", headers=STRANGER) as r:
        assert r.status == 404
    async with http.delete(f"{b.url}/v1/simulations/{long_a}", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["status"] == "cancelled"
    status, body = await job_at(http, c, long_a)
    assert status == 200 and body["status"] == "cancelled"
    async with http.delete(f"{c.url}/v1/simulations/{long_a}", headers=AUTH) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "NOT_CANCELLABLE"  # a's answer, unchanged
    assert (await job_at(http, c, "0" * 32))[0] == 404

    # Both short jobs complete on their own nodes; read at another, their recordings' URLs on the owner.
    job_a = await wait_completed(http, b, short_a)
    job_b = await wait_completed(http, c, short_b)
    (rec_a,), (rec_b,) = job_a["streams"], job_b["streams"]
    assert rec_a["video_url"].startswith(a.url + "/") and rec_b["video_url"].startswith(b.url + "/")

    # A recording made on a: got through b (URLs still on a), its signed file downloaded at a and through b.
    async with http.get(f"{b.url}/v1/recordings/{rec_a['stream_id']}", headers=AUTH) as r:
        assert r.status == 200, await r.text()
        got = await r.json()
    assert got["stream_id"] == rec_a["stream_id"] and got["video_url"].startswith(a.url + "/")
    async with http.get(got["video_url"]) as r:
        assert r.status == 200
        mp4 = await r.read()
    assert mp4[4:8] == b"ftyp" and len(mp4) > 1000
    through_b = b.url + got["video_url"][len(a.url):]
    async with http.get(through_b) as r:
        assert r.status == 200 and await r.read() == mp4
    async with http.get(through_b, headers={"Range": "bytes=0-99"}) as r:
        assert r.status == 206 and await r.read() == mp4[:100]
    replay = got["replay_url"][len(a.url):].replace(f"/recordings/{rec_a['stream_id']}?",
                                                    f"/recordings/{rec_a['stream_id']}/info?")
    async with http.get(c.url + replay) as r:
        assert r.status == 200 and (await r.json())["stream_id"] == rec_a["stream_id"]
    async with http.get(through_b.replace("signature=", "signature=x")) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"  # checked at b, no fan-out
    async with http.get(f"{c.url}/v1/recordings/{rec_a['stream_id']}", headers=STRANGER) as r:
        assert r.status == 404
    async with http.get(f"{c.url}/v1/recordings/{rec_a['stream_id']}") as r:
        assert r.status == 401
    async with http.get(f"{c.url}/v1/recordings/{'f' * 32}", headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"

    # Listings at c (which holds nothing): both nodes' items, newest first, paged as on one node.
    status, recs = await listing(http, c, "/v1/recordings")
    assert status == 200 and recs["partial"] is False and recs["total"] == 2, recs
    assert {r["stream_id"] for r in recs["recordings"]} == {rec_a["stream_id"], rec_b["stream_id"]}
    status, jobs = await listing(http, c, "/v1/simulations")
    assert status == 200 and jobs["total"] == 3 and not jobs["partial"], jobs
    assert [j["job_id"] for j in jobs["jobs"]] == [short_b, long_a, short_a]  # newest first
    by_id = {j["job_id"]: j for j in jobs["jobs"]}
    assert by_id[short_b]["streams"][0]["video_url"].startswith(b.url + "/")
    status, page = await listing(http, c, "/v1/simulations", limit=1, offset=1)
    assert [j["job_id"] for j in page["jobs"]] == [long_a] and page["total"] == 3
    status, done = await listing(http, a, "/v1/simulations", status="completed")
    assert {j["job_id"] for j in done["jobs"]} == {short_a, short_b} and done["total"] == 2
    # The same through the hosted API's protocol under /odyssey, with a token minted at another node.
    async with http.post(f"{a.url}/odyssey/auth/token", json={"api_key": CLUSTER_KEY}) as r:
        bearer = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
    status, jobs = await listing(http, c, "/odyssey/simulation-jobs", bearer)
    assert status == 200 and [j["job_id"] for j in jobs["jobs"]] == [short_b, long_a, short_a], jobs
    status, recs = await listing(http, c, "/odyssey/stream-recordings", bearer)
    assert status == 200 and recs["total"] == 2 and not recs["partial"]
    async with http.get(f"{c.url}/odyssey/simulation-jobs/{short_b}", headers=bearer) as r:
        assert r.status == 200 and (await r.json())["streams"][0]["video_url"].startswith(b.url + "/")
    async with http.get(f"{c.url}/odyssey/recordings/{rec_a['stream_id']}", headers=bearer) as r:
        assert r.status == 200 and (await r.json())["video_url"].startswith(a.url + "/")
    assert (await listing(http, c, "/odyssey/simulation-jobs", AUTH))[0] == 401  # an API key is no access token

    # A stranger's key lists none of it; bad input is refused as on one node.
    assert (await listing(http, b, "/v1/recordings", STRANGER))[1]["total"] == 0
    assert (await listing(http, b, "/v1/simulations", STRANGER))[1]["jobs"] == []
    assert (await listing(http, b, "/v1/simulations", {}))[0] == 401
    status, err = await listing(http, b, "/v1/simulations", status="nope")
    assert status == 400 and err["error"]["details"]["field"] == "status"
    status, err = await listing(http, b, "/v1/recordings", limit=101)
    assert status == 400
    status, err = await listing(http, b, "/v1/recordings", limit=100, offset=9_901)
    assert status == 400 and err["error"]["details"]["field"] == "offset"
    assert (await listing(http, b, "/v1/recordings", {}, limit=100, offset=9_901))[0] == 401  # credentials first


async def test_a_node_killed_mid_listing_is_left_out_in_time_marked_partial(cluster, http):
    nodes = await cluster(3, **SECTIONS, cluster={"fanout_timeout_seconds": 0.5})
    a, b, c = nodes
    await all_joined(http, nodes)
    jobs = {node.node_id: await submit(http, node, SHORT) for node in nodes}
    done_c = await wait_completed(http, a, jobs[c.node_id])  # no worker left rendering on the node about to die
    rec_c = done_c["streams"][0]["stream_id"]

    # Stalled (SIGSTOP): still a member, answers nothing; the listing waits fanout_timeout, no longer.
    os.kill(c.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = await listing(http, a, "/v1/simulations")
        took = time.monotonic() - started
        assert status == 200 and body["partial"] is True and body["missing_nodes"] == [c.node_id], body
        assert {j["job_id"] for j in body["jobs"]} == {jobs[a.node_id], jobs[b.node_id]}
        assert took < 0.5 + 1.0, f"listing took {took:.2f} s"
        # Its recording may be there: not a 404, a 503 to retry, as quickly.
        started = time.monotonic()
        async with http.get(f"{b.url}/v1/recordings/{rec_c}", headers=AUTH) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "NODE_UNAVAILABLE"
            assert r.headers["Retry-After"] == "2"
        assert time.monotonic() - started < 0.5 + 1.0
    finally:
        os.kill(c.proc.pid, signal.SIGCONT)
    await eventually(lambda: _whole(http, a), timeout=5, what="c answering again")

    # Killed -9 mid-listing: answered at once without it while it is still listed; its job 503 meanwhile.
    listings = [asyncio.create_task(listing(http, b, "/v1/recordings")) for _ in range(3)]
    c.kill()
    await c.proc.wait()
    status, body = await listing(http, a, "/v1/simulations")
    assert status == 200 and body["partial"] is True and c.node_id in body["missing_nodes"], body
    for status, part in await asyncio.gather(*listings):
        assert status == 200 and len(part["recordings"]) >= 2  # whole or partial, never an error
    status, gone = await job_at(http, b, jobs[c.node_id])
    assert (status, gone["error"]["code"]) in ((503, "NODE_UNAVAILABLE"), (404, "NOT_FOUND")), gone
    # Once it has left the cluster (node_timeout): its jobs answer 404, listings are whole without them.
    await eventually(lambda: _gone(http, b, jobs[c.node_id]), timeout=5, what="c's job 404")
    status, body = await listing(http, b, "/v1/simulations")
    assert body["partial"] is False and body["total"] == 2
    async with http.get(f"{b.url}/v1/recordings/{rec_c}", headers=AUTH) as r:
        assert r.status == 404


async def _whole(http, node) -> bool:
    return (await listing(http, node, "/v1/simulations"))[1].get("partial") is False


async def _gone(http, node, job_id) -> bool:
    return (await job_at(http, node, job_id))[0] == 404


async def test_listings_go_on_without_redis_and_jobs_are_registered_again_when_it_lost_them(cluster, redis_server, http):
    a, b = await cluster(2, **SECTIONS)
    job = await submit(http, a, LONG)
    assert (await job_at(http, b, job))[0] == 200
    await redis_server.stop()
    # Redis away: a listing still asks the nodes of the last heartbeat; a job of another node needs Redis.
    status, body = await listing(http, b, "/v1/simulations")
    assert status == 200 and [j["job_id"] for j in body["jobs"]] == [job] and body["partial"] is False, body
    status, body = await job_at(http, b, job)
    assert status == 503 and body["error"]["code"] == "CLUSTER_UNAVAILABLE"
    await redis_server.start()  # an empty Redis on the same port: every key lost
    await eventually(lambda: _found(http, b, job), timeout=10, what="a's job found through b again")
    async with http.delete(f"{b.url}/v1/simulations/{job}", headers=AUTH) as r:
        assert r.status in (200, 409)


async def _found(http, node, job_id) -> bool:
    return (await job_at(http, node, job_id))[0] == 200
