"""Past one machine: relay nodes sharing one Redis (issue 14).

    node.py        the Cluster: the Redis client, the heartbeat loop, what the rest of the relay calls
    membership.py  each node's heart-beaten record, the live nodes, the cluster secret and node-to-node auth
    directory.py   which node owns a connection, stream or broadcast; a broadcast's record for edges
    quota.py       concurrent_streams and pending_simulations per API key, atomic in Redis (Lua)
    seats.py       spectators_per_broadcast across nodes (seats, Lua) and each node's viewer count per broadcast
    forward.py     the middleware that carries a call about another node's resource to its owner

Nothing here runs without `[cluster] redis_url`: a single node imports it and never starts it.
"""
