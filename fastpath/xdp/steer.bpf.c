// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* lrk's AF_XDP steering program: UDP to the relay's media ports goes to the AF_XDP
 * socket of the receiving queue (userspace relays it from there, no skb), everything
 * else (ARP, control, SSH, other ports, other addresses, fragments) goes on to the
 * kernel unchanged.
 *
 * Which frames: IPv4 without fragmentation (any header length) or IPv6 whose next
 * header is UDP, to a relay address of `steer_addrs` (IPv4 as ::ffff:a.b.c.d) and a
 * destination port within that address's range. A queue
 * without a socket in `xsks` passes the frame (bpf_redirect_map's fallback), so a
 * worker that is not there yet costs nothing but the kernel path (counted apart). Counted per verdict
 * in a per-CPU array (fastpath/xdp/steer.py: VERDICTS, keep in step).
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

enum {
	S_STEERED = 0, S_PASS_OTHER, S_PASS_PORT, S_PASS_FRAGMENT, S_PASS_NO_SOCKET,
	S_PASS_ADDRESS, S_MAX
};

#define MAX_FRAME 1792

struct port_range {
	__u16 port_min;
	__u16 port_max;
};

struct addr16 {
	__u8 a[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* relay address -> its media ports */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct addr16);
	__type(value, struct port_range);
} steer_addrs SEC(".maps");

VERDICT_MAP(steer_verdicts, S_MAX);

static __always_inline int count(__u32 reason, int action)
{
	return count_verdict(&steer_verdicts, reason, action);
}

SEC("xdp")
int lrk_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	struct port_range *range;
	struct addr16 key = {};
	__u16 port;
	int action;

	/* larger than an AF_XDP frame holds (2048 - 256 bytes of headroom, copy mode, one
	 * buffer): the kernel path, rather than a drop at the socket */
	if ((void *)(eth + 1) > end || end - data > MAX_FRAME)
		return count(S_PASS_OTHER, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
			return count(S_PASS_OTHER, XDP_PASS);
		if (ip->frag_off & bpf_htons(0x3fff))
			return count(S_PASS_FRAGMENT, XDP_PASS);
		key.a[10] = 0xff;
		key.a[11] = 0xff;
		__builtin_memcpy(&key.a[12], &ip->daddr, 4);
		udp = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_UDP)
			return count(S_PASS_OTHER, XDP_PASS);
		__builtin_memcpy(key.a, &ip6->daddr, 16);
		udp = (void *)(ip6 + 1);
	} else {
		return count(S_PASS_OTHER, XDP_PASS);
	}
	if ((void *)(udp + 1) > end)
		return count(S_PASS_OTHER, XDP_PASS);
	range = bpf_map_lookup_elem(&steer_addrs, &key);
	if (!range)
		return count(S_PASS_ADDRESS, XDP_PASS);
	port = bpf_ntohs(udp->dest);
	if (port < range->port_min || port > range->port_max)
		return count(S_PASS_PORT, XDP_PASS);
	action = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
	return count(action == XDP_REDIRECT ? S_STEERED : S_PASS_NO_SOCKET, action);
}

char _license[] SEC("license") = "Dual BSD/GPL";
