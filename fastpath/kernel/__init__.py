"""Kernel adapters that run in the daemon process: nftables, conntrack (ctnetlink),
NFQUEUE, and the ruleset text of kernel and nfqueue modes."""
