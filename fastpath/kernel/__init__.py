"""Kernel adapters that run in the daemon process: nftables, conntrack (ctnetlink), set
element dumps and NFQUEUE over one netlink codec (`netlink`), the ruleset text of kernel
and nfqueue modes, and packet mode's AF_PACKET taps and drop rules (`taps`)."""
