"""H.264 over RTP back to access units (Annex B), without decoding: a cluster edge's input.

An edge receives the origin's RTP and must hand its own fan-out whole encoded frames, as the
encoder would have (one ``av.Packet`` per access unit). aiortc's jitter buffer assembles frames
too, but only when the *next* frame's first packet arrives (a frame interval late); here a frame
is complete at its marker bit once every sequence number since the previous frame's end is in.

Loss: a gap is NACKed by aiortc's receiver and usually filled within a round trip. A frame that
stays incomplete after ``gap_seconds`` (or once the window is full) is dropped with everything up
to the next keyframe, and ``on_loss`` asks upstream for one: a partial GOP would only show as
corruption downstream. Memory is bounded by ``window`` packets.
"""

from __future__ import annotations

from typing import Callable

import av
from aiortc.codecs.h264 import H264PayloadDescriptor

from ..worldmodel.base import VIDEO_TIME_BASE

NAL_IDR = 5
NAL_SPS = 7
STAP_A = 24
FU_A = 28


def starts_keyframe(payload: bytes) -> bool:
    """Whether an RTP payload begins an access unit that is a keyframe: the relay's encoder starts
    every IDR access unit with its SPS (and PPS), alone or in a STAP-A (never fragmented: it is
    small). An IDR slice's own first fragment is no start: the SPS, PPS and SEI before it would
    be missing."""
    if len(payload) < 2:
        return False
    nal = payload[0] & 0x1F
    if nal == STAP_A and len(payload) >= 4:
        nal = payload[3] & 0x1F
    return nal == NAL_SPS


def begins_idr(payload: bytes) -> bool:
    """Whether an RTP payload holds an SPS or an IDR picture's first slice (first_mb_in_slice 0, its
    header's first bit), alone, in a STAP-A or as an FU-A's first fragment: a WHIP publisher's keyframe,
    which may open with an AUD or SEI, or carry its SPS and PPS only in the SDP or an earlier keyframe."""
    if len(payload) < 3:
        return False
    nal = payload[0] & 0x1F
    if nal == FU_A:
        return payload[1] & 0x80 != 0 and payload[1] & 0x1F == NAL_IDR and payload[2] & 0x80 != 0
    if nal == STAP_A:
        units, offset = [], 1
        while offset + 3 <= len(payload):
            size = int.from_bytes(payload[offset:offset + 2], "big")
            units.append(payload[offset + 2:offset + 2 + size])
            offset += 2 + size
        return any(len(u) >= 2 and ((u[0] & 0x1F) == NAL_SPS or ((u[0] & 0x1F) == NAL_IDR and u[1] & 0x80))
                   for u in units)
    return nal == NAL_SPS or (nal == NAL_IDR and payload[1] & 0x80 != 0)


def _seq_after(a: int, b: int) -> bool:
    """a comes after b in 16-bit sequence space."""
    return a != b and (a - b) & 0xFFFF < 0x8000


class H264Depacketizer:
    def __init__(
        self,
        on_frame: Callable[[av.Packet, bool], None],
        on_loss: Callable[[], None],
        *,
        clock: Callable[[], float],
        gap_seconds: float = 0.5,
        window: int = 2048,
        keyframe_start: Callable[[bytes], bool] = starts_keyframe,
    ) -> None:
        self._keyframe_start = keyframe_start  # which payload marks a keyframe (the relay's own: its first)
        self._on_frame = on_frame
        self._on_loss = on_loss
        self._clock = clock
        self._gap_seconds = gap_seconds
        self._window = window
        self._packets: dict[int, tuple[int, bool, bytes]] = {}  # seq -> (timestamp, marker, payload)
        self._next: int | None = None  # the first sequence number of the next frame; None: find a keyframe
        self._waiting_since: float | None = None  # when the next frame started waiting on a gap
        self._ts_origin: int | None = None
        self._ts_last = 0
        self._ts_cycles = 0
        self.frames = 0
        self.keyframes = 0
        self.dropped = 0  # frames given up on (lost packets), until the next keyframe

    def add(self, sequence_number: int, timestamp: int, marker: bool, payload: bytes) -> None:
        if self._next is not None and not _seq_after(sequence_number, self._next) and sequence_number != self._next:
            return  # late: a frame already emitted or given up on
        self._packets[sequence_number] = (timestamp, marker, payload)
        if self._next is None:
            self._resync()
        while self._next is not None and self._emit_next():
            pass
        if self._next is not None and self._packets:
            self._check_gap()

    def _resync(self) -> None:
        """Start at the oldest packet held that begins a keyframe (or wait for one)."""
        starts = [seq for seq, (_, _, payload) in self._packets.items() if self._keyframe_start(payload)]
        if not starts:
            if len(self._packets) > self._window:
                self._packets.clear()
            return
        first = starts[0]
        for seq in starts[1:]:
            if _seq_after(first, seq):
                first = seq
        while True:  # back to the access unit's first packet held (an AUD, SEI or SPS before the slice)
            before = self._packets.get((first - 1) & 0xFFFF)
            if before is None or before[0] != self._packets[first][0] or before[1]:
                break
            first = (first - 1) & 0xFFFF
        self._next = first
        self._waiting_since = None
        for seq in [s for s in self._packets if _seq_after(first, s)]:
            del self._packets[seq]

    def _emit_next(self) -> bool:
        """Emit the frame starting at _next if all of it is in; True if one was emitted."""
        seq = self._next
        entry = self._packets.get(seq)
        if entry is None:
            return False
        timestamp = entry[0]
        parts = []
        while True:
            entry = self._packets.get(seq)
            if entry is None or entry[0] != timestamp:
                return False  # a gap inside the frame (or a frame with no marker: waits for the gap rule)
            parts.append(entry[2])
            if entry[1]:
                break
            seq = (seq + 1) & 0xFFFF
        first = self._next
        for i in range(((seq - first) & 0xFFFF) + 1):
            del self._packets[(first + i) & 0xFFFF]
        self._next = (seq + 1) & 0xFFFF
        self._waiting_since = None
        try:
            data = b"".join(H264PayloadDescriptor.parse(p)[1] for p in parts)
        except ValueError:  # a payload aiortc cannot parse: treat as lost
            self._lose()
            return False
        keyframe = any(self._keyframe_start(p) for p in parts)
        packet = av.Packet(data)
        packet.pts = packet.dts = self._unwrap(timestamp)
        packet.time_base = VIDEO_TIME_BASE
        self.frames += 1
        self.keyframes += keyframe
        self._on_frame(packet, keyframe)
        return True

    def _unwrap(self, timestamp: int) -> int:
        if self._ts_origin is None:
            self._ts_origin = self._ts_last = timestamp
        elif timestamp < self._ts_last and self._ts_last - timestamp > 0x80000000:
            self._ts_cycles += 1 << 32  # the 32-bit RTP clock wrapped
        self._ts_last = timestamp
        return timestamp + self._ts_cycles - self._ts_origin

    def _check_gap(self) -> None:
        now = self._clock()
        if self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since > self._gap_seconds or len(self._packets) > self._window:
            self._lose()

    def _lose(self) -> None:
        """Give up on the frame waiting: skip to the next keyframe held, and ask for one."""
        self.dropped += 1
        stuck, self._next = self._next, None
        entry = self._packets.pop(stuck, None) if stuck is not None else None
        if entry is not None:  # the rest of that frame too, or a stuck keyframe would be found again
            for seq in [s for s, held in self._packets.items() if held[0] == entry[0]]:
                del self._packets[seq]
        self._waiting_since = None
        self._on_loss()
        if self._packets:
            # Anything held before the next keyframe cannot be decoded without what was lost.
            self._resync()
            while self._next is not None and self._emit_next():
                pass
