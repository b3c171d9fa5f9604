"""XDP media quickpath: the eBPF program (relay.bpf.c), its build, its loader (libbpf
through cffi) and the byte layout of its maps. Used by `lrk/daemon/xdp_plane.py`."""
