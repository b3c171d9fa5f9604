// SPDX-License-Identifier: GPL-2.0
/* lrk bench: the XDP traffic generator's program (bench/xdpgen.py).
 *
 * Run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: the kernel hands it a test
 * frame in a page-pool page, and what it returns is done for real. XDP_TX in a live test
 * run is a redirect out of the ingress interface (the generator namespace's veth), so the
 * frame reaches the far end (the relay's veth) as an xdp_frame through ndo_xdp_xmit,
 * never as an skb: what a NIC's receive ring would hand the relay.
 *
 * Pages are recycled without being re-initialised, and the receivers (the relay's XDP
 * program, the stack) rewrite headers in place; so every frame's first SLOT bytes are
 * written whole from a template (one per flow, built and checksummed in Python by
 * bench/frames.py), never patched. Template i goes out as frame number c when
 * c % n == i: one frame per flow in rotation, exact by construction.
 *
 * Pacing is done here, not by calling the test run per burst (each call sets up and tears
 * down a page pool, and the teardown waits for an RCU grace period: milliseconds when the
 * other core is busy). One call runs many iterations; an iteration waits (bpf_loop on
 * bpf_ktime_get_ns, at most WAIT_LOOPS reads) for the next frame to be due and sends it
 * (XDP_TX) if it is; one that waited in vain drops its page unsent (XDP_DROP, counted as
 * idle). Waiting matters to the relay: every page goes back to this run's page pool, the
 * relay's from the other CPU through the pool's locked ring, and a generator dropping
 * pages between frames took that lock millions of times a second, so the relay spent up
 * to two thirds of its time spinning on it (perf, 2026-12-04). Behind schedule by more
 * than max_lag, the schedule is moved up (a bounded burst, counted as a lag reset), never
 * an unbounded catch-up. After `quota` frames every iteration waits once and is idle.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define SLOT 80 /* bytes written per frame: Ethernet + IPv6 + UDP + RTP header fit */
#define FP 10	/* schedule in 1/1024 ns */
/* clock reads an iteration may wait: about 2 µs. Not longer: a live test run keeps
 * bottom halves off for a batch of 64 iterations, and softirq work this CPU owes (a
 * receiver's NAPI) waits for the batch's end. */
#define WAIT_LOOPS 64

struct slot {
	__u8 bytes[SLOT];
};

struct gen_config {
	__u64 n;	  /* templates in use */
	__u64 interval;	  /* between frames, ns << FP; 0: unpaced */
	__u64 max_lag;	  /* how far behind the schedule may run, ns << FP */
};

struct gen_state {
	__u64 cursor;	  /* the next template */
	__u64 tx;	  /* frames sent (XDP_TX) */
	__u64 aborted;	  /* no template, frame too short */
	__u64 idle;	  /* iterations that sent nothing (not due, quota done) */
	__u64 due;	  /* when the next frame is due, ns << FP; 0: now */
	__u64 quota;	  /* frames still to send */
	__u64 first_ns;	  /* the first and the last frame sent */
	__u64 last_ns;
	__u64 lag_resets; /* times the schedule was moved up */
};

/* template i: the first SLOT bytes of flow i's frame (max_entries set at load) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct slot);
	__uint(max_entries, 1);
} templates SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct gen_config);
	__uint(max_entries, 1);
} gen_config SEC(".maps");

/* per CPU: a live test run stays on the calling CPU (migration disabled) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct gen_state);
	__uint(max_entries, 1);
} gen_state SEC(".maps");

struct wait_ctx {
	__u64 due; /* ns << FP; 0: wait the whole bound */
};

static long wait_step(__u64 index, void *arg)
{
	struct wait_ctx *w = arg;

	return w->due && (bpf_ktime_get_ns() << FP) >= w->due;
}

SEC("xdp")
int lrk_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0, idx;
	struct gen_config *cfg = bpf_map_lookup_elem(&gen_config, &zero);
	struct gen_state *st = bpf_map_lookup_elem(&gen_state, &zero);
	struct slot *t;
	__u64 now, now_fp;

	if (!cfg || !st)
		return XDP_ABORTED;
	if (st->quota == 0 || cfg->n == 0) {
		struct wait_ctx w = {.due = 0};

		bpf_loop(WAIT_LOOPS, wait_step, &w, 0); /* the run's tail: drop seldom */
		st->idle += 1;
		return XDP_DROP;
	}
	now = bpf_ktime_get_ns();
	if (cfg->interval) {
		now_fp = now << FP;
		if (st->due == 0)
			st->due = now_fp;
		if (now_fp < st->due) {
			struct wait_ctx w = {.due = st->due};

			bpf_loop(WAIT_LOOPS, wait_step, &w, 0);
			now = bpf_ktime_get_ns();
			now_fp = now << FP;
			if (now_fp < st->due) {
				st->idle += 1;
				return XDP_DROP;
			}
		}
		if (now_fp - st->due > cfg->max_lag) {
			st->due = now_fp - cfg->max_lag;
			st->lag_resets += 1;
		}
		st->due += cfg->interval;
	}
	idx = (__u32)(st->cursor % cfg->n);
	st->cursor += 1;
	t = bpf_map_lookup_elem(&templates, &idx);
	if (!t || data + SLOT > data_end) {
		st->aborted += 1;
		return XDP_ABORTED;
	}
	__builtin_memcpy(data, t->bytes, SLOT);
	st->quota -= 1;
	st->tx += 1;
	if (st->first_ns == 0)
		st->first_ns = now;
	st->last_ns = now;
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
