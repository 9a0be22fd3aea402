"""The fixture itself: a real Redis that answers, and comes back after an outage on the same port."""

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


async def test_redis_server_answers_and_restarts(redis_server):
    # A client that retries once reconnects by itself after the outage.
    client = redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
    try:
        assert await client.ping()
        await client.set("k", "v")
        await redis_server.stop()
        await redis_server.start()
        assert await client.ping() and await client.get("k") is None  # nothing persisted
    finally:
        await client.aclose()
