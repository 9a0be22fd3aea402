"""What chat and reactions cost the event loop for a crowd (not a test).

    python bench/chat.py [--participants N] [--seconds S]

One broadcast's Audience in-process (fake clock, no sockets: the cost measured is the relay's own,
up to the sockets' queues): N participants each send one chat message and one reaction a second for
S seconds. Prints the CPU microseconds per chat message sent (moderation + one JSON encode + N queue
puts; the ones over [chat] broadcast_messages_per_second are refused "chat_busy" before any of that),
per reaction (counted, not relayed), and the events queued per socket per second: bounded by the
broadcast's chat rate plus one reactions event per interval, however large the crowd.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from relay.audience import Audience  # noqa: E402
from relay.clock import FakeClock  # noqa: E402
from relay.config import Settings  # noqa: E402


async def main(participants: int, seconds: int) -> None:
    clock = FakeClock()
    settings = Settings.from_dict({"limits": {"participants_per_broadcast": participants,
                                              "events_sockets_per_address": participants},
                                   "orchestration": {"blocked_words": ["darn", "heck"]}})
    audience = Audience("bench", settings, clock, live=lambda: True)
    channels = [audience.open_channel(address=f"10.0.{i // 250}.{i % 250}") for i in range(participants)]
    chat_cpu = react_cpu = 0.0
    queued = sent = 0
    for second in range(seconds):
        for i, channel in enumerate(channels):
            start = time.process_time()
            reply = await audience.participant_message(channel, {"type": "chat", "text": f"hello from {i} at {second}"})
            sent += reply["status"] == "sent"
            chat_cpu += time.process_time() - start
            start = time.process_time()
            await audience.participant_message(channel, {"type": "reaction", "emoji": "🔥"})
            react_cpu += time.process_time() - start
        clock.advance(1.0)
        await audience.tick()
        queued += channels[0].queue.qsize()
        for channel in channels:  # the sockets' senders, drained (their cost is aiohttp's, not measured)
            while not channel.queue.empty():
                channel.queue.get_nowait()
    messages = participants * seconds
    print(f"{participants} participants, {seconds} s, every one chatting and reacting once a second:")
    print(f"  chat messages: {messages} sent, {sent} relayed ({sent / seconds:.0f}/s), the rest refused chat_busy")
    print(f"  CPU for all chat messages: {chat_cpu / seconds * 1e3:.1f} ms per second "
          f"({chat_cpu / messages * 1e6:.1f} µs per message sent, relayed or not)")
    print(f"  per reaction (counted, not relayed): {react_cpu / messages * 1e6:.1f} µs CPU")
    print(f"  events queued per socket per second: {queued / seconds:.0f} (the relayed chat + 1 reactions event)")
    audience.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.participants, args.seconds))
