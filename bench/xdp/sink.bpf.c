// SPDX-License-Identifier: GPL-2.0
/* lrk bench: the XDP sink (bench/xdpgen.py XdpSink), attached to the callee's veth.
 *
 * Counts and drops UDP (IPv4 or IPv6 without extension headers) to a destination port in
 * [lo, hi] at the driver, the cheapest place a receiver can count: every mode under test
 * pays the same here. Anything else (ARP, neighbour discovery) passes to the stack.
 * Counts are per CPU (no atomics); the reader sums the slots.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* [0]: lowest port counted, [1]: highest (host order) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 2);
} sink_ports SEC(".maps");

/* [0]: frames counted and dropped, [1]: their bytes */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} sink_counts SEC(".maps");

SEC("xdp")
int lrk_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	__u32 k0 = 0, k1 = 1, port;
	__u32 *lo, *hi;
	__u64 *pk, *by;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
			return XDP_PASS;
		udp = (void *)(ip + 1);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_UDP)
			return XDP_PASS;
		udp = (void *)(ip6 + 1);
	} else {
		return XDP_PASS;
	}
	if ((void *)(udp + 1) > data_end)
		return XDP_PASS;
	lo = bpf_map_lookup_elem(&sink_ports, &k0);
	hi = bpf_map_lookup_elem(&sink_ports, &k1);
	port = bpf_ntohs(udp->dest);
	if (!lo || !hi || port < *lo || port > *hi)
		return XDP_PASS;
	pk = bpf_map_lookup_elem(&sink_counts, &k0);
	by = bpf_map_lookup_elem(&sink_counts, &k1);
	if (pk)
		*pk += 1;
	if (by)
		*by += (__u64)(data_end - data);
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
