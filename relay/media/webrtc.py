"""WebRTC plumbing for WHEP spectators: offer checks, the answer, trickled candidates.

aiortc keeps SDP, ICE, DTLS and SRTP; what we add is the codec choice (H.264 constrained
baseline, so the shared encoder's packets suit every spectator), a spectator's keyframe
requests (PLI/FIR) routed to the shared encoder, which aiortc would otherwise drop for a track
that yields packets, and its signs of life. The aiortc internals this takes are in aiortc_hooks.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription, candidate_from_sdp

from .. import metrics
from ..errors import RelayError, invalid_request, unprocessable
from .aiortc_hooks import observe_rtcp, observe_stun_requests, replace_host_address_lookup, route_keyframe_requests

H264_PROFILE = "42e01f"


def restrict_ice_host_addresses(addresses: tuple[str, ...]) -> None:
    """Offer ICE host candidates only on these local addresses (e.g. 127.0.0.1).

    aioice gathers on every interface except loopback; a relay serving one machine (tests,
    a laptop demo) wants loopback, and a multi-homed server may want one public address.
    aioice has no option for it, so its address lookup is replaced process-wide.
    """
    if not addresses:
        return
    chosen = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    replace_host_address_lookup(host_addresses)


def count_candidates(sdp: str) -> int:
    """ICE candidate lines in an offer or a trickle fragment, counted in one linear pass, split as
    aiortc's parser and add_trickled_candidates split them (str.splitlines: a bare \r, \x85 or
    \u2028 ends a line too), so no separator can hide a candidate from the bound."""
    return sum(1 for line in sdp.splitlines() if line.lstrip().startswith("a=candidate:"))


def too_many_candidates(limit: int, count: int) -> RelayError:
    return unprocessable(
        f"Too many ICE candidates: {count}, a session may signal at most {limit}.",
        limit=limit, candidates=count,
    )


def checked_offer(sdp: str, max_candidates: int) -> SessionDescription:
    """An offer parsed once its candidates are counted: 400 for text that is not SDP, 422 for too many
    candidates. WHEP's and WHIP's offers both come through here."""
    if not sdp.lstrip().startswith("v=0"):
        raise invalid_request("The body is not an SDP offer (it must start with 'v=0').")
    # Counted before anything parses them: aioice deduplicates each remote candidate against all
    # earlier ones, so applying n candidates costs n² on the event loop (3,000 took 1.8 s).
    candidates = count_candidates(sdp)
    if candidates > max_candidates:
        raise too_many_candidates(max_candidates, candidates)
    try:
        return SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises assorted errors on broken SDP
        raise invalid_request(f"Malformed SDP offer: {str(exc) or type(exc).__name__}.") from exc


def parse_offer(sdp: str, max_candidates: int) -> SessionDescription:
    """400 for text that is not SDP, 422 for SDP we cannot answer with H.264 video."""
    parsed = checked_offer(sdp, max_candidates)
    video = [m for m in parsed.media if m.kind == "video"]
    if not video:
        raise unprocessable("The offer has no video m-line: a spectator must receive video.")
    if not any(c.mimeType.lower() == "video/h264" for m in video for c in m.rtp.codecs):
        raise unprocessable(
            "No codec in common: the relay sends H.264 (constrained baseline), the offer has none.",
            offered=sorted({c.mimeType for m in video for c in m.rtp.codecs}),
        )
    # aiortc answers the first video m-line with the relay's track. Offers it would accept but
    # could never play are refused here, before they take a slot: without a fingerprint DTLS
    # cannot start (aiortc fails later in a task nobody awaits), and a rejected (port 0),
    # inactive or send-only line asks for no video from us.
    first = video[0]
    if first.port == 0:
        raise unprocessable("The offer's video m-line is rejected (port 0): it asks for no video.")
    if first.direction not in (None, "sendrecv", "recvonly"):
        raise unprocessable(
            f"The offer's video m-line is {first.direction}: a spectator must receive video (recvonly).",
            direction=first.direction,
        )
    if first.dtls is None or not first.dtls.fingerprints:
        raise unprocessable(
            "The offer has no DTLS fingerprint and setup role (a=fingerprint, a=setup): media cannot be secured.")
    return parsed


def h264_preferences() -> list:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    h264 = [
        c for c in codecs
        if c.mimeType == "video/H264" and (c.parameters or {}).get("profile-level-id") == H264_PROFILE
    ]
    rtx = [c for c in codecs if c.mimeType == "video/rtx"]
    return h264 + rtx


@dataclass
class SpectatorPeer:
    pc: RTCPeerConnection
    sender: RTCRtpSender
    answer_sdp: str


async def answer_spectator(
    offer_sdp: str,
    track: MediaStreamTrack,
    *,
    on_sender: Callable[[RTCRtpSender], None],
    max_candidates: int,
) -> SpectatorPeer:
    parse_offer(offer_sdp, max_candidates)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    metrics.track_peer(pc)
    try:
        # aiortc picks the answer's codecs in setRemoteDescription: the transceiver and its
        # preferences must exist before the offer is applied.
        transceiver = pc.addTransceiver(track, direction="sendonly")
        transceiver.setCodecPreferences(h264_preferences())
        sender = transceiver.sender
        on_sender(sender)  # hooks go in before the offer is applied (see MediaFeed.attach)
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except RelayError:
        await pc.close()
        raise
    except Exception as exc:
        await pc.close()
        raise unprocessable(f"Cannot answer this offer: {str(exc) or type(exc).__name__}.") from exc
    except BaseException:  # cancelled (the client went away): the pc must not outlive the request
        await pc.close()
        raise
    return SpectatorPeer(pc, sender, pc.localDescription.sdp)


def hook_sender(
    sender: RTCRtpSender,
    on_keyframe_request: Callable[[], None] | None,
    on_heard: Callable[[], None],
) -> None:
    """What every spectator's sender needs, whatever sends its media: keyframe requests to the
    shared encoder (encode-once modes only) and ``on_heard`` on each sign of life."""
    if on_keyframe_request is not None:
        # RTCRtpSender answers PLI/FIR by flagging its own encoder, which a packet track
        # never uses; send the request to the shared encoder instead.
        route_keyframe_requests(sender, on_keyframe_request)
    # Signs of life from the spectator: RTCP receiver reports (about every second while media
    # flows) and ICE consent checks (about every 5 s, even between streams). A tab that closed
    # or lost its network sends neither; aiortc alone would notice only after ~30 s.
    observe_rtcp(sender, lambda _packet: on_heard())
    observe_stun_requests(sender, on_heard)


_ICE_UFRAG = re.compile(r"^a=ice-ufrag:(\S+)", re.M)


async def add_trickled_candidates(pc: RTCPeerConnection, sdpfrag: str) -> None:
    """Apply a WHEP PATCH body (RFC 8840 SDP fragment) to the peer connection."""
    remote = pc.remoteDescription
    ufrag = _ICE_UFRAG.search(sdpfrag)
    if ufrag and remote is not None:
        current = _ICE_UFRAG.search(remote.sdp)
        if current and current.group(1) != ufrag.group(1):
            raise RelayError(
                "INVALID_REQUEST",
                422,
                "ICE restart is not supported.",
                action="Open a new WHEP session instead.",
            )
    mid: str | None = None
    default_mid = pc.getTransceivers()[0].mid if pc.getTransceivers() else None
    for raw in sdpfrag.splitlines():
        line = raw.strip()
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        elif line.startswith("a=candidate:"):
            try:
                candidate = candidate_from_sdp(line[len("a=candidate:"):])
            except Exception as exc:
                raise invalid_request(f"Malformed ICE candidate line: {line!r}.") from exc
            candidate.sdpMid = mid or default_mid
            await pc.addIceCandidate(candidate)
        elif line == "a=end-of-candidates":
            # aiortc treats a candidate-less call as end-of-candidates for that mid.
            pass
