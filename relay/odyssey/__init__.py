"""The hosted world-model API's own wire protocol, as its official JS SDK (`@odysseyml/odyssey` 1.3.1) speaks it.

``protocol`` holds the shapes and tokens (shared with the client side that takes a hosted model as the
relay's source), ``server`` the aiohttp sub-application mounted at ``{public_url}/odyssey`` (the local
twin: one thin adapter over relay.sessions, relay.simulations and relay.recordings), and ``streamer``
the per-session WebRTC peer the relay offers to the SDK, fed from the broadcast's fan-out.
"""
