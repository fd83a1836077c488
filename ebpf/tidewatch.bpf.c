// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// Tidewatch kernel probes: process exec/exit, OOM kills, TCP lifecycle and
// retransmits. CO-RE (vmlinux.h from the kernel's BTF), one BPF ring buffer
// for events, per-CPU per-type drop counters for every failed reservation.
//
// Built by collectors/ebpf/build.rs with `clang -g -O2 -target bpf` and
// loaded by the collector with aya. The record layouts below are parsed by
// collectors/ebpf/src/wire.rs: keep the two in step (the offsets are checked
// by _Static_assert here and by unit tests there).

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

// Event kinds: index into the drop, sampling and sequence maps.
#define K_EXEC 0
#define K_EXIT 1
#define K_OOM 2
#define K_TCP_CONNECT 3
#define K_TCP_ACCEPT 4
#define K_TCP_CLOSE 5
#define K_TCP_REFUSED 6
#define K_TCP_TIMEOUT 7
#define K_TCP_RESET 8
#define K_TCP_RETRANSMIT 9
#define K_COUNT 10

// Config array slots (u64 each).
#define CFG_IGNORE_TGID 0      // tgid whose events are dropped in kernel (0: none)
#define CFG_INCLUDE_MODE 1     // 1: only cgroups in cgroup_include (and descendants)
#define CFG_SAMPLE_BASE 2      // + kind: 0 = off, 1 = every event, N = one in N
#define CFG_WAKEUP_BYTES (CFG_SAMPLE_BASE + K_COUNT) // wake the reader past this much data
#define CFG_COUNT (CFG_WAKEUP_BYTES + 1)

#define FILENAME_SIZE 256
#define ARGS_SIZE 1024
#define MAX_CGROUP_LEVELS 16

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
#define TCP_CLOSE_ 7
#define TCP_LISTEN_ 10
#define ECONNREFUSED_ 111
#define ETIMEDOUT_ 110
#define ECONNRESET_ 104
#define AF_INET_ 2
#define AF_INET6_ 10

struct hdr {
	__u32 kind;
	__u32 cpu;
	__u64 seq;
	__u64 ts_ns; // CLOCK_MONOTONIC
	__u64 cgroup_id;
	__u32 pid;
	__u32 tgid;
	__u32 ppid;
	__u32 uid;
	char comm[16];
};
_Static_assert(sizeof(struct hdr) == 64, "hdr layout");

struct exec_event {
	struct hdr h;
	__u32 filename_len;
	__u32 args_len;
	__u32 args_truncated;
	__u32 _pad;
	char filename[FILENAME_SIZE];
	char args[ARGS_SIZE];
};
_Static_assert(sizeof(struct exec_event) == 64 + 16 + FILENAME_SIZE + ARGS_SIZE, "exec layout");

struct exit_event {
	struct hdr h;
	__s32 exit_code; // task->exit_code: status << 8 | core 0x80 | signal
	__u32 _pad;
	__u64 runtime_ns;
};
_Static_assert(sizeof(struct exit_event) == 80, "exit layout");

struct oom_event {
	struct hdr h;
	__u64 total_pages; // memory cgroup limit (page_counter max), in pages
	__u64 rss_pages;
	__u32 memcg; // 1 when the victim has a memory cgroup
	__u32 _pad;
};
_Static_assert(sizeof(struct oom_event) == 88, "oom layout");

struct tcp_event {
	struct hdr h;
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u16 _pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__u64 duration_ns;
	__u32 retransmits;
	__u32 _pad2;
	__u64 bytes_sent;
	__u64 bytes_received;
};
_Static_assert(sizeof(struct tcp_event) == 64 + 8 + 32 + 8 + 8 + 16, "tcp layout");

// Who owns a tracked connection (captured in process context).
struct conn {
	struct hdr owner; // kind/cpu/seq unused; ts_ns = established time (0 while connecting)
};

struct retrans {
	struct hdr owner; // ts_ns = first retransmit in the interval
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u16 _pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 count;
	__u32 _pad2;
};
_Static_assert(sizeof(struct retrans) == 64 + 8 + 32 + 8, "retrans layout");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); // the collector overrides this
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, K_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seqs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, K_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} sample_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CFG_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} tw_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} cgroup_include SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} cgroup_exclude SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct conn);
} conns SEC(".maps");

// Listening sockets by family << 16 | port → the process that listens.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct conn);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct retrans);
} retransmits SEC(".maps");

static __always_inline __u64 cfg(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&tw_config, &slot);
	return v ? *v : 0;
}

// Whether the cgroup filter lets an event of the current task through:
// excluded if the cgroup or an ancestor is in cgroup_exclude; in include
// mode, only if the cgroup or an ancestor is in cgroup_include.
static __always_inline bool current_cgroup_allowed(void)
{
	bool include_mode = cfg(CFG_INCLUDE_MODE) != 0;
	bool included = false;
	for (int level = 0; level < MAX_CGROUP_LEVELS; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
		if (id == 0)
			break;
		if (bpf_map_lookup_elem(&cgroup_exclude, &id))
			return false;
		if (include_mode && bpf_map_lookup_elem(&cgroup_include, &id))
			included = true;
	}
	return include_mode ? included : true;
}

// The same filter on a cgroup id that is not the current task's (OOM
// victims, connections closed in softirq): exact match only.
static __always_inline bool cgroup_id_allowed(__u64 id)
{
	if (bpf_map_lookup_elem(&cgroup_exclude, &id))
		return false;
	if (cfg(CFG_INCLUDE_MODE))
		return bpf_map_lookup_elem(&cgroup_include, &id) != NULL;
	return true;
}

// Sampling: 0 = type off, 1 = all, N = one in N (per CPU).
static __always_inline bool sampled(__u32 kind)
{
	__u64 every = cfg(CFG_SAMPLE_BASE + kind);
	if (every == 0)
		return false;
	if (every == 1)
		return true;
	__u64 *ctr = bpf_map_lookup_elem(&sample_counters, &kind);
	if (!ctr)
		return true;
	__u64 n = (*ctr)++;
	return n % every == 0;
}

static __always_inline bool ignored_tgid(__u32 tgid)
{
	__u64 ignore = cfg(CFG_IGNORE_TGID);
	return ignore != 0 && ignore == tgid;
}

static __always_inline void count_drop(__u32 kind)
{
	__u64 *d = bpf_map_lookup_elem(&drops, &kind);
	if (d)
		__sync_fetch_and_add(d, 1);
}

static __always_inline void *reserve(__u64 size, __u32 kind)
{
	void *e = bpf_ringbuf_reserve(&events, size, 0);
	if (!e)
		count_drop(kind);
	return e;
}

// Batch wakeups: the collector polls the ring on a short timer, and is woken
// early only once CFG_WAKEUP_BYTES are waiting, instead of once per event.
static __always_inline void submit(void *e)
{
	__u64 threshold = cfg(CFG_WAKEUP_BYTES);
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, avail >= threshold ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

static __always_inline void stamp(struct hdr *h, __u32 kind)
{
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&seqs, &zero);
	h->kind = kind;
	h->cpu = bpf_get_smp_processor_id();
	// Atomic: a program interrupted on this CPU by another must not reuse a
	// sequence number (the id is derived from it, and the stream drops
	// duplicate ids).
	h->seq = seq ? __sync_fetch_and_add(seq, 1) : 0;
}

static __always_inline void fill_current(struct hdr *h)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	h->ts_ns = bpf_ktime_get_ns();
	h->cgroup_id = bpf_get_current_cgroup_id();
	h->pid = (__u32)pid_tgid;
	h->tgid = pid_tgid >> 32;
	h->ppid = BPF_CORE_READ(task, real_parent, tgid);
	h->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

static __always_inline void fill_task(struct hdr *h, struct task_struct *task)
{
	h->ts_ns = bpf_ktime_get_ns();
	h->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	h->pid = BPF_CORE_READ(task, pid);
	h->tgid = BPF_CORE_READ(task, tgid);
	h->ppid = BPF_CORE_READ(task, real_parent, tgid);
	h->uid = BPF_CORE_READ(task, cred, uid.val);
	BPF_CORE_READ_STR_INTO(&h->comm, task, comm);
}

// Current-task events: filter (own pid, cgroup, sampling) before reserving.
static __always_inline bool want_current(__u32 kind)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (ignored_tgid(tgid))
		return false;
	if (!current_cgroup_allowed())
		return false;
	return sampled(kind);
}

SEC("tracepoint/sched/sched_process_exec")
int tw_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	if (!want_current(K_EXEC))
		return 0;
	struct exec_event *e = reserve(sizeof(*e), K_EXEC);
	if (!e)
		return 0;
	stamp(&e->h, K_EXEC);
	fill_current(&e->h);

	unsigned int off = ctx->__data_loc_filename & 0xFFFF;
	long n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)ctx + off);
	e->filename_len = n > 0 ? n - 1 : 0;

	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	unsigned long start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long end = BPF_CORE_READ(task, mm, arg_end);
	__u64 len = end > start ? end - start : 0;
	e->args_truncated = 0;
	if (len > ARGS_SIZE) {
		len = ARGS_SIZE;
		e->args_truncated = 1;
	}
	e->args_len = 0;
	if (len > 0 && bpf_probe_read_user(e->args, len, (void *)start) == 0)
		e->args_len = len;
	submit(e);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int tw_exit(struct trace_event_raw_sched_process_template *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	// One event per process: when its thread-group leader exits.
	if ((__u32)pid_tgid != (__u32)(pid_tgid >> 32))
		return 0;
	if (!want_current(K_EXIT))
		return 0;
	struct exit_event *e = reserve(sizeof(*e), K_EXIT);
	if (!e)
		return 0;
	stamp(&e->h, K_EXIT);
	fill_current(&e->h);
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	e->exit_code = BPF_CORE_READ(task, exit_code);
	e->_pad = 0;
	__u64 start = BPF_CORE_READ(task, start_time);
	e->runtime_ns = e->h.ts_ns > start ? e->h.ts_ns - start : 0;
	submit(e);
	return 0;
}

// The raw tracepoint oom/mark_victim passes the victim task (kernel >= 6.8:
// TP_PROTO(struct task_struct *task, uid_t uid)). A raw tracepoint needs
// neither kprobes nor BPF trampolines, which some kernels lack.
SEC("raw_tracepoint/mark_victim")
int tw_oom_kill(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *victim = (struct task_struct *)ctx->args[0];
	if (!victim)
		return 0;
	__u32 tgid = BPF_CORE_READ(victim, tgid);
	if (ignored_tgid(tgid))
		return 0;
	__u64 cgid = BPF_CORE_READ(victim, cgroups, dfl_cgrp, kn, id);
	if (!cgroup_id_allowed(cgid) || !sampled(K_OOM))
		return 0;
	struct oom_event *e = reserve(sizeof(*e), K_OOM);
	if (!e)
		return 0;
	stamp(&e->h, K_OOM);
	fill_task(&e->h, victim);
	// The victim's memory cgroup limit (v1 and v2 share the page counter);
	// css is the first member of struct mem_cgroup.
	struct cgroup_subsys_state *css = BPF_CORE_READ(victim, cgroups, subsys[memory_cgrp_id]);
	struct mem_cgroup *memcg = (struct mem_cgroup *)css;
	e->total_pages = memcg ? BPF_CORE_READ(memcg, memory.max) : 0;
	e->memcg = memcg != NULL;
	struct mm_struct *mm = BPF_CORE_READ(victim, mm);
	__u64 rss = 0;
	if (mm) {
		// Approximate (the per-CPU deltas are not summed), like /proc's fast path.
		rss += BPF_CORE_READ(mm, rss_stat[0].count);
		rss += BPF_CORE_READ(mm, rss_stat[1].count);
		rss += BPF_CORE_READ(mm, rss_stat[3].count);
	}
	e->rss_pages = (__s64)rss < 0 ? 0 : rss;
	e->_pad = 0;
	submit(e);
	return 0;
}

// Copy a tracepoint's addresses (from a stack copy of its context).
#define COPY_ADDRS(ctx, dst_s_, dst_d_)                                      \
	do {                                                                  \
		__builtin_memset(dst_s_, 0, 16);                               \
		__builtin_memset(dst_d_, 0, 16);                               \
		if ((ctx)->family == AF_INET6_) {                             \
			_Pragma("unroll") for (int i_ = 0; i_ < 16; i_++) {   \
				(dst_s_)[i_] = (ctx)->saddr_v6[i_];            \
				(dst_d_)[i_] = (ctx)->daddr_v6[i_];            \
			}                                                     \
		} else {                                                      \
			_Pragma("unroll") for (int i_ = 0; i_ < 4; i_++) {    \
				(dst_s_)[i_] = (ctx)->saddr[i_];               \
				(dst_d_)[i_] = (ctx)->daddr[i_];               \
			}                                                     \
		}                                                             \
	} while (0)

static __always_inline void emit_tcp(__u32 kind, struct hdr *owner, __u16 family, __u16 sport,
				     __u16 dport, const __u8 *saddr, const __u8 *daddr,
				     __u64 duration, struct sock *sk)
{
	if (ignored_tgid(owner->tgid) || !cgroup_id_allowed(owner->cgroup_id) || !sampled(kind))
		return;
	struct tcp_event *e = reserve(sizeof(*e), kind);
	if (!e)
		return;
	e->h = *owner;
	stamp(&e->h, kind);
	e->h.ts_ns = bpf_ktime_get_ns();
	e->family = family == AF_INET6_ ? 6 : 4;
	e->sport = sport;
	e->dport = dport;
	e->_pad = 0;
	__builtin_memcpy(e->saddr, saddr, 16);
	__builtin_memcpy(e->daddr, daddr, 16);
	e->duration_ns = duration;
	e->retransmits = 0;
	e->_pad2 = 0;
	e->bytes_sent = 0;
	e->bytes_received = 0;
	if (sk) {
		// Payload octets (RFC 4898): bytes_sent counts retransmissions too;
		// bytes_received advances with rcv_nxt, which a received FIN bumps
		// by one (tcp_fin() also sets SOCK_DONE, so subtract it then).
		struct tcp_sock *tp = (struct tcp_sock *)sk;
		e->bytes_sent = BPF_CORE_READ(tp, bytes_sent);
		__u64 received = BPF_CORE_READ(tp, bytes_received);
		unsigned long flags = BPF_CORE_READ(sk, __sk_common.skc_flags);
		if ((flags & (1UL << SOCK_DONE)) && received > 0)
			received--;
		e->bytes_received = received;
	}
	submit(e);
}

SEC("tracepoint/sock/inet_sock_set_state")
int tw_tcp_state(struct trace_event_raw_inet_sock_set_state *raw)
{
	// Work on a stack copy: the verifier refuses loads through a modified ctx pointer.
	struct trace_event_raw_inet_sock_set_state copy;
	if (bpf_probe_read_kernel(&copy, sizeof(copy), raw) != 0)
		return 0;
	struct trace_event_raw_inet_sock_set_state *ctx = &copy;
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	__u64 sk_key = (__u64)ctx->skaddr;
	int olds = ctx->oldstate, news = ctx->newstate;
	__u8 saddr[16], daddr[16];

	if (news == TCP_LISTEN_) {
		// listen(): process context; accepted connections are attributed to it.
		struct conn l = {};
		fill_current(&l.owner);
		__u32 lkey = ((__u32)ctx->family << 16) | ctx->sport;
		bpf_map_update_elem(&listeners, &lkey, &l, BPF_ANY);
		return 0;
	}
	if (olds == TCP_LISTEN_ && news == TCP_CLOSE_) {
		__u32 lkey = ((__u32)ctx->family << 16) | ctx->sport;
		bpf_map_delete_elem(&listeners, &lkey);
		return 0;
	}
	if (olds == TCP_SYN_RECV_ && news == TCP_ESTABLISHED_) {
		// The child socket of a listener completed the handshake (softirq):
		// attribute it to the process that listens on the port.
		__u32 lkey = ((__u32)ctx->family << 16) | ctx->sport;
		struct conn *l = bpf_map_lookup_elem(&listeners, &lkey);
		if (!l)
			return 0;
		struct conn c = *l;
		c.owner.ts_ns = bpf_ktime_get_ns();
		bpf_map_update_elem(&conns, &sk_key, &c, BPF_ANY);
		COPY_ADDRS(ctx, saddr, daddr);
		struct hdr owner = c.owner;
		emit_tcp(K_TCP_ACCEPT, &owner, ctx->family, ctx->sport, ctx->dport, saddr, daddr, 0, NULL);
		return 0;
	}
	if (news == TCP_SYN_SENT_) {
		// connect(): process context, remember who is connecting.
		struct conn c = {};
		fill_current(&c.owner);
		c.owner.ts_ns = 0;
		bpf_map_update_elem(&conns, &sk_key, &c, BPF_ANY);
		return 0;
	}
	struct conn *c = bpf_map_lookup_elem(&conns, &sk_key);
	if (!c)
		return 0;
	COPY_ADDRS(ctx, saddr, daddr);
	__u64 now = bpf_ktime_get_ns();
	if (olds == TCP_SYN_SENT_ && news == TCP_ESTABLISHED_) {
		c->owner.ts_ns = now;
		struct hdr owner = c->owner;
		emit_tcp(K_TCP_CONNECT, &owner, ctx->family, ctx->sport, ctx->dport, saddr, daddr, 0, NULL);
		return 0;
	}
	if (news != TCP_CLOSE_)
		return 0;
	struct hdr owner = c->owner;
	bpf_map_delete_elem(&conns, &sk_key);
	struct sock *sk = (struct sock *)ctx->skaddr;
	int err = BPF_CORE_READ(sk, sk_err);
	if (olds == TCP_SYN_SENT_) {
		if (err == ECONNREFUSED_)
			emit_tcp(K_TCP_REFUSED, &owner, ctx->family, ctx->sport, ctx->dport, saddr, daddr, 0, NULL);
		else if (err == ETIMEDOUT_)
			emit_tcp(K_TCP_TIMEOUT, &owner, ctx->family, ctx->sport, ctx->dport, saddr, daddr, 0, NULL);
		return 0;
	}
	if (owner.ts_ns == 0)
		return 0;
	__u64 duration = now - owner.ts_ns;
	__u32 kind = err == ECONNRESET_ ? K_TCP_RESET : K_TCP_CLOSE;
	emit_tcp(kind, &owner, ctx->family, ctx->sport, ctx->dport, saddr, daddr, duration, sk);
	return 0;
}

// Retransmits are counted per connection in a map the collector drains on
// an interval, so a retransmit storm costs map updates, not ring space.
SEC("tracepoint/tcp/tcp_retransmit_skb")
int tw_retransmit(struct trace_event_raw_tcp_retransmit_skb *raw)
{
	struct trace_event_raw_tcp_retransmit_skb copy;
	if (bpf_probe_read_kernel(&copy, sizeof(copy), raw) != 0)
		return 0;
	struct trace_event_raw_tcp_retransmit_skb *ctx = &copy;
	__u64 sk_key = (__u64)ctx->skaddr;
	struct retrans *r = bpf_map_lookup_elem(&retransmits, &sk_key);
	if (r) {
		__sync_fetch_and_add(&r->count, 1);
		return 0;
	}
	struct retrans fresh = {};
	struct conn *c = bpf_map_lookup_elem(&conns, &sk_key);
	if (c)
		fresh.owner = c->owner;
	if (ignored_tgid(fresh.owner.tgid) || !cgroup_id_allowed(fresh.owner.cgroup_id) ||
	    cfg(CFG_SAMPLE_BASE + K_TCP_RETRANSMIT) == 0)
		return 0;
	fresh.owner.kind = K_TCP_RETRANSMIT;
	fresh.owner.ts_ns = bpf_ktime_get_ns();
	fresh.family = ctx->family == AF_INET6_ ? 6 : 4;
	fresh.sport = ctx->sport;
	fresh.dport = ctx->dport;
	COPY_ADDRS(ctx, fresh.saddr, fresh.daddr);
	fresh.count = 1;
	if (bpf_map_update_elem(&retransmits, &sk_key, &fresh, BPF_NOEXIST) != 0) {
		r = bpf_map_lookup_elem(&retransmits, &sk_key);
		if (r)
			__sync_fetch_and_add(&r->count, 1);
	}
	return 0;
}
