"""homescale's own load generator: many simulated nodes over the real control wire.

Each simulated node does what a Tailscale client does to a control server: GET
/key, the Noise handshake as initiator (protocol/noise.py), HTTP/2 over Noise
(tests/protocol/ts2021client.py), a RegisterRequest with a reusable pre-auth key,
a streaming zstd MapRequest, lite endpoint updates, disconnect and reconnect.
``fleet.Fleet`` runs many such nodes in one trio loop; ``python -m tests.loadgen``
(``make bench-scale N=...``) runs a server and several worker processes of fleets
and prints one line of figures per phase. Loopback only.
"""
