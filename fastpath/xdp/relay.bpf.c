// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* lrk's XDP media quickpath: the whole job for established streams at the driver.
 *
 * Two lookups per packet: the relay address (its block of the stream array: compared
 * against the first INLINE_V4 / INLINE_V6 addresses held in the config entry, a hash
 * only for a relay with more) and the stream, an array index (block + port - lowest
 * port: no hashing, no bucket walk, one cache line or two at any number of streams).
 * No hash on the common path keeps a junk frame's drop at about half the cost
 * (BPF_PROG_TEST_RUN, docs/benchmarks.md section 6). A live entry whose
 * source is the peer the daemon wrote is rewritten to the other leg (relay address and
 * port as source, that leg's peer as destination), checksums updated, TTL/hop limit
 * decremented, and redirected to the next hop bpf_fib_lookup names (XDP_TX when that
 * is the ingress interface). Everything the daemon must judge (a port it has not
 * latched, a destination seen sending from another port, fragments, options, no neighbour) is XDP_PASS
 * into the kernel-mode nftables path unchanged; junk to a relay port (no stream, a
 * wrong source address, inconsistent lengths) is XDP_DROP. Every verdict is counted
 * per reason in a per-CPU array (indices: fastpath/xdp/layout.py, keep in step).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "verdicts.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* verdict counter indices (fastpath/xdp/layout.py: REASONS) */
enum {
	V_REDIRECT = 0,
	V_TX,
	V_PASS_OTHER,
	V_PASS_SHORT,
	V_PASS_KERNEL,
	V_PASS_SOURCE_PORT,
	V_PASS_PEER_NAT,
	V_PASS_FRAGMENT,
	V_PASS_OPTIONS,
	V_PASS_TTL,
	V_PASS_FIB,
	V_DROP_NO_DESTINATION,
	V_DROP_UNEXPECTED_SOURCE,
	V_DROP_MALFORMED,
	V_PASS_EGRESS,
	V_MAX,
};

/* entry flags */
#define F_KERNEL 1    /* the kernel path serves this port (forks, unknown peers) */
#define F_CHECK_PEER 2 /* pass while the peer sends from another port than named */
#define F_LIVE 4       /* a stream is here (the daemon zeroes a removed entry) */

/* what the program saw at an entry (stream_val.seen) */
#define SEEN_EXACT 1  /* a packet from src:src_port */
#define SEEN_OTHER_PORT 2 /* a packet from src, another port: NAT, kernel path learns */
#define SEEN_LOW 3        /* the two bits above */
/* this entry's destination was seen sending from another port (a NAT): set by the
 * reverse entry (the one at `peer`) when that happens, so the hot path of an
 * F_CHECK_PEER entry reads its own value instead of looking the reverse entry up */
#define SEEN_PEER_MOVED 4

struct stream_val {
	__u8 src[16];     /* the peer expected to send here */
	__u16 src_port;   /* network order; 0: any port of that address */
	__u16 flags;
	__u8 new_src[16]; /* the other leg's relay address */
	__u16 new_sport;  /* network order */
	__u16 pad1;
	__u8 new_dst[16]; /* the other leg's peer */
	__u16 new_dport;  /* network order */
	__u16 pad2;
	__u32 counter;    /* index into stream_counters */
	__u32 seen;       /* SEEN_*, written here; the daemon writes 0 */
	__u32 peer;       /* the reverse direction's index + 1; 0: none */
};

struct counter {
	__u64 packets;
	__u64 bytes;      /* UDP payload bytes */
	__u64 last_ns;    /* bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last packet */
};

/* relay addresses held in the config entry itself: a relay with more has the rest in
 * `relay_addrs` (a hash), looked up only when the inline ones do not match */
#define INLINE_V4 16
#define INLINE_V6 8

struct relay_cfg {
	__u16 port_min;   /* host order */
	__u16 port_max;
	__u16 n4;         /* inline IPv4 addresses in v4[] */
	__u16 n6;         /* inline IPv6 addresses in v6[] */
	__u16 more4;      /* 1: more IPv4 addresses, in relay_addrs */
	__u16 more6;
	__u32 pad;
	__u32 v4[INLINE_V4];    /* network order, as in the packet */
	__u32 base4[INLINE_V4]; /* each one's block */
	__u64 v6[INLINE_V6][2]; /* the 16 bytes as in the packet */
	__u32 base6[INLINE_V6];
};

struct addr_key {
	__u32 family;
	__u8 addr[16];
};

/* one block of (port_max - port_min + 1) entries per relay address, indexed by port;
 * sized by the daemon before loading */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct stream_val);
} streams SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct counter);
} stream_counters SEC(".maps");

VERDICT_MAP(verdicts, V_MAX);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct relay_cfg);
} config SEC(".maps");

/* relay address -> the first index of its block in `streams`: consulted only for the
 * addresses beyond the config entry's inline ones (more4 / more6) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct addr_key);
	__type(value, __u32);
} relay_addrs SEC(".maps");

/* the interfaces the program runs on (ifindex): the only ones it sends out of, since a
 * driver may take redirected frames only where an XDP program is attached */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} tx_ifaces SEC(".maps");

static __always_inline int verdict(__u32 reason, int action)
{
	return count_verdict(&verdicts, reason, action);
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* RFC 1624 incremental update: take `n` old 16-bit words out, put the new ones in */
static __always_inline __u32 csum_replace(__u32 sum, const __u16 *old, const __u16 *new, int n)
{
#pragma unroll
	for (int i = 0; i < n; i++) {
		sum += (__u16)~old[i];
		sum += new[i];
	}
	return sum;
}

static __always_inline struct relay_cfg *relay_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}

/* the block of relay IPv4 address `daddr`; -1: not a relay address */
static __always_inline long block4(struct relay_cfg *cfg, __u32 daddr)
{
	struct addr_key ak = {.family = 4};
	__u32 *base;

#pragma unroll
	for (int i = 0; i < INLINE_V4; i++) {
		if (i >= cfg->n4)
			break;
		if (cfg->v4[i] == daddr)
			return cfg->base4[i];
	}
	if (!cfg->more4)
		return -1;
	__builtin_memcpy(ak.addr, &daddr, 4);
	base = bpf_map_lookup_elem(&relay_addrs, &ak);
	return base ? (long)*base : -1;
}

/* the block of relay IPv6 address `daddr` (16 bytes of the packet); -1: not one */
static __always_inline long block6(struct relay_cfg *cfg, const __u8 *daddr)
{
	struct addr_key ak = {.family = 6};
	__u64 w[2];
	__u32 *base;

	__builtin_memcpy(w, daddr, 16);
#pragma unroll
	for (int i = 0; i < INLINE_V6; i++) {
		if (i >= cfg->n6)
			break;
		if (cfg->v6[i][0] == w[0] && cfg->v6[i][1] == w[1])
			return cfg->base6[i];
	}
	if (!cfg->more6)
		return -1;
	__builtin_memcpy(ak.addr, daddr, 16);
	base = bpf_map_lookup_elem(&relay_addrs, &ak);
	return base ? (long)*base : -1;
}

/* the stream array index of relay port `port_be` in the block at `base`; -1 when the
 * port is outside the relay's range */
static __always_inline long stream_index(struct relay_cfg *cfg, __u32 base, __u16 port_be)
{
	__u16 port = bpf_ntohs(port_be);

	if (port < cfg->port_min || port > cfg->port_max)
		return -1;
	return (long)base + (port - cfg->port_min);
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b, int n)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (i < n && a[i] != b[i])
			return 0;
	}
	return 1;
}

static __always_inline void count_stream(struct stream_val *v, __u32 bytes)
{
	__u32 idx = v->counter;
	struct counter *c = bpf_map_lookup_elem(&stream_counters, &idx);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
		c->last_ns = bpf_ktime_get_ns();
	}
	if (!(v->seen & SEEN_LOW))
		v->seen |= SEEN_EXACT;
}

/* the destination peer was seen sending from another port than the one this entry
 * sends to (a NAT): conntrack knows its real port, the daemon does not yet */
static __always_inline int peer_nat(struct stream_val *v)
{
	return (v->flags & F_CHECK_PEER) && (v->seen & SEEN_PEER_MOVED);
}

/* this entry's source sends from another port: tell the reverse entry, whose
 * destination it is (rare: until the daemon learns the port) */
static __always_inline void source_moved(struct stream_val *v)
{
	struct stream_val *p;

	__u32 peer = v->peer - 1;

	v->seen = (v->seen & SEEN_PEER_MOVED) | SEEN_OTHER_PORT;
	if (!v->peer)
		return;
	p = bpf_map_lookup_elem(&streams, &peer);
	if (p && !(p->seen & SEEN_PEER_MOVED))
		p->seen |= SEEN_PEER_MOVED;
}

static __always_inline int egress_ok(struct bpf_fib_lookup *fib)
{
	__u32 ifindex = fib->ifindex;

	return bpf_map_lookup_elem(&tx_ifaces, &ifindex) != 0;
}

static __always_inline int send(struct xdp_md *ctx, struct ethhdr *eth,
				struct bpf_fib_lookup *fib)
{
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	if (fib->ifindex == ctx->ingress_ifindex)
		return verdict(V_TX, XDP_TX);
	return verdict(V_REDIRECT, bpf_redirect(fib->ifindex, 0));
}

/* the admission both families share, in this order (each verdict counted): a relay
 * port in range, its live stream entry (none: junk, dropped), the kernel path's ports, the
 * sender's address (another: dropped), the lengths (`malformed`: dropped), the sender's
 * port (another: a NAT the kernel path learns), the destination behind a NAT, the
 * TTL / hop limit. Returns ADMITTED with the entry in *out, or the verdict to return. */
#define ADMITTED -1

static __always_inline int admit(struct relay_cfg *cfg, __u32 base, struct udphdr *udp,
				 const __u8 *saddr, int alen, int malformed, __u8 ttl,
				 struct stream_val **out)
{
	struct stream_val *v;
	long index = stream_index(cfg, base, udp->dest);
	__u32 key;

	if (index < 0)
		return verdict(V_PASS_OTHER, XDP_PASS);
	key = (__u32)index;
	v = bpf_map_lookup_elem(&streams, &key);
	if (!v || !(v->flags & F_LIVE))
		return verdict(V_DROP_NO_DESTINATION, XDP_DROP);
	if (v->flags & F_KERNEL)
		return verdict(V_PASS_KERNEL, XDP_PASS);
	if (!addr_eq(saddr, v->src, alen))
		return verdict(V_DROP_UNEXPECTED_SOURCE, XDP_DROP);
	if (malformed)
		return verdict(V_DROP_MALFORMED, XDP_DROP);
	if (v->src_port && udp->source != v->src_port) {
		source_moved(v);
		return verdict(V_PASS_SOURCE_PORT, XDP_PASS);
	}
	if (peer_nat(v))
		return verdict(V_PASS_PEER_NAT, XDP_PASS);
	if (ttl <= 1)
		return verdict(V_PASS_TTL, XDP_PASS);
	*out = v;
	return ADMITTED;
}

static __always_inline int relay4(struct xdp_md *ctx, struct ethhdr *eth, void *data_end)
{
	struct iphdr *ip = (void *)(eth + 1);
	struct relay_cfg *cfg = relay_config();
	long base;
	struct bpf_fib_lookup fib = {};
	struct stream_val *v = 0;
	struct udphdr *udp;
	__u16 old[6], new[6];
	int malformed, action;
	__u32 sum;

	if ((void *)(ip + 1) > data_end)
		return verdict(V_PASS_SHORT, XDP_PASS);
	if (ip->version != 4 || ip->protocol != IPPROTO_UDP)
		return verdict(V_PASS_OTHER, XDP_PASS);
	if (!cfg)
		return verdict(V_PASS_OTHER, XDP_PASS);
	base = block4(cfg, ip->daddr);
	if (base < 0)
		return verdict(V_PASS_OTHER, XDP_PASS);
	if (ip->frag_off & bpf_htons(0x3fff))
		return verdict(V_PASS_FRAGMENT, XDP_PASS);
	if (ip->ihl != 5)
		return verdict(V_PASS_OPTIONS, XDP_PASS);
	udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return verdict(V_PASS_SHORT, XDP_PASS);
	{
		__u32 tot = bpf_ntohs(ip->tot_len);
		__u32 ulen = bpf_ntohs(udp->len);

		malformed = tot > (__u32)((long)data_end - (long)ip) || ulen < 8
			    || ulen != tot - 20;
	}
	action = admit(cfg, (__u32)base, udp, (__u8 *)&ip->saddr, 4, malformed, ip->ttl, &v);
	if (action != ADMITTED)
		return action;

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.tos = ip->tos;
	fib.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(&fib.ipv4_src, v->new_src, 4);
	__builtin_memcpy(&fib.ipv4_dst, v->new_dst, 4);
	fib.sport = v->new_sport;
	fib.dport = v->new_dport;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return verdict(V_PASS_FIB, XDP_PASS);
	if (!egress_ok(&fib))
		return verdict(V_PASS_EGRESS, XDP_PASS);

	/* UDP checksum over the pseudo-header: addresses and ports change (0 stays 0) */
	__builtin_memcpy(old, &ip->saddr, 8);
	old[4] = udp->source;
	old[5] = udp->dest;
	__builtin_memcpy(&ip->saddr, v->new_src, 4);
	__builtin_memcpy(&ip->daddr, v->new_dst, 4);
	udp->source = v->new_sport;
	udp->dest = v->new_dport;
	__builtin_memcpy(new, &ip->saddr, 8);
	new[4] = udp->source;
	new[5] = udp->dest;
	if (udp->check) {
		sum = csum_replace((__u16)~udp->check, old, new, 6);
		udp->check = ~csum_fold(sum);
		if (!udp->check)
			udp->check = 0xffff;
	}
	/* IPv4 header: TTL - 1, checksum recomputed over the 20 bytes */
	ip->ttl -= 1;
	ip->check = 0;
	{
		__u16 *w = (__u16 *)ip;

		sum = 0;
#pragma unroll
		for (int i = 0; i < 10; i++)
			sum += w[i];
		ip->check = ~csum_fold(sum);
	}
	count_stream(v, bpf_ntohs(udp->len) - 8);
	return send(ctx, eth, &fib);
}

static __always_inline int relay6(struct xdp_md *ctx, struct ethhdr *eth, void *data_end)
{
	struct ipv6hdr *ip = (void *)(eth + 1);
	struct relay_cfg *cfg = relay_config();
	long base;
	struct bpf_fib_lookup fib = {};
	struct stream_val *v = 0;
	struct udphdr *udp;
	__u16 old[18], new[18];
	int malformed, action;
	__u32 sum;

	if ((void *)(ip + 1) > data_end)
		return verdict(V_PASS_SHORT, XDP_PASS);
	if (ip->version != 6)
		return verdict(V_PASS_OTHER, XDP_PASS);
	if (!cfg)
		return verdict(V_PASS_OTHER, XDP_PASS);
	base = block6(cfg, (__u8 *)&ip->daddr);
	if (base < 0)
		return verdict(V_PASS_OTHER, XDP_PASS);
	if (ip->nexthdr == 44)  /* fragment header */
		return verdict(V_PASS_FRAGMENT, XDP_PASS);
	if (ip->nexthdr != IPPROTO_UDP) {
		/* extension headers (hop-by-hop, routing, ...) or another protocol */
		if (ip->nexthdr == 0 || ip->nexthdr == 43 || ip->nexthdr == 60)
			return verdict(V_PASS_OPTIONS, XDP_PASS);
		return verdict(V_PASS_OTHER, XDP_PASS);
	}
	udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return verdict(V_PASS_SHORT, XDP_PASS);
	{
		__u32 plen = bpf_ntohs(ip->payload_len);
		__u32 ulen = bpf_ntohs(udp->len);

		/* the UDP checksum is mandatory over IPv6 (RFC 8200) */
		malformed = plen > (__u32)((long)data_end - (long)udp) || ulen < 8
			    || ulen != plen || !udp->check;
	}
	action = admit(cfg, (__u32)base, udp, (__u8 *)&ip->saddr, 16, malformed, ip->hop_limit,
		       &v);
	if (action != ADMITTED)
		return action;

	fib.family = AF_INET6;
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = bpf_ntohs(ip->payload_len) + sizeof(*ip);
	fib.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(fib.ipv6_src, v->new_src, 16);
	__builtin_memcpy(fib.ipv6_dst, v->new_dst, 16);
	fib.sport = v->new_sport;
	fib.dport = v->new_dport;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return verdict(V_PASS_FIB, XDP_PASS);
	if (!egress_ok(&fib))
		return verdict(V_PASS_EGRESS, XDP_PASS);

	__builtin_memcpy(old, &ip->saddr, 32);
	old[16] = udp->source;
	old[17] = udp->dest;
	__builtin_memcpy(&ip->saddr, v->new_src, 16);
	__builtin_memcpy(&ip->daddr, v->new_dst, 16);
	udp->source = v->new_sport;
	udp->dest = v->new_dport;
	__builtin_memcpy(new, &ip->saddr, 32);
	new[16] = udp->source;
	new[17] = udp->dest;
	sum = csum_replace((__u16)~udp->check, old, new, 18);
	udp->check = ~csum_fold(sum);
	if (!udp->check)
		udp->check = 0xffff;
	ip->hop_limit -= 1;
	count_stream(v, bpf_ntohs(udp->len) - 8);
	return send(ctx, eth, &fib);
}

SEC("xdp")
int lrk_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return verdict(V_PASS_SHORT, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return relay4(ctx, eth, data_end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return relay6(ctx, eth, data_end);
	return verdict(V_PASS_OTHER, XDP_PASS);
}

/* for the far side of a veth pair: native XDP redirect into a veth needs a program
 * (or GRO) on the receiving end; this one only passes */
SEC("xdp")
int lrk_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
