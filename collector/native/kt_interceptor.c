/*
 * keytrace's librdkafka interceptor plugin.
 *
 * Loaded by librdkafka through `plugin.library.paths`. Every produced,
 * acknowledged, failed and consumed message is appended as one fixed-size
 * record (plus its key in a byte arena) to a bounded per-client buffer.
 * kt_drain_columns swaps that buffer out and lays the records out as Arrow
 * column buffers, which Python wraps without copying (__init__.py here).
 *
 * The plugin has no link-time dependency on librdkafka: confluent-kafka loads
 * its bundled copy with RTLD_LOCAL, so its symbols are not visible here. Python
 * hands over the addresses of the few functions used (kt_bind) before any
 * client is created. The types below mirror rdkafka.h (stable public ABI).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define KT_ABI 7
#define KT_EXPORT __attribute__((visibility("default")))
/* Loops over whole columns in the drain: let the compiler use vector instructions (-O2 barely does). */
#if defined(__GNUC__) && !defined(__clang__)
#define KT_VECTOR __attribute__((optimize("tree-vectorize")))
#else
#define KT_VECTOR
#endif

typedef struct rd_kafka_s rd_kafka_t;
typedef struct rd_kafka_conf_s rd_kafka_conf_t;
typedef struct rd_kafka_topic_s rd_kafka_topic_t;
typedef struct rd_kafka_topic_partition_list_s rd_kafka_topic_partition_list_t;
typedef int rd_kafka_resp_err_t;
typedef int rd_kafka_conf_res_t;
#define RD_KAFKA_CONF_UNKNOWN (-2)
#define RD_KAFKA_CONF_INVALID (-1)
#define RD_KAFKA_CONF_OK 0
#define RD_KAFKA_RESP_ERR__FAIL (-196)

typedef struct rd_kafka_message_s {
    rd_kafka_resp_err_t err;
    rd_kafka_topic_t *rkt;
    int32_t partition;
    void *payload;
    size_t len;
    void *key;
    size_t key_len;
    int64_t offset;
    void *_private;
} rd_kafka_message_t;

typedef rd_kafka_conf_res_t(on_conf_set_t)(rd_kafka_conf_t *, const char *, const char *, char *, size_t, void *);
typedef rd_kafka_resp_err_t(on_conf_dup_t)(rd_kafka_conf_t *, const rd_kafka_conf_t *, size_t, const char **, void *);
typedef rd_kafka_resp_err_t(on_conf_destroy_t)(void *);
typedef rd_kafka_resp_err_t(on_new_t)(rd_kafka_t *, const rd_kafka_conf_t *, void *, char *, size_t);
typedef rd_kafka_resp_err_t(on_message_t)(rd_kafka_t *, rd_kafka_message_t *, void *);

/* Filled by kt_bind, in this order. */
static struct {
    rd_kafka_resp_err_t (*conf_add_on_conf_set)(rd_kafka_conf_t *, const char *, on_conf_set_t *, void *);
    rd_kafka_resp_err_t (*conf_add_on_conf_dup)(rd_kafka_conf_t *, const char *, on_conf_dup_t *, void *);
    rd_kafka_resp_err_t (*conf_add_on_conf_destroy)(rd_kafka_conf_t *, const char *, on_conf_destroy_t *, void *);
    rd_kafka_resp_err_t (*conf_add_on_new)(rd_kafka_conf_t *, const char *, on_new_t *, void *);
    rd_kafka_resp_err_t (*add_on_send)(rd_kafka_t *, const char *, on_message_t *, void *);
    rd_kafka_resp_err_t (*add_on_acknowledgement)(rd_kafka_t *, const char *, on_message_t *, void *);
    rd_kafka_resp_err_t (*add_on_consume)(rd_kafka_t *, const char *, on_message_t *, void *);
    const char *(*topic_name)(const rd_kafka_topic_t *);
    int64_t (*message_latency)(const rd_kafka_message_t *);
    int64_t (*message_timestamp)(const rd_kafka_message_t *, int *);
    const char *(*err2name)(rd_kafka_resp_err_t);
    const char *(*err2str)(rd_kafka_resp_err_t);
} api;
static int api_bound;

enum { KT_SEND = 0, KT_ACK = 1, KT_ERROR = 2, KT_CONSUME = 3 };

#define KT_MAX_KEY 65536
#define KT_MAX_TOPICS 4096
#define KT_NAME "keytrace"

/* One event. */
typedef struct {
    int64_t ts_us; /* a TSC reading when use_tsc (converted by the drain), else wall-clock us */
    int64_t offset;
    int64_t latency_us;
    int64_t msg_ts_ms;
    uint32_t key_off;
    int32_t key_len; /* -1: null key */
    int32_t partition;
    int32_t err;
    int32_t value_len; /* -1: null value */
    int16_t topic;     /* -1: unknown (too many topics) */
    uint8_t kind;
    uint8_t pad;
} kt_rec;

/* A reading of both clocks, the TSC and the wall clock, taken together. */
typedef struct {
    uint64_t tsc;
    int64_t us;
} kt_anchor;

typedef struct {
    kt_rec *recs;
    char *arena;
    uint32_t n;
    uint32_t arena_len;
    uint32_t touched_recs; /* prefix already written once, so its pages are resident */
    uint32_t touched_arena;
    uint64_t err_name_len; /* bytes of the error names and messages of this buffer's errors */
    uint64_t err_msg_len;
    kt_anchor since; /* the clock when this buffer became the one appended to */
} kt_buf;

/*
 * A lane is a pair of buffers (one filled, one being drained) under one lock.
 * Sends are appended by the application's thread, acknowledgements by librdkafka's
 * broker threads: giving each its own lane keeps them from contending for a lock.
 */
typedef struct {
    volatile int lock; /* lane_lock */
    volatile int busy; /* the send lane's writer is appending, in single-writer mode (below) */
    kt_buf bufs[2];
    int active;
    uint64_t recorded; /* written by the appender, read by drains: relaxed atomics */
    uint64_t dropped;
    const rd_kafka_topic_t *last_rkt; /* topic_index's cache */
    int last_topic;
} kt_lane;

enum { LANE_SEND = 0, LANE_REPORT = 1, KT_LANES = 2 };

/*
 * A lane's lock. An append holds it for a few dozen ns, and the drain's swap for less, so
 * a waiter spins (then yields the CPU, in case the holder was preempted) rather than sleep.
 * Its release is a plain store. A pthread mutex releases with a locked instruction, which
 * waits until the append's own writes have reached the cache; those writes mostly miss (a
 * buffer line is written once), so that wait was a large part of what an append cost the
 * application's thread (bench/bench_record_cost.py, docs/BENCHMARKS.md). A plain store
 * with release order still publishes the append to the next holder, on x86 and elsewhere.
 */
#define KT_LOCK_SPINS 200

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* One step of waiting for another thread: spin a while, then yield in case it was preempted. */
static inline void backoff(int *spins) {
    if (++*spins < KT_LOCK_SPINS) {
        cpu_relax();
    } else {
        sched_yield();
        *spins = 0;
    }
}

static inline void lane_lock(kt_lane *lane) {
    int spins = 0;
    while (__atomic_exchange_n(&lane->lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&lane->lock, __ATOMIC_RELAXED))
            backoff(&spins);
}

static inline void lane_unlock(kt_lane *lane) { __atomic_store_n(&lane->lock, 0, __ATOMIC_RELEASE); }

/*
 * Single-writer mode for the send lane. Its appends come from produce(), which
 * confluent-kafka calls with the GIL held, so two of them never overlap. The lane then
 * needs no lock on the application's side: even a spin lock's acquire is a locked
 * instruction, which waits for the previous append's writes (cache misses, mostly) to
 * land, and that wait was a third of what an append cost (docs/NATIVE.md). What is left
 * to order is the drain's swap against an append in flight, an asymmetric handshake:
 *
 *   append: busy = 1; (compiler barrier) b = bufs[active]; ...append to b...; busy = 0 (release)
 *   swap:   active ^= 1 (release); membarrier(); wait until busy == 0
 *
 * membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) runs a full memory barrier on every CPU
 * running a thread of this process, so after it either the appender's `busy = 1` is
 * visible to the swap, or its read of `active` comes after the swap's write: an append
 * still using the old buffer is always waited for. The barrier is the drain's (a
 * syscall a few times a second), not the application's.
 *
 * kt_single_writer(1), called from Python before any client exists, turns it on when
 * the interpreter has a GIL and the kernel offers that membarrier; otherwise the send
 * lane keeps its lock.
 */
static int single_writer;

#if defined(__linux__) && defined(__NR_membarrier)
static int membarrier_call(int cmd) { return (int)syscall(__NR_membarrier, cmd, 0, 0); }
#endif

KT_EXPORT int kt_single_writer(int want) {
#if defined(__linux__) && defined(__NR_membarrier)
    /* The registration is the process's, and a forked child keeps it (Linux resets it on exec). */
    if (want && !single_writer) {
        int cmds = membarrier_call(MEMBARRIER_CMD_QUERY);
        if (cmds > 0 && (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
            membarrier_call(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0)
            single_writer = 1;
    }
#else
    (void)want;
#endif
    return single_writer;
}

static inline int lock_free(int lane_id) { return lane_id == LANE_SEND && single_writer; }

static int64_t barrier_failures; /* membarrier calls refused (none expected): kt_barrier_failures */

KT_EXPORT int64_t kt_barrier_failures(void) { return __atomic_load_n(&barrier_failures, __ATOMIC_RELAXED); }

/* After a single-writer lane's `active` changed: wait out an append still on the old buffer. */
static void quiesce(kt_lane *lane) {
    int spins = 0;
#if defined(__linux__) && defined(__NR_membarrier)
    if (membarrier_call(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0)
        __atomic_add_fetch(&barrier_failures, 1, __ATOMIC_RELAXED);
#endif
    while (__atomic_load_n(&lane->busy, __ATOMIC_ACQUIRE))
        backoff(&spins);
}

/* Tests only (kt_test_append_spin): every 64th append pauses this long between taking its
   slot and writing it, so that a test can catch a drain swapping the buffer under an append. */
static volatile uint32_t test_append_spin_ns;

KT_EXPORT void kt_test_append_spin(uint32_t ns) { test_append_spin_ns = ns; }

static void spin_ns(uint32_t ns) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do
        clock_gettime(CLOCK_MONOTONIC, &b);
    while ((b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec) < (long long)ns);
}

static inline void counter_add(uint64_t *c, uint64_t v) {
    __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

typedef struct kt_inst {
    struct kt_inst *next;
    uint64_t src;
    kt_lane lanes[KT_LANES];
    uint32_t max_records; /* per lane buffer */
    uint32_t max_arena;
    int live;      /* client handles still using this instance */
    int forgotten; /* Python is done with it: free when live drops to 0 */
    /* Topic names, append-only (under topics_mu): readers scan the first ntopics without a lock. */
    pthread_mutex_t topics_mu;
    char *topics[KT_MAX_TOPICS];
    volatile int ntopics;
    volatile int topics_incomplete; /* a send's topic could not be registered (see topic_of) */
} kt_inst;

typedef struct {
    uint64_t src;
    int has_src;
    uint32_t max_records;
    uint32_t max_arena;
    kt_inst *inst;
} kt_conf;

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static kt_inst *registry;

#define KT_DEFAULT_RECORDS (1u << 20)
#define KT_DEFAULT_ARENA (32u << 20)

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/*
 * Event times. Reading the wall clock costs about 31 ns here (clock_gettime through the
 * vDSO, which itself reads the TSC, then scales it under a seqlock); reading the TSC alone
 * about half that, and every message is stamped twice (send and acknowledgement). So
 * where the kernel itself keeps time with the TSC (clocksource "tsc", which it only
 * chooses for an invariant TSC synchronised across CPUs), records hold raw TSC readings,
 * and the drain converts them to wall-clock microseconds by interpolating between two
 * readings of both clocks: one taken when the buffer started filling, one at the drain.
 * Elsewhere (another clocksource, another architecture) records hold wall-clock us.
 */
static int use_tsc;

static inline uint64_t tsc_now(void) {
#if defined(__x86_64__)
    return __builtin_ia32_rdtsc();
#else
    return 0;
#endif
}

static inline int64_t stamp(void) { return use_tsc ? (int64_t)tsc_now() : now_us(); }

static kt_anchor anchor_now(void) {
    kt_anchor a;
    a.tsc = tsc_now();
    a.us = now_us();
    return a;
}

static int detect_tsc(void) {
#if defined(__x86_64__)
    char name[32] = {0};
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    const char *env = getenv("KEYTRACE_NATIVE_CLOCK");
    if (env && !strcmp(env, "realtime"))
        return 0;
    if (!f)
        return 0;
    if (!fgets(name, sizeof(name), f))
        name[0] = 0;
    fclose(f);
    return !strcmp(name, "tsc\n") || !strcmp(name, "tsc");
#else
    return 0;
#endif
}

/*
 * Wall-clock us of a record's stamp, in a buffer that started filling at anchor a and was
 * drained at b: a straight line through the two anchors. Its error is that of the anchors
 * (the two clocks are read some tens of ns apart), however long or short the interval.
 */
static double us_per_tick(const kt_anchor *a, const kt_anchor *b) {
    int64_t ticks = (int64_t)(b->tsc - a->tsc);
    return ticks > 0 ? (double)(b->us - a->us) / (double)ticks : 0.0;
}

static inline int64_t stamp_us(int64_t t, const kt_anchor *a, double rate) {
    double x;
    if (!use_tsc)
        return t;
    x = (double)(int64_t)((uint64_t)t - a->tsc) * rate;
    return a->us + (int64_t)(x >= 0 ? x + 0.5 : x - 0.5);
}

static int topic_find(kt_inst *in, const char *name, int from, int n) {
    int i;
    for (i = from; i < n; i++)
        if (!strcmp(in->topics[i], name))
            return i;
    return -1;
}

/* Called with the lane's lock held. */
static int topic_index(kt_inst *in, kt_lane *lane, const rd_kafka_topic_t *rkt) {
    const char *name = rkt ? api.topic_name(rkt) : NULL;
    int i, n = __atomic_load_n(&in->ntopics, __ATOMIC_ACQUIRE);
    if (!name)
        return -1;
    /* A freed topic handle's address can be reused for another topic, so the cache checks the name too. */
    if (rkt == lane->last_rkt && !strcmp(in->topics[lane->last_topic], name))
        return lane->last_topic;
    i = topic_find(in, name, 0, n);
    if (i < 0) {
        pthread_mutex_lock(&in->topics_mu);
        i = topic_find(in, name, n, in->ntopics); /* the other lane may have just added it */
        if (i < 0) {
            n = in->ntopics;
            if (n < KT_MAX_TOPICS && (in->topics[n] = strdup(name))) {
                i = n;
                __atomic_store_n(&in->ntopics, n + 1, __ATOMIC_RELEASE);
            }
        }
        pthread_mutex_unlock(&in->topics_mu);
        if (i < 0) {
            __atomic_store_n(&in->topics_incomplete, 1, __ATOMIC_RELAXED);
            return -1;
        }
    }
    lane->last_rkt = rkt;
    lane->last_topic = i;
    return i;
}

/*
 * Every acknowledged message went through on_send first, which registered its topic (the
 * message is handed from the producing thread to the broker thread through librdkafka's
 * locked queues, so that registration is visible here). So while the client has sent to
 * a single topic, an acknowledgement's topic is that one, without reading the topic handle
 * (memory last touched by another thread, and the costliest part of finding the index).
 */
static inline int topic_of(kt_inst *in, kt_lane *lane, int kind, const rd_kafka_topic_t *rkt) {
    if (!rkt)
        return -1;
    if ((kind == KT_ACK || kind == KT_ERROR) && __atomic_load_n(&in->ntopics, __ATOMIC_ACQUIRE) == 1 &&
        !__atomic_load_n(&in->topics_incomplete, __ATOMIC_RELAXED))
        return 0;
    return topic_index(in, lane, rkt);
}

/*
 * A record's first write to a buffer line misses the cache (the drain wrote the line last,
 * on another core, or it was evicted since), and the next locked instruction of that
 * thread (the next lane_lock, or one of librdkafka's) waits for those writes to complete.
 * So each record asks for the lines of a later record and of later key bytes, for
 * writing; they arrive while the application goes on, and are in this core's cache when
 * that record is written (bench/bench_record_cost.py, docs/BENCHMARKS.md). A prefetch
 * never faults, so asking past the end of a buffer is harmless.
 */
#define KT_PREFETCH_RECORDS 8
#define KT_PREFETCH_KEY_BYTES 256

static inline void prefetch_for_write(const void *p) {
#if defined(__x86_64__)
    __asm__ volatile("prefetchw %0" ::"m"(*(const char *)p)); /* a NOP where the CPU lacks it */
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

static void record(kt_inst *in, int kind, const rd_kafka_message_t *m) {
    int64_t ts = stamp();
    int64_t latency = -1, msg_ts = -1;
    int32_t key_len = m->key ? (int32_t)(m->key_len > KT_MAX_KEY ? KT_MAX_KEY : m->key_len) : -1;
    int tstype = 0;
    int lane_id = kind == KT_SEND ? LANE_SEND : LANE_REPORT, free_of_lock = lock_free(lane_id);
    kt_lane *lane = &in->lanes[lane_id];
    kt_buf *b;
    kt_rec *r;

    if (kind == KT_ACK || kind == KT_ERROR)
        latency = api.message_latency(m);
    if (kind != KT_SEND) /* a send's timestamp is its creation time: ts, to the microsecond */
        msg_ts = api.message_timestamp(m, &tstype);

    if (free_of_lock) {
        __atomic_store_n(&lane->busy, 1, __ATOMIC_RELAXED);
        __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the CPU's side of this is the swap's membarrier */
    } else {
        lane_lock(lane);
    }
    b = &lane->bufs[__atomic_load_n(&lane->active, __ATOMIC_ACQUIRE)];
    if (b->n >= in->max_records || (key_len > 0 && (uint64_t)b->arena_len + (uint32_t)key_len > in->max_arena)) {
        counter_add(&lane->dropped, 1);
        goto done;
    }
    r = &b->recs[b->n++];
    if (__builtin_expect(test_append_spin_ns != 0, 0) && (b->n & 63) == 0)
        spin_ns(test_append_spin_ns);
    prefetch_for_write(r + KT_PREFETCH_RECORDS);
    prefetch_for_write(b->arena + b->arena_len + KT_PREFETCH_KEY_BYTES);
    r->ts_us = ts;
    r->offset = m->offset;
    r->latency_us = latency;
    r->msg_ts_ms = msg_ts;
    r->key_off = b->arena_len;
    r->key_len = key_len;
    r->partition = m->partition;
    r->err = m->err;
    r->value_len = m->payload ? (int32_t)(m->len > INT32_MAX ? INT32_MAX : m->len) : -1;
    r->topic = (int16_t)topic_of(in, lane, kind, m->rkt);
    r->kind = (uint8_t)kind;
    r->pad = 0;
    if (key_len > 0) {
        memcpy(b->arena + b->arena_len, m->key, (size_t)key_len);
        b->arena_len += (uint32_t)key_len;
    }
    if (kind == KT_ERROR) {
        b->err_name_len += strlen(api.err2name(m->err));
        b->err_msg_len += strlen(api.err2str(m->err));
    }
    counter_add(&lane->recorded, 1);
done:
    if (free_of_lock)
        __atomic_store_n(&lane->busy, 0, __ATOMIC_RELEASE);
    else
        lane_unlock(lane);
}

static rd_kafka_resp_err_t on_send(rd_kafka_t *rk, rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    record((kt_inst *)opaque, KT_SEND, m);
    return 0;
}

static rd_kafka_resp_err_t on_acknowledgement(rd_kafka_t *rk, rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    record((kt_inst *)opaque, m->err ? KT_ERROR : KT_ACK, m);
    return 0;
}

static rd_kafka_resp_err_t on_consume(rd_kafka_t *rk, rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    /* Errors passed as messages (partition EOF and the like) are not consumptions. */
    if (!m->err)
        record((kt_inst *)opaque, KT_CONSUME, m);
    return 0;
}

/*
 * Writing a fresh page costs a page fault (microseconds in a VM). Pages are
 * touched ahead of need, outside the hot path, by whoever owns the buffer:
 * its creator, or the drain after the buffer has been emptied.
 */
#define KT_PREFAULT_RECORDS 16384u
#define KT_PREFAULT_ARENA (256u << 10)

static void prefault(kt_buf *b, uint64_t recs, uint64_t arena, const kt_inst *in) {
    if (recs > in->max_records)
        recs = in->max_records;
    if (arena > in->max_arena)
        arena = in->max_arena;
    if (recs > b->touched_recs) {
        memset(b->recs + b->touched_recs, 0, (recs - b->touched_recs) * sizeof(kt_rec));
        b->touched_recs = (uint32_t)recs;
    }
    if (arena > b->touched_arena) {
        memset(b->arena + b->touched_arena, 0, arena - b->touched_arena);
        b->touched_arena = (uint32_t)arena;
    }
}

/*
 * The lane buffers of the last freed instance, kept for the next one with the same
 * bounds: their written pages stay resident, so a client that replaces another (a
 * producer per job, per test, per request) does not pay the page faults again.
 * Only pages that were written are resident; at most one instance's set is kept.
 */
static pthread_mutex_t stash_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    int full;
    uint32_t max_records, max_arena;
    kt_buf bufs[KT_LANES][2];
} stash;

static void buf_release(kt_buf *b) {
    free(b->recs);
    free(b->arena);
    b->recs = NULL, b->arena = NULL;
}

/* Resident memory a stash may hold: a client that was busier than this frees its buffers at the end. */
#define KT_STASH_MAX_BYTES (128u << 20)

/* Give the instance's buffers to the stash, in place of what it held; called when the instance is freed. */
static void bufs_put(kt_inst *in) {
    int i, l, complete = 1, had = 0;
    uint64_t resident = 0;
    kt_buf old[KT_LANES][2];
    for (l = 0; l < KT_LANES; l++)
        for (i = 0; i < 2; i++) {
            const kt_buf *b = &in->lanes[l].bufs[i];
            complete &= b->recs && b->arena;
            resident += (uint64_t)b->touched_recs * sizeof(kt_rec) + b->touched_arena;
        }
    if (!complete || resident > KT_STASH_MAX_BYTES) { /* a failed creation, or too much to hold on to */
        for (l = 0; l < KT_LANES; l++)
            for (i = 0; i < 2; i++)
                buf_release(&in->lanes[l].bufs[i]);
        return;
    }
    pthread_mutex_lock(&stash_mu);
    if ((had = stash.full))
        memcpy(old, stash.bufs, sizeof(old));
    stash.full = 1;
    stash.max_records = in->max_records, stash.max_arena = in->max_arena;
    for (l = 0; l < KT_LANES; l++)
        for (i = 0; i < 2; i++)
            stash.bufs[l][i] = in->lanes[l].bufs[i];
    pthread_mutex_unlock(&stash_mu);
    if (had) /* the most recently freed client is the likelier match for the next one */
        for (l = 0; l < KT_LANES; l++)
            for (i = 0; i < 2; i++)
                buf_release(&old[l][i]);
}

/* Take the stashed buffers if they fit these bounds; 0 if there are none. */
static int bufs_take(kt_inst *in) {
    int i, l, got = 0;
    kt_buf old[KT_LANES][2];
    pthread_mutex_lock(&stash_mu);
    if (stash.full && stash.max_records == in->max_records && stash.max_arena == in->max_arena) {
        for (l = 0; l < KT_LANES; l++)
            for (i = 0; i < 2; i++) {
                kt_buf *b = &in->lanes[l].bufs[i];
                *b = stash.bufs[l][i];
                b->n = 0, b->arena_len = 0, b->err_name_len = 0, b->err_msg_len = 0;
            }
        stash.full = 0, got = 1;
    } else if (stash.full) { /* bounds changed: the stash would never be used again by this one */
        memcpy(old, stash.bufs, sizeof(old));
        stash.full = 0, got = -1;
    }
    pthread_mutex_unlock(&stash_mu);
    if (got < 0) {
        for (l = 0; l < KT_LANES; l++)
            for (i = 0; i < 2; i++)
                buf_release(&old[l][i]);
        got = 0;
    }
    return got;
}

static void inst_free(kt_inst *in) {
    int i;
    bufs_put(in);
    for (i = 0; i < in->ntopics; i++)
        free(in->topics[i]);
    pthread_mutex_destroy(&in->topics_mu);
    free(in);
}

/* Called with registry_mu held. */
static kt_inst *inst_find(uint64_t src) {
    kt_inst *in;
    for (in = registry; in; in = in->next)
        if (in->src == src)
            return in;
    return NULL;
}

static void inst_unlink(kt_inst *in) {
    kt_inst **pp;
    for (pp = &registry; *pp; pp = &(*pp)->next)
        if (*pp == in) {
            *pp = in->next;
            return;
        }
}

static kt_inst *inst_acquire(const kt_conf *kc) {
    kt_inst *in;
    int i, l;
    pthread_mutex_lock(&registry_mu);
    in = inst_find(kc->src);
    if (in) {
        in->live++;
        in->forgotten = 0;
        pthread_mutex_unlock(&registry_mu);
        return in;
    }
    in = calloc(1, sizeof(*in));
    if (!in)
        goto fail;
    in->src = kc->src;
    in->max_records = kc->max_records;
    in->max_arena = kc->max_arena;
    pthread_mutex_init(&in->topics_mu, NULL);
    for (l = 0; l < KT_LANES; l++)
        in->lanes[l].last_topic = -1; /* and its lock 0: free */
    /* Untouched pages of these allocations are never made resident. */
    if (!bufs_take(in))
        for (l = 0; l < KT_LANES; l++)
            for (i = 0; i < 2; i++) {
                kt_buf *b = &in->lanes[l].bufs[i];
                b->recs = malloc((size_t)in->max_records * sizeof(kt_rec));
                b->arena = malloc(in->max_arena ? in->max_arena : 1);
                if (!b->recs || !b->arena) {
                    inst_free(in);
                    goto fail;
                }
                prefault(b, KT_PREFAULT_RECORDS, KT_PREFAULT_ARENA, in);
            }
    in->lanes[0].bufs[0].since = in->lanes[1].bufs[0].since = anchor_now(); /* active is 0 */
    in->live = 1;
    in->next = registry;
    registry = in;
    pthread_mutex_unlock(&registry_mu);
    return in;
fail:
    pthread_mutex_unlock(&registry_mu);
    return NULL;
}

static void inst_release(kt_inst *in) {
    pthread_mutex_lock(&registry_mu);
    if (--in->live <= 0 && in->forgotten) {
        inst_unlink(in);
        inst_free(in);
    }
    pthread_mutex_unlock(&registry_mu);
}

static rd_kafka_resp_err_t on_new(rd_kafka_t *rk, const rd_kafka_conf_t *conf, void *opaque, char *errstr,
                                  size_t errstr_size) {
    kt_conf *kc = opaque;
    kt_inst *in;
    (void)conf;
    if (!kc->has_src || kc->inst)
        return 0;
    in = inst_acquire(kc);
    if (!in) {
        snprintf(errstr, errstr_size, "keytrace: out of memory for the trace buffer");
        return RD_KAFKA_RESP_ERR__FAIL;
    }
    kc->inst = in;
    api.add_on_send(rk, KT_NAME, on_send, in);
    api.add_on_acknowledgement(rk, KT_NAME, on_acknowledgement, in);
    api.add_on_consume(rk, KT_NAME, on_consume, in);
    return 0;
}

static int parse_u64(const char *val, uint64_t *out) {
    char *end;
    unsigned long long v;
    if (!val || !*val || *val == '-')
        return -1;
    errno = 0;
    v = strtoull(val, &end, 10);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

static rd_kafka_conf_res_t on_conf_set(rd_kafka_conf_t *conf, const char *name, const char *val, char *errstr,
                                       size_t errstr_size, void *opaque) {
    kt_conf *kc = opaque;
    uint64_t v;
    (void)conf;
    if (strncmp(name, "keytrace.", 9))
        return RD_KAFKA_CONF_UNKNOWN;
    if (parse_u64(val, &v)) {
        snprintf(errstr, errstr_size, "%s: expected a non-negative integer, got \"%s\"", name, val ? val : "");
        return RD_KAFKA_CONF_INVALID;
    }
    if (!strcmp(name, "keytrace.src")) {
        kc->src = v;
        kc->has_src = 1;
    } else if (!strcmp(name, "keytrace.max.records") && v >= 1 && v <= (1u << 28)) {
        kc->max_records = (uint32_t)v;
    } else if (!strcmp(name, "keytrace.max.key.bytes") && v <= (1u << 30)) {
        kc->max_arena = (uint32_t)v;
    } else {
        snprintf(errstr, errstr_size, "unknown or out-of-range keytrace property %s=%s", name, val);
        return RD_KAFKA_CONF_INVALID;
    }
    return RD_KAFKA_CONF_OK;
}

static rd_kafka_resp_err_t conf_init0(rd_kafka_conf_t *conf);

static rd_kafka_resp_err_t on_conf_dup(rd_kafka_conf_t *new_conf, const rd_kafka_conf_t *old_conf, size_t filter_cnt,
                                       const char **filter, void *opaque) {
    (void)old_conf, (void)filter_cnt, (void)filter, (void)opaque;
    /* The copy gets its own state; librdkafka then replays keytrace.* settings into it. */
    return conf_init0(new_conf);
}

static rd_kafka_resp_err_t on_conf_destroy(void *opaque) {
    kt_conf *kc = opaque;
    /* For a client's own config this runs after its threads are joined: no callback can follow. */
    if (kc->inst)
        inst_release(kc->inst);
    free(kc);
    return 0;
}

static rd_kafka_resp_err_t conf_init0(rd_kafka_conf_t *conf) {
    kt_conf *kc = calloc(1, sizeof(*kc));
    if (!kc)
        return RD_KAFKA_RESP_ERR__FAIL;
    kc->max_records = KT_DEFAULT_RECORDS;
    kc->max_arena = KT_DEFAULT_ARENA;
    /* A config that already carries these interceptors (plugin loaded twice) rejects duplicates. */
    if (api.conf_add_on_conf_set(conf, KT_NAME, on_conf_set, kc)) {
        free(kc);
        return 0;
    }
    api.conf_add_on_conf_dup(conf, KT_NAME, on_conf_dup, kc);
    api.conf_add_on_conf_destroy(conf, KT_NAME, on_conf_destroy, kc);
    api.conf_add_on_new(conf, KT_NAME, on_new, kc);
    return 0;
}

KT_EXPORT rd_kafka_resp_err_t conf_init(rd_kafka_conf_t *conf, void **plug_opaquep, char *errstr,
                                        size_t errstr_size) {
    *plug_opaquep = NULL;
    if (!api_bound) {
        snprintf(errstr, errstr_size, "keytrace plugin: load it through collector.native (kt_bind was not called)");
        return RD_KAFKA_RESP_ERR__FAIL;
    }
    return conf_init0(conf);
}

/* ---- API for Python (ctypes) ---- */

KT_EXPORT int kt_abi(void) { return KT_ABI; }

/* 1 when records are stamped with the TSC (see use_tsc), 0 when with the wall clock. */
KT_EXPORT int kt_uses_tsc(void) { return use_tsc; }

KT_EXPORT int kt_bind(void *const *fns, int n) {
    if (n != (int)(sizeof(api) / sizeof(void *)))
        return -1;
    for (int i = 0; i < n; i++)
        if (!fns[i])
            return -1;
    memcpy(&api, fns, sizeof(api));
    use_tsc = detect_tsc();
    api_bound = 1;
    return 0;
}

/* Columns built by kt_drain_columns, in Arrow's memory layout. */
enum {
    C_SEQ,
    C_TS,
    C_KIND,
    C_TOPIC,
    C_PARTITION,
    C_OFFSET,
    C_KEY,
    C_VALUE_SIZE,
    C_ATTEMPT,
    C_LATENCY,
    C_MSG_TS,
    C_ERR_CODE,
    C_ERR_NAME,
    C_ERR_RETRIABLE,
    C_ERR_MESSAGE,
    KT_NCOLS
};

typedef struct {
    uint64_t off, len;
} kt_span;

/* Differences outside a narrowed column's range travel beside it (see delta_width). */
#define KT_MAX_PATCHES 1

typedef struct {
    void *block; /* one allocation holding every buffer; release with kt_free */
    uint64_t block_len;
    uint64_t n;
    uint64_t recorded;
    uint64_t dropped;
    int64_t live;
    int64_t null_count[KT_NCOLS];
    kt_span buf[KT_NCOLS][3]; /* validity bitmap, values (or int32 offsets), string data */
    /* kind is an int8 code (KT_SEND, KT_ACK, ...); topic an int16 index into the client's topic
       names, which follow: ntopics + 1 int32 offsets, then the characters (buf[C_TOPIC][2]). */
    uint64_t ntopics;
    kt_span topic_offsets;
    /* The wire encoding (see kt_delta): ts, offset, latency and msg_ts hold differences
       from the previous row, of width[c] bytes, starting from base[c]. key holds int32
       lengths; its bytes are all in the first row of a binary column with key_data_offsets. */
    int64_t base[KT_NCOLS];
    int64_t width[KT_NCOLS]; /* bytes per value of a narrowed column (delta or plain integer), else 0 */
    kt_span key_data_offsets;
    /* A narrowed delta column's difference that does not fit its width: stored as 0,
       its row and value given here. */
    int64_t npatch[KT_NCOLS];
    uint64_t patch_row[KT_NCOLS][KT_MAX_PATCHES];
    int64_t patch_val[KT_NCOLS][KT_MAX_PATCHES];
} kt_columns;


#define MSG_TS_PLAUSIBLE(ms) ((ms) > 100000000000LL) /* 0, -1 or a fixed mock time are not wall-clock times */

/*
 * Drained blocks come back through kt_free once Python is done with a batch.
 * Keeping a couple for the next drains spares the page faults of fresh memory,
 * which cost more than filling the block.
 */
#define KT_POOL 2
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    void *p;
    uint64_t size;
} pool[KT_POOL];

static void *block_alloc(uint64_t size, uint64_t *got) {
    void *p = NULL;
    int i;
    pthread_mutex_lock(&pool_mu);
    for (i = 0; i < KT_POOL; i++)
        if (pool[i].p && pool[i].size >= size && pool[i].size <= 4 * size + (1u << 20)) {
            p = pool[i].p, *got = pool[i].size;
            pool[i].p = NULL;
            break;
        }
    pthread_mutex_unlock(&pool_mu);
    size = (size + 63) & ~(uint64_t)63;
    if (!p && (p = aligned_alloc(64, size ? size : 64)))
        *got = size;
    return p;
}

static uint64_t popcount(const uint8_t *bits, uint64_t n) {
    uint64_t i, cnt = 0, word;
    for (i = 0; i + 8 <= (n + 7) / 8; i += 8) {
        memcpy(&word, bits + i, 8);
        cnt += (uint64_t)__builtin_popcountll(word);
    }
    for (; i < (n + 7) / 8; i++)
        cnt += (uint64_t)__builtin_popcount(bits[i]);
    return cnt;
}

static void set_bit(uint8_t *bits, uint64_t i) { bits[i >> 3] |= (uint8_t)(1u << (i & 7)); }

/*
 * The wire encoding of ts, offset, latency and msg_ts: each row holds its difference from
 * the previous row's value, starting from `base`, the first valid value (0 if there is
 * none). A null row counts as repeating the previous value: its difference is 0.
 * Timestamps, offsets and latencies of consecutive events are close, so the differences
 * are small and repetitive. The column is then narrowed to the fewest bytes (1, 2, 4 or 8)
 * that hold them (delta_width), but for one: the first report's time stamp jumps back from
 * the last send's, so if it does not fit it is stored as 0 and travels as a patch.
 * zstd's time grows with the bytes it reads, and these columns cost it the most.
 * Decoding is a running sum after the patch is put back (collector.schema.from_wire).
 */
typedef struct {
    int64_t base, prev;
    int have;
} kt_delta;

static inline int64_t delta_of(kt_delta *d, int64_t v) {
    int64_t x;
    if (!d->have)
        d->have = 1, d->base = d->prev = v;
    x = (int64_t)((uint64_t)v - (uint64_t)d->prev);
    d->prev = v;
    return x;
}

static inline uint64_t magnitude(int64_t x) { return (uint64_t)(x ^ (x >> 63)); } /* |x|, or |x| - 1 if x < 0 */

static int width_of(uint64_t mag) { return mag <= INT8_MAX ? 1 : mag <= INT16_MAX ? 2 : mag <= INT32_MAX ? 4 : 8; }

/*
 * The fewest bytes (1, 2, 4 or 8) that hold every difference but the one at row `skip`,
 * the first report after the sends, whose time stamp jumps back to when the first report
 * arrived. (OR-ing magnitudes, with no branch, vectorises; counting values per width did not
 * pay for itself.)
 */
KT_VECTOR static int delta_width(const int64_t *v, uint64_t n, uint64_t skip) {
    uint64_t i, mag = 0, end = skip < n ? skip : n;
    for (i = 0; i < end; i++)
        mag |= magnitude(v[i]);
    for (i = end + 1; i < n; i++)
        mag |= magnitude(v[i]);
    return width_of(mag);
}

/*
 * dst[i] = (TO)src[i] for i < n, where dst starts where src does (a narrowing in place):
 * through a small buffer, so that neither loop aliases and both vectorise.
 */
#define KT_CHUNK 512
#define NARROW_COPY(TO, FROM, dst, src, n)                          \
    do {                                                            \
        TO tmp_[KT_CHUNK];                                          \
        uint64_t at_, j_, m_;                                       \
        for (at_ = 0; at_ < (n); at_ += KT_CHUNK) {                 \
            m_ = (n) - at_ < KT_CHUNK ? (n) - at_ : KT_CHUNK;       \
            for (j_ = 0; j_ < m_; j_++)                             \
                tmp_[j_] = (TO)((const FROM *)(src))[at_ + j_];     \
            memcpy((TO *)(dst) + at_, tmp_, m_ * sizeof(TO));       \
        }                                                           \
    } while (0)

/*
 * Narrow n int64 values to `width` bytes in place. The one at row `skip` may not fit: it is
 * then stored as 0 and returned as a patch (*row, *val; the count is returned).
 */
KT_VECTOR static int64_t narrow(int64_t *v, uint64_t n, int width, uint64_t skip, uint64_t *row, int64_t *val) {
    int64_t k = 0;
    if (width == 8)
        return 0;
    if (skip < n && width_of(magnitude(v[skip])) > width)
        *row = skip, *val = v[skip], v[skip] = 0, k = 1;
    if (width == 1)
        NARROW_COPY(int8_t, int64_t, v, v, n);
    else if (width == 2)
        NARROW_COPY(int16_t, int64_t, v, v, n);
    else
        NARROW_COPY(int32_t, int64_t, v, v, n);
    return k;
}

/* Narrow n int32 (from == 4) or int16 (from == 2) values to `width` bytes in place. */
KT_VECTOR static void narrow_plain(void *p, uint64_t n, int from, int width) {
    const int32_t *v32 = p;
    const int16_t *v16 = p;
    int8_t *w8 = p;
    int16_t *w16 = p;
    if (width >= from)
        return;
    if (from == 4 && width == 2)
        NARROW_COPY(int16_t, int32_t, w16, v32, n);
    else if (from == 4)
        NARROW_COPY(int8_t, int32_t, w8, v32, n);
    else
        NARROW_COPY(int8_t, int16_t, w8, v16, n);
}

/* Error codes may be negative (librdkafka's own); they are few, so a pass finds their width. */
static int err_width(const int32_t *v, uint64_t n) {
    uint64_t i, mag = 0;
    for (i = 0; i < n; i++)
        mag |= magnitude(v[i]);
    return width_of(mag);
}

/* Swap out src's buffers under their locks; the drained records stay ours until the next drain. */
static kt_inst *swap_out(uint64_t src, kt_buf **drained, kt_columns *out, int *ntopics, kt_anchor *ends) {
    int l;
    kt_inst *in;
    pthread_mutex_lock(&registry_mu);
    in = inst_find(src);
    /* A forgotten instance may be freed by its client's destruction at any time. */
    if (in && in->forgotten)
        in = NULL;
    if (in) {
        for (l = 0; l < KT_LANES; l++) {
            kt_lane *lane = &in->lanes[l];
            kt_buf *next;
            int old;
            lane_lock(lane); /* against other drains and status calls, and the lane's appenders unless lock_free */
            /* Taken before the swap: every record of the next buffer is stamped after it. */
            ends[l] = anchor_now();
            old = lane->active;
            drained[l] = &lane->bufs[old];
            next = &lane->bufs[old ^ 1];
            next->since = ends[l];
            next->n = 0;
            next->arena_len = 0;
            next->err_name_len = 0;
            next->err_msg_len = 0;
            __atomic_store_n(&lane->active, old ^ 1, __ATOMIC_RELEASE); /* after the resets, for lock-free appenders */
            if (lock_free(l))
                quiesce(lane);
            out->recorded += __atomic_load_n(&lane->recorded, __ATOMIC_RELAXED);
            out->dropped += __atomic_load_n(&lane->dropped, __ATOMIC_RELAXED);
            lane_unlock(lane);
        }
        out->live = in->live;
        /* After the swaps: every drained record's topic index is below this. */
        *ntopics = __atomic_load_n(&in->ntopics, __ATOMIC_ACQUIRE);
    }
    pthread_mutex_unlock(&registry_mu);
    return in;
}

/*
 * Swap src's buffer and convert what it held into Arrow column buffers in one
 * new allocation (out->block). Calls for the same src, and kt_forget, must not
 * overlap. Returns -1 for an unknown src, -2 when out of memory (the events are
 * then counted as dropped), 0 otherwise (out->n may be 0).
 */
KT_EXPORT int kt_drain_columns(uint64_t src, kt_columns *out) {
    static const int widths[KT_NCOLS] = {0, 8, 1, 2, 4, 8, 4, 4, 2, 8, 8, 4, 4, 0, 4};
    static const int has_data[KT_NCOLS] = {[C_KEY] = 1, [C_ERR_NAME] = 1, [C_ERR_MESSAGE] = 1};
    kt_inst *in;
    kt_buf *bs[KT_LANES] = {NULL};
    kt_anchor ends[KT_LANES];
    double rate[KT_LANES];
    int ntopics = 0, c, l;
    uint64_t n, i, pos = 0, data_len[KT_NCOLS] = {0};
    uint32_t tlen[KT_MAX_TOPICS];
    uint8_t *blk;

    memset(out, 0, sizeof(*out));
    in = swap_out(src, bs, out, &ntopics, ends);
    if (!in)
        return -1;
    for (l = 0; l < KT_LANES; l++)
        rate[l] = us_per_tick(&bs[l]->since, &ends[l]);
    n = 0;
    for (l = 0; l < KT_LANES; l++)
        n += bs[l]->n;
    out->n = n;
    if (!n)
        return 0;

    for (c = 0; c < ntopics; c++) {
        tlen[c] = (uint32_t)strlen(in->topics[c]);
        data_len[C_TOPIC] += tlen[c];
    }
    /* Counted by record(): no pass over the records before the one that converts them. */
    for (l = 0; l < KT_LANES; l++) {
        data_len[C_ERR_NAME] += bs[l]->err_name_len;
        data_len[C_ERR_MESSAGE] += bs[l]->err_msg_len;
        data_len[C_KEY] += bs[l]->arena_len;
    }

    /* Layout: every buffer 64-byte aligned, as Arrow recommends. */
#define PLACE(col, j, size)                           \
    do {                                              \
        out->buf[col][j].off = pos;                   \
        out->buf[col][j].len = (size);                \
        pos += ((uint64_t)(size) + 63) & ~(uint64_t)63; \
    } while (0)
    for (c = 0; c < KT_NCOLS; c++) {
        PLACE(c, 0, (n + 7) / 8);
        PLACE(c, 1, c == C_ERR_RETRIABLE ? (n + 7) / 8 : (has_data[c] ? n + 1 : n) * (uint64_t)widths[c]);
        if (has_data[c])
            PLACE(c, 2, data_len[c]);
    }
    PLACE(C_TOPIC, 2, data_len[C_TOPIC]);
    out->key_data_offsets.off = pos;
    out->key_data_offsets.len = 4 * (n + 1);
    pos += (out->key_data_offsets.len + 63) & ~(uint64_t)63;
    out->topic_offsets.off = pos;
    out->topic_offsets.len = 4 * ((uint64_t)ntopics + 1);
    pos += (out->topic_offsets.len + 63) & ~(uint64_t)63;
    out->ntopics = (uint64_t)ntopics;
#undef PLACE
    blk = block_alloc(pos, &out->block_len);
    if (!blk) {
        kt_lane *lane = &in->lanes[LANE_REPORT];
        lane_lock(lane);
        counter_add(&lane->dropped, n);
        lane_unlock(lane);
        out->dropped += n;
        out->n = 0;
        return -2;
    }
    out->block = blk;
    for (c = 0; c < KT_NCOLS; c++) {
        memset(blk + out->buf[c][0].off, 0, out->buf[c][0].len);
        if (c == C_ERR_RETRIABLE)
            memset(blk + out->buf[c][1].off, 0, out->buf[c][1].len);
    }

    {
#define COL(c, T) ((T *)(blk + out->buf[c][1].off))
#define BITS(c) (blk + out->buf[c][0].off)
#define DATA(c) ((char *)blk + out->buf[c][2].off)
        int64_t *ts = COL(C_TS, int64_t), *offset = COL(C_OFFSET, int64_t), *latency = COL(C_LATENCY, int64_t);
        int64_t *msg_ts = COL(C_MSG_TS, int64_t);
        int8_t *kind = COL(C_KIND, int8_t);
        int16_t *topic = COL(C_TOPIC, int16_t);
        int32_t *key_len = COL(C_KEY, int32_t), *topic_o = (int32_t *)(blk + out->topic_offsets.off);
        int32_t *key_data_o = (int32_t *)(blk + out->key_data_offsets.off);
        int32_t *name_o = COL(C_ERR_NAME, int32_t), *msg_o = COL(C_ERR_MESSAGE, int32_t);
        int32_t *partition = COL(C_PARTITION, int32_t), *value_size = COL(C_VALUE_SIZE, int32_t);
        int32_t *err_code = COL(C_ERR_CODE, int32_t);
        int16_t *attempt = COL(C_ATTEMPT, int16_t);
        int32_t to = 0, no = 0, mo = 0;
        uint32_t key_base = 0, j;
        kt_delta d_ts = {0}, d_offset = {0}, d_latency = {0}, d_msg_ts = {0};
        uint32_t bits_partition = 0, bits_key_len = 0, bits_value_size = 0, nerr = 0;

        /* Keys: the lanes' arenas one after the other; a record's key_off is relative to its own. */
        for (l = 0; l < KT_LANES; l++) {
            memcpy(DATA(C_KEY) + key_base, bs[l]->arena, bs[l]->arena_len);
            key_base += bs[l]->arena_len;
        }
        key_base = 0;
        for (c = 0; c < ntopics; c++) {
            topic_o[c] = to;
            memcpy(DATA(C_TOPIC) + to, in->topics[c], tlen[c]);
            to += (int32_t)tlen[c];
        }
        topic_o[ntopics] = to;
        /* Rows lane by lane (sends, then reports): columns get long uniform runs, which compress well. */
        for (i = 0, l = 0; l < KT_LANES; key_base += bs[l]->arena_len, l++)
        for (j = 0; j < bs[l]->n; j++, i++) {
            const kt_rec *r = &bs[l]->recs[j];
            const char *s;
            size_t len;
            int is_err = r->kind == KT_ERROR;
            int64_t ts_us = stamp_us(r->ts_us, &bs[l]->since, rate[l]);

            ts[i] = delta_of(&d_ts, ts_us);

            kind[i] = (int8_t)r->kind;
            topic[i] = 0;
            if (r->topic >= 0 && r->topic < ntopics) {
                topic[i] = r->topic;
                set_bit(BITS(C_TOPIC), i);
            }

            /* Rows' keys follow each other in the lanes' arenas: their lengths are their offsets. */
            key_len[i] = r->key_len > 0 ? r->key_len : 0;
            bits_key_len |= (uint32_t)key_len[i];
            if (r->key_len >= 0)
                set_bit(BITS(C_KEY), i);

            /* Null slots hold 0: a column's runs of nulls then cost the compressor nothing. */
            partition[i] = r->partition >= 0 ? r->partition : 0;
            bits_partition |= (uint32_t)partition[i];
            if (r->partition >= 0)
                set_bit(BITS(C_PARTITION), i);

            offset[i] = 0;
            if ((r->kind == KT_ACK || r->kind == KT_CONSUME) && r->offset >= 0) {
                offset[i] = delta_of(&d_offset, r->offset);
                set_bit(BITS(C_OFFSET), i);
            }

            /* The value's size belongs to the send (and a consumption); a report repeats it. */
            value_size[i] = 0;
            if (r->value_len >= 0 && (r->kind == KT_SEND || r->kind == KT_CONSUME)) {
                value_size[i] = r->value_len;
                bits_value_size |= (uint32_t)r->value_len;
                set_bit(BITS(C_VALUE_SIZE), i);
            }

            attempt[i] = 0;
            if (r->kind == KT_SEND) {
                attempt[i] = 1;
                set_bit(BITS(C_ATTEMPT), i);
            }

            /* A send's message timestamp is its own creation time, which ts already holds to the us. */
            msg_ts[i] = 0;
            if (r->kind != KT_SEND && MSG_TS_PLAUSIBLE(r->msg_ts_ms)) {
                msg_ts[i] = delta_of(&d_msg_ts, r->msg_ts_ms);
                set_bit(BITS(C_MSG_TS), i);
            }

            /* ack/error: librdkafka's produce-to-report latency; consume: now minus the message timestamp. */
            latency[i] = 0;
            if (r->kind == KT_CONSUME) {
                if (MSG_TS_PLAUSIBLE(r->msg_ts_ms)) {
                    latency[i] = delta_of(&d_latency, ts_us - r->msg_ts_ms * 1000);
                    set_bit(BITS(C_LATENCY), i);
                }
            } else if (r->kind != KT_SEND && r->latency_us >= 0) {
                latency[i] = delta_of(&d_latency, r->latency_us);
                set_bit(BITS(C_LATENCY), i);
            }

            err_code[i] = r->err;
            name_o[i] = no;
            msg_o[i] = mo;
            if (is_err) {
                nerr++;
                len = strlen(s = api.err2name(r->err));
                memcpy(DATA(C_ERR_NAME) + no, s, len);
                no += (int32_t)len;
                len = strlen(s = api.err2str(r->err));
                memcpy(DATA(C_ERR_MESSAGE) + mo, s, len);
                mo += (int32_t)len;
                set_bit(BITS(C_ERR_CODE), i), set_bit(BITS(C_ERR_NAME), i);
                set_bit(BITS(C_ERR_RETRIABLE), i), set_bit(BITS(C_ERR_MESSAGE), i);
            }
        }
        key_len[n] = 0;
        key_data_o[0] = 0;
        for (i = 1; i <= n; i++)
            key_data_o[i] = (int32_t)key_base;
        name_o[n] = no;
        msg_o[n] = mo;
        for (c = 0; c < KT_NCOLS; c++)
            out->null_count[c] = c == C_SEQ || c == C_TS || c == C_KIND ? 0 : (int64_t)(n - popcount(BITS(c), n));
        {
            const struct {
                int col;
                int64_t *v;
                const kt_delta *d;
            } deltas[] = {{C_TS, ts, &d_ts}, {C_OFFSET, offset, &d_offset}, {C_LATENCY, latency, &d_latency},
                          {C_MSG_TS, msg_ts, &d_msg_ts}};
            for (c = 0; c < (int)(sizeof(deltas) / sizeof(*deltas)); c++) {
                int col = deltas[c].col, width = delta_width(deltas[c].v, n, bs[LANE_SEND]->n);
                out->base[col] = deltas[c].d->base;
                out->width[col] = width;
                out->npatch[col] =
                    narrow(deltas[c].v, n, width, bs[LANE_SEND]->n, out->patch_row[col], out->patch_val[col]);
                out->buf[col][1].len = n * (uint64_t)width;
            }
        }
        {
            /* Partitions, key lengths, value sizes, attempts and error codes are small numbers. */
            const struct {
                int col, from, width;
            } plain[] = {{C_PARTITION, 4, width_of(bits_partition)}, /* all >= 0: their OR bounds them */
                         {C_KEY, 4, width_of(bits_key_len)},
                         {C_VALUE_SIZE, 4, width_of(bits_value_size)},
                         {C_ATTEMPT, 2, 1}, /* 1 or null */
                         {C_ERR_CODE, 4, nerr ? err_width(err_code, n) : 1}};
            for (c = 0; c < (int)(sizeof(plain) / sizeof(*plain)); c++) {
                int col = plain[c].col;
                narrow_plain(blk + out->buf[col][1].off, n, plain[c].from, plain[c].width);
                out->width[col] = plain[c].width;
                out->buf[col][1].len = n * (uint64_t)plain[c].width;
            }
        }
#undef COL
#undef BITS
#undef DATA
    }
    /* These buffers are ours until the next swap: make room for twice what they just held. */
    for (l = 0; l < KT_LANES; l++)
        prefault(bs[l], 2 * (uint64_t)bs[l]->n + KT_PREFAULT_RECORDS, 2 * (uint64_t)bs[l]->arena_len + KT_PREFAULT_ARENA,
                 in);
    return 0;
}

KT_EXPORT void kt_free(void *block, uint64_t size) {
    int i, victim = 0;
    pthread_mutex_lock(&pool_mu);
    for (i = 0; i < KT_POOL; i++)
        if (!pool[i].p || pool[i].size < pool[victim].size)
            victim = i;
    if (!pool[victim].p || pool[victim].size < size) {
        void *old = pool[victim].p;
        pool[victim].p = block, pool[victim].size = size;
        block = old;
    }
    pthread_mutex_unlock(&pool_mu);
    free(block);
}

/*
 * kt_export_batch: the drained columns as one record batch in Arrow's C data interface
 * (https://arrow.apache.org/docs/format/CDataInterface.html), in the encoded wire form
 * that collector.schema describes. pyarrow imports it with one call, which releases the
 * GIL once; building the same batch column by column from Python releases it on every
 * array (each validates itself without the GIL), and each time the application's thread
 * may be left waiting to get it back. Everything here is pointer and metadata work,
 * without copying the column data.
 *
 * The caller names everything (kt_export_names), so that the names live in
 * collector/schema.py only. Field slots: 0..KT_NCOLS-1 are the drained columns (C_KEY
 * stands for the key lengths), then the key bytes and the three constant strings.
 * On success the batch owns the block: the last release of any of its structures
 * frees it (kt_free). On failure nothing is taken and the caller frees the block.
 */
struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

#define ARROW_FLAG_NULLABLE 2

enum { S_KEY_DATA = KT_NCOLS, S_CLIENT_ID, S_GROUP_ID, S_MEMBER_ID, KT_NSLOTS };
#define KT_NKINDS 4
#define KT_MAX_META 4

typedef struct {
    const char *p;
    int64_t len;
} kt_str;

typedef struct {
    kt_str slot_name[KT_NSLOTS];
    int8_t nullable[KT_NSLOTS];
    int8_t order[KT_NSLOTS]; /* slots in the order of the schema's fields */
    kt_str kinds[KT_NKINDS];  /* the kind column's dictionary, by code */
    kt_str meta[KT_MAX_META][2]; /* the schema's own metadata pairs, in order */
    int32_t nmeta;
    kt_str wire_key, wire_value, src_key, seq_key;
    kt_str enc_key, enc_value, base_key, patch_key;
} kt_export_names;

typedef struct {
    uint64_t src;
    uint64_t first_seq;
    kt_str constant[3]; /* client_id, group_id, member_id; p == NULL: the column is left out */
} kt_export_args;

/* Arrays: the root, a field per slot, the dictionaries of kind, topic and the three constants. */
#define KT_XARRAYS (1 + KT_NSLOTS + 5)

typedef struct {
    int refs; /* structures handed out and not yet released */
    void *block;
    uint64_t block_len;
    struct ArrowArray arrays[KT_XARRAYS];
    struct ArrowSchema schemas[KT_XARRAYS];
    struct ArrowArray *array_children[KT_NSLOTS];
    struct ArrowSchema *schema_children[KT_NSLOTS];
    const void *buffers[KT_XARRAYS][3];
    int32_t offsets[4][KT_NKINDS + 1]; /* the kind dictionary's, and each constant's */
    char *text;                         /* names, string values and metadata, in `chars` */
    uint64_t text_len, text_cap;
    int overflow;                       /* text_cap was too small: the export fails */
    uint8_t *zeros;                     /* n zero bytes: the constants' indices */
    char chars[];
} kt_export;

static int64_t exports_live; /* batches exported and not yet released: for tests */

static void export_unref(kt_export *x) {
    if (__atomic_sub_fetch(&x->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        kt_free(x->block, x->block_len);
        free(x->zeros);
        free(x);
        __atomic_sub_fetch(&exports_live, 1, __ATOMIC_RELAXED);
    }
}

KT_EXPORT int64_t kt_exports_live(void) { return __atomic_load_n(&exports_live, __ATOMIC_RELAXED); }

static void array_release(struct ArrowArray *a) {
    int64_t i;
    if (!a->release)
        return;
    for (i = 0; i < a->n_children; i++)
        if (a->children[i]->release)
            a->children[i]->release(a->children[i]);
    if (a->dictionary && a->dictionary->release)
        a->dictionary->release(a->dictionary);
    a->release = NULL;
    export_unref((kt_export *)a->private_data);
}

static void schema_release(struct ArrowSchema *s) {
    int64_t i;
    if (!s->release)
        return;
    for (i = 0; i < s->n_children; i++)
        if (s->children[i]->release)
            s->children[i]->release(s->children[i]);
    if (s->dictionary && s->dictionary->release)
        s->dictionary->release(s->dictionary);
    s->release = NULL;
    export_unref((kt_export *)s->private_data);
}

/* Appends to x->text; returns where the bytes start. */
static char *put(kt_export *x, const void *p, uint64_t len) {
    char *at = x->text + x->text_len;
    if (len > x->text_cap - x->text_len) {
        x->overflow = 1;
        return x->text;
    }
    if (len)
        memcpy(at, p, len);
    x->text_len += len;
    return at;
}

static char *put_str(kt_export *x, kt_str s) {
    char *at = put(x, s.p, (uint64_t)s.len);
    put(x, "", 1);
    return at;
}

static void put_i32(kt_export *x, int32_t v) { put(x, &v, 4); }

static void put_pair(kt_export *x, kt_str k, const char *v, int64_t vlen) {
    put_i32(x, (int32_t)k.len);
    put(x, k.p, (uint64_t)k.len);
    put_i32(x, (int32_t)vlen);
    put(x, v, (uint64_t)vlen);
}

static const char *int_format(int64_t width) {
    return width == 1 ? "c" : width == 2 ? "s" : width == 4 ? "i" : "l";
}

static void init_array(kt_export *x, struct ArrowArray *a, const void **bufs, int64_t length, int64_t nulls,
                       int64_t nbuf) {
    memset(a, 0, sizeof(*a));
    a->length = length;
    a->null_count = nulls;
    a->n_buffers = nbuf;
    a->buffers = bufs;
    a->release = array_release;
    a->private_data = x;
}

static void init_schema(kt_export *x, struct ArrowSchema *s, const char *format, const char *name, int64_t flags) {
    memset(s, 0, sizeof(*s));
    s->format = format;
    s->name = name;
    s->flags = flags;
    s->release = schema_release;
    s->private_data = x;
}

/* A string dictionary (int32 offsets and characters) as the next array and schema; its index. */
static int add_dictionary(kt_export *x, int *na, int64_t length, const void *offsets, const void *chars) {
    int d = (*na)++;
    const void **db = x->buffers[d];
    init_array(x, &x->arrays[d], db, length, 0, 3);
    db[0] = NULL, db[1] = offsets, db[2] = chars;
    init_schema(x, &x->schemas[d], "u", NULL, ARROW_FLAG_NULLABLE);
    return d;
}

KT_EXPORT int kt_export_batch(const kt_columns *c, const kt_export_names *nm, const kt_export_args *args,
                              struct ArrowSchema *out_schema, struct ArrowArray *out_array) {
    const uint8_t *blk = c->block;
    uint64_t n = c->n, cap = 1024;
    int slot, k, nf = 0, na = 0;
    kt_export *x;
    char num[32];

    if (!blk || !n)
        return -1;
    /* Text: the names, the constants' values, and the metadata (numbers and patches are short). */
    for (slot = 0; slot < KT_NSLOTS; slot++)
        cap += (uint64_t)nm->slot_name[slot].len + 1 + 128;
    for (k = 0; k < KT_NKINDS; k++)
        cap += (uint64_t)nm->kinds[k].len;
    for (k = 0; k < nm->nmeta; k++)
        cap += (uint64_t)(nm->meta[k][0].len + nm->meta[k][1].len) + 8;
    for (k = 0; k < 3; k++)
        cap += (uint64_t)args->constant[k].len + 1;
    cap += 4 * (uint64_t)(nm->wire_key.len + nm->wire_value.len + nm->src_key.len + nm->seq_key.len + nm->enc_key.len +
                          nm->enc_value.len + nm->base_key.len + nm->patch_key.len + 64);
    x = calloc(1, sizeof(*x) + cap);
    if (!x)
        return -1;
    x->text = x->chars;
    x->text_cap = cap;
    if (args->constant[0].p || args->constant[1].p || args->constant[2].p) {
        x->zeros = calloc(1, n);
        if (!x->zeros) {
            free(x);
            return -1;
        }
    }

#define BUF(span) ((const void *)(blk + (span).off))
    {
        struct ArrowArray *root = &x->arrays[na++];
        struct ArrowSchema *rs = &x->schemas[0];
        const char *meta = x->text + x->text_len;
        int nmeta = nm->nmeta + 3;

        /* The schema's metadata: its own pairs, then the wire form's marker, src and the first seq. */
        put_i32(x, nmeta);
        for (k = 0; k < nm->nmeta; k++)
            put_pair(x, nm->meta[k][0], nm->meta[k][1].p, nm->meta[k][1].len);
        put_pair(x, nm->wire_key, nm->wire_value.p, nm->wire_value.len);
        put_pair(x, nm->src_key, num, snprintf(num, sizeof(num), "%" PRIu64, args->src));
        put_pair(x, nm->seq_key, num, snprintf(num, sizeof(num), "%" PRIu64, args->first_seq));

        init_array(x, root, x->buffers[0], (int64_t)n, 0, 1);
        x->buffers[0][0] = NULL;
        root->children = x->array_children;
        init_schema(x, rs, "+s", "", 0);
        rs->metadata = meta;
        rs->children = x->schema_children;

        for (k = 0; k < KT_NSLOTS; k++) {
            int col = nm->order[k];
            struct ArrowArray *a;
            struct ArrowSchema *s;
            int dict = -1; /* the index of its dictionary, if it has one */
            const void **bufs;
            const char *format;
            int64_t nulls = 0, flags = nm->nullable[col] ? ARROW_FLAG_NULLABLE : 0;

            if (col < KT_NCOLS) {
                if (col == C_SEQ || c->null_count[col] >= (int64_t)n)
                    continue;
                nulls = c->null_count[col];
            } else if (col == S_KEY_DATA) {
                if (c->null_count[C_KEY] >= (int64_t)n)
                    continue;
            } else if (!args->constant[col - S_CLIENT_ID].p) {
                continue;
            }
            a = &x->arrays[na];
            s = &x->schemas[na];
            bufs = x->buffers[na];
            na++;
            init_array(x, a, bufs, (int64_t)n, nulls, 2);
            bufs[0] = nulls ? BUF(c->buf[col < KT_NCOLS ? col : C_KEY][0]) : NULL;
            if (col < KT_NCOLS)
                bufs[1] = BUF(c->buf[col][1]);
            switch (col) {
            case C_KIND: {
                int32_t o = 0;
                const char *chars = x->text + x->text_len;
                for (int j = 0; j < KT_NKINDS; j++) {
                    x->offsets[0][j] = o;
                    put(x, nm->kinds[j].p, (uint64_t)nm->kinds[j].len);
                    o += (int32_t)nm->kinds[j].len;
                }
                x->offsets[0][KT_NKINDS] = o;
                format = "c";
                dict = add_dictionary(x, &na, KT_NKINDS, x->offsets[0], chars);
                break;
            }
            case C_TOPIC:
                format = "s";
                dict = add_dictionary(x, &na, (int64_t)c->ntopics, BUF(c->topic_offsets), BUF(c->buf[C_TOPIC][2]));
                break;
            case C_ERR_NAME:
            case C_ERR_MESSAGE:
                format = "u";
                a->n_buffers = 3;
                bufs[2] = BUF(c->buf[col][2]);
                break;
            case C_ERR_RETRIABLE:
                format = "b";
                break;
            case S_KEY_DATA:
                format = "z";
                a->n_buffers = 3;
                bufs[1] = BUF(c->key_data_offsets);
                bufs[2] = BUF(c->buf[C_KEY][2]);
                break;
            case S_CLIENT_ID:
            case S_GROUP_ID:
            case S_MEMBER_ID: {
                kt_str v = args->constant[col - S_CLIENT_ID];
                int32_t *o = x->offsets[1 + col - S_CLIENT_ID];
                o[0] = 0, o[1] = (int32_t)v.len;
                format = "c";
                bufs[1] = x->zeros; /* every row: index 0 */
                dict = add_dictionary(x, &na, 1, o, put(x, v.p, (uint64_t)v.len));
                break;
            }
            default: /* integers, narrowed to width[col] bytes */
                format = int_format(c->width[col]);
            }
            init_schema(x, s, format, put_str(x, nm->slot_name[col]), flags);
            if (dict >= 0) {
                a->dictionary = &x->arrays[dict];
                s->dictionary = &x->schemas[dict];
            }
            if (col == C_TS || col == C_OFFSET || col == C_LATENCY || col == C_MSG_TS) {
                /* Delta-encoded: the encoding, its base, and the differences that did not fit. */
                char patch[64 * KT_MAX_PATCHES] = "";
                int plen = 0;
                for (int j = 0; j < c->npatch[col]; j++)
                    plen += snprintf(patch + plen, sizeof(patch) - (size_t)plen, "%s%" PRIu64 ":%" PRId64, j ? "," : "",
                                     c->patch_row[col][j], c->patch_val[col][j]);
                s->metadata = x->text + x->text_len;
                put_i32(x, plen ? 3 : 2);
                put_pair(x, nm->enc_key, nm->enc_value.p, nm->enc_value.len);
                put_pair(x, nm->base_key, num, snprintf(num, sizeof(num), "%" PRId64, c->base[col]));
                if (plen)
                    put_pair(x, nm->patch_key, patch, plen);
            }
            x->array_children[nf] = a;
            x->schema_children[nf] = s;
            nf++;
        }
        root->n_children = nf;
        rs->n_children = nf;
        if (nf == 0 || x->overflow) {
            free(x->zeros);
            free(x);
            return -1;
        }
        /* One reference per structure: every array, and every schema at the same index as
           its array. The roots move to the caller's structures, which release them. */
        x->refs = 2 * na;
        __atomic_add_fetch(&exports_live, 1, __ATOMIC_RELAXED);
        x->block = c->block;
        x->block_len = c->block_len;
        *out_array = *root;
        root->release = NULL;
        *out_schema = *rs;
        rs->release = NULL;
    }
#undef BUF
    return 0;
}

/* Counters only; n is what the next drain would return. */
KT_EXPORT int kt_status(uint64_t src, kt_columns *out) {
    kt_inst *in;
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&registry_mu);
    in = inst_find(src);
    if (in) {
        int l;
        for (l = 0; l < KT_LANES; l++) {
            kt_lane *lane = &in->lanes[l];
            lane_lock(lane); /* a lock-free appender may still be counting: these are a moment's figures */
            out->n += __atomic_load_n(&lane->bufs[__atomic_load_n(&lane->active, __ATOMIC_ACQUIRE)].n, __ATOMIC_RELAXED);
            out->recorded += __atomic_load_n(&lane->recorded, __ATOMIC_RELAXED);
            out->dropped += __atomic_load_n(&lane->dropped, __ATOMIC_RELAXED);
            lane_unlock(lane);
        }
        out->live = in->live;
    }
    pthread_mutex_unlock(&registry_mu);
    return in ? 0 : -1;
}

/* Bounds of the stashed lane buffers (what the next client with those bounds reuses); 0 if none. */
KT_EXPORT int kt_stash_bounds(uint32_t *max_records, uint32_t *max_arena) {
    int full;
    pthread_mutex_lock(&stash_mu);
    full = stash.full;
    *max_records = full ? stash.max_records : 0;
    *max_arena = full ? stash.max_arena : 0;
    pthread_mutex_unlock(&stash_mu);
    return full;
}

/* Free the instance once no client uses it any more (at once if none does). */
KT_EXPORT int kt_forget(uint64_t src) {
    kt_inst *in;
    pthread_mutex_lock(&registry_mu);
    in = inst_find(src);
    if (in) {
        in->forgotten = 1;
        if (in->live <= 0) {
            inst_unlink(in);
            inst_free(in);
        }
    }
    pthread_mutex_unlock(&registry_mu);
    return in ? 0 : -1;
}
