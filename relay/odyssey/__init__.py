"""The hosted world-model API's own wire protocol, as its official JS SDK (`@odysseyml/odyssey` 1.3.1) speaks it.

``server`` is the aiohttp sub-application mounted at ``{public_url}/odyssey`` (the local twin: one thin
adapter over relay.host, relay.sessions, relay.simulations and relay.recordings, beside relay/api and
taking nothing from it), and ``streamer`` the per-session WebRTC peer the relay offers to the SDK, fed
from the broadcast's fan-out. The shapes and tokens both speak are relay/worldmodel/hosted_protocol.py's:
the hosted API's protocol, which the hosted client (relay/worldmodel/hosted/) speaks too.
"""
