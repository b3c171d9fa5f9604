"""The data-plane package, cut by where code runs.

- `fastpath.worker`: the worker process of socket and packet modes (hot loop, relay
  table, batched I/O, packet taps, raw egress).
- `fastpath.kernel`: adapters the daemon drives in kernel and nfqueue modes (nftables,
  conntrack, NFQUEUE).
- `fastpath.contract`, `fastpath.channel`, `fastpath.packet`: what both sides share (typed
  messages and reports, the daemon<->worker channel, the one UDP/IP packet parser).

Nothing here imports `lrk`; `lrk` imports this package.
"""
