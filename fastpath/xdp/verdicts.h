/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* What lrk's XDP programs share: a per-CPU array that counts each verdict, and the
 * helper that counts one and returns the action. The daemon sums the CPUs' counts
 * (fastpath/xdp/layout.py: verdict_totals). Included after bpf/bpf_helpers.h.
 * fastpath/xdp/build.py keys its object cache on this file too. */
#ifndef LRK_VERDICTS_H
#define LRK_VERDICTS_H

#define VERDICT_MAP(name, n)                           \
	struct {                                       \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); \
		__uint(max_entries, n);                \
		__type(key, __u32);                    \
		__type(value, __u64);                  \
	} name SEC(".maps")

static __always_inline int count_verdict(void *map, __u32 reason, int action)
{
	__u64 *n = bpf_map_lookup_elem(map, &reason);

	if (n)
		*n += 1;
	return action;
}

#endif
