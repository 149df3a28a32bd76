/* The built-in synthetic guest; see guest.h for the page layout and the contract. */
#define _GNU_SOURCE
#include "guest.h"
#include "core.h"
#include "uffd.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TPS PC_GUEST_TARGET_PAGE_SIZE
#define WORDS_PER_PAGE (TPS / 8)
#define TAG_WORD (WORDS_PER_PAGE - 1)
#define SLOT_WORD(v) ((v) * 8u)            /* byte 64*v */
#define PATTERN_WORD(v) ((v) * 8u + 1u)    /* byte 64*v + 8: never written */
#define HOT_PERCENT_OF_PAGES 10
#define HOT_PERCENT_OF_ACCESSES 90
#define GAMMA 0x9E3779B97F4A7C15ULL
#define STATE_HEADER_LEN 40
#define STATE_VCPU_LEN 48
#define STATE_MAGIC "PCGUEST"   /* 8 bytes with the NUL */

struct vcpu {
    _Alignas(64) _Atomic uint64_t steps; /* readable while running */
    _Atomic uint64_t reads;
    _Atomic uint64_t writes;
    /* owned by the vCPU thread while it runs; written back when it leaves */
    uint64_t prng;
    uint64_t position;
    uint64_t read_hash;
    uint64_t limit;          /* absolute step count at which to leave */
    uint64_t share_start;    /* seq: first global page of this vCPU's share */
    uint64_t share_len;
    uint32_t index;
    _Atomic bool in_loop;    /* between its start and its exit (pc_guest_stop) */
    int nap;                 /* NAP_*, under done_lock: asleep in its rate limit, stopped there */
    _Atomic uint32_t tid;    /* kernel thread id while running: uffd THREAD_ID names it */
    pc_guest *g;
    pthread_t thread;
    void *stack;             /* its thread's stack, mapped with the guest (see pc_guest_start) */
};

/* A vCPU thread's stack: the loop needs little; mapped and populated when the guest is made,
 * so that starting it maps nothing (a destination starts its guest inside the downtime, where
 * an mmap may wait for the address space lock behind the fault path's placements). */
#define VCPU_STACK_SIZE (256u << 10)

struct pc_guest {
    uint32_t nregions, nvcpus, pattern, write_percent;
    uint64_t seed, rate_limit;
    uint64_t total_pages, hot_pages, zero_tail_start;
    uint64_t tag_mask;
    pc_guest_region *regions;
    uint64_t *first_page; /* nregions + 1 prefix sums of 4 KiB pages */
    struct vcpu *vcpus;
    _Atomic int stop;
    _Atomic uint32_t throttle_pct; /* auto-converge: % of the time each vCPU sleeps (0: none) */
    _Atomic int vcpu_nice;         /* precopy: the vCPUs run at this nice (PC_GUEST_NICE_KEEP: base_nice) */
    int base_nice;                 /* its vCPUs' own nice (pc_guest_new's) */
    _Atomic uint32_t active;
    bool threads_exist;
    bool parked;         /* threads made by pc_guest_prepare, waiting for pc_guest_start */
    int release;         /* RELEASE_*: what the parked threads do (under done_lock) */
    uint32_t nparked;    /* threads that reached their wait (under done_lock) */
    pthread_mutex_t ctl; /* start / join / save / load / verify / fill */
    pthread_mutex_t done_lock;
    pthread_cond_t done_cond;
    pthread_cond_t release_cond;
    pthread_cond_t nap_cond; /* a vCPU asleep in its rate limit (throttle); woken by a join */
};

enum { RELEASE_WAIT, RELEASE_RUN, RELEASE_EXIT };

/* ---- deterministic mixing ------------------------------------------------ */

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* splitmix64: the state after n draws is start + n*GAMMA, so load can check it in O(1) */
static inline uint64_t prng_next(uint64_t *s)
{
    *s += GAMMA;
    return mix64(*s);
}

static uint64_t prng_initial(const pc_guest *g, uint32_t v)
{
    return mix64(g->seed ^ (0xA0761D6478BD642FULL * (uint64_t)(v + 1)));
}

static uint64_t hash_initial(uint32_t v)
{
    return mix64(0xE7037ED1A0B428DBULL + v);
}

static inline uint64_t rotl64(uint64_t x, unsigned r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t fold_read(uint64_t h, uint64_t slot, uint64_t pattern, uint64_t tag)
{
    h = mix64(h ^ slot);
    return mix64(h + (pattern ^ rotl64(tag, 17)));
}

static inline uint64_t page_key(const pc_guest *g, uint32_t region, uint64_t page_in_region)
{
    return mix64(g->seed ^ mix64(((uint64_t)region << 48) ^ page_in_region ^ 0x6A09E667F3BCC909ULL));
}

static inline bool page_is_zero(const pc_guest *g, uint64_t global_page, uint64_t key)
{
    return (key >> 61) == 0 || global_page >= g->zero_tail_start;
}

static inline uint64_t page_tag(const pc_guest *g, uint32_t region, uint64_t page_in_region)
{
    return (((uint64_t)region << 48) | page_in_region) ^ g->tag_mask;
}

/* initial value of word w of a non-zero page */
static inline uint64_t pattern_word(uint64_t key, uint32_t w)
{
    return mix64(key + (uint64_t)(w + 1) * GAMMA);
}

static void initial_page_words(const pc_guest *g, uint32_t region, uint64_t page_in_region,
                               uint64_t *out)
{
    uint64_t key = page_key(g, region, page_in_region);
    uint64_t global = g->first_page[region] + page_in_region;
    if (page_is_zero(g, global, key)) {
        memset(out, 0, TPS);
        return;
    }
    for (uint32_t w = 0; w < TAG_WORD; w++)
        out[w] = pattern_word(key, w);
    out[TAG_WORD] = page_tag(g, region, page_in_region);
}

/* ---- page space ------------------------------------------------------------ */

static inline uint32_t region_of(const pc_guest *g, uint64_t global_page)
{
    uint32_t lo = 0, hi = g->nregions - 1;
    while (lo < hi) {
        uint32_t mid = (lo + hi + 1) / 2;
        if (g->first_page[mid] <= global_page)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static inline uint8_t *page_ptr(const pc_guest *g, uint64_t global_page)
{
    uint32_t r = region_of(g, global_page);
    return (uint8_t *)(uintptr_t)(g->regions[r].addr + (global_page - g->first_page[r]) * TPS);
}

/* One access of vCPU c: picks the page and whether it is a write. Shared by the
 * vCPU loop and the replay in verify, which is what makes verification exact. */
static inline uint64_t next_access(const pc_guest *g, const struct vcpu *c, uint64_t *prng,
                                   uint64_t *position, bool *is_write)
{
    uint64_t d1 = prng_next(prng), d2 = prng_next(prng), page;
    switch (g->pattern) {
    case PC_GUEST_PATTERN_SEQ:
        page = c->share_start + *position;
        *position = (*position + 1 == c->share_len) ? 0 : *position + 1;
        break;
    case PC_GUEST_PATTERN_RANDOM:
        page = d1 % g->total_pages;
        break;
    default: /* HOT */
        if (g->hot_pages == g->total_pages || (d2 >> 32) % 100 < HOT_PERCENT_OF_ACCESSES)
            page = d1 % g->hot_pages;
        else
            page = g->hot_pages + d1 % (g->total_pages - g->hot_pages);
        break;
    }
    *is_write = (d2 & 0xFFFFFFFFu) % 100 < g->write_percent;
    return page;
}

/* ---- creation ------------------------------------------------------------------ */

static void set_err(char *err, size_t errcap, const char *fmt, ...)
{
    if (!err || errcap == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errcap, fmt, ap);
    va_end(ap);
}

static bool is_pow2(uint64_t x)
{
    return x && !(x & (x - 1));
}

pc_guest *pc_guest_new(const pc_guest_region *regions, uint32_t nregions, uint32_t nvcpus,
                       uint32_t pattern, uint64_t seed, uint32_t write_percent,
                       uint64_t rate_limit, int nice, char *err, size_t errcap)
{
    if (nregions == 0 || nregions > PC_GUEST_MAX_REGIONS) {
        set_err(err, errcap, "nregions=%u: need 1..%u regions", nregions, PC_GUEST_MAX_REGIONS);
        return NULL;
    }
    if (nvcpus == 0 || nvcpus > PC_GUEST_MAX_VCPUS) {
        set_err(err, errcap, "nvcpus=%u: need 1..%u vCPUs", nvcpus, PC_GUEST_MAX_VCPUS);
        return NULL;
    }
    if (nice < -20 || nice > 19) {
        set_err(err, errcap, "nice=%d: must be within -20..19", nice);
        return NULL;
    }
    if (pattern > PC_GUEST_PATTERN_HOT) {
        set_err(err, errcap, "pattern=%u: unknown (0=seq, 1=random, 2=hot)", pattern);
        return NULL;
    }
    if (write_percent > 100) {
        set_err(err, errcap, "write_percent=%u: must be 0..100", write_percent);
        return NULL;
    }
    uint64_t total = 0;
    for (uint32_t i = 0; i < nregions; i++) {
        const pc_guest_region *r = &regions[i];
        if (!is_pow2(r->host_page_size) || r->host_page_size < TPS) {
            set_err(err, errcap, "region %u: host_page_size=%llu must be a power of two >= %d",
                    i, (unsigned long long)r->host_page_size, TPS);
            return NULL;
        }
        if (r->addr == 0 || r->addr % r->host_page_size) {
            set_err(err, errcap, "region %u: addr=0x%llx is not aligned to host_page_size=%llu",
                    i, (unsigned long long)r->addr, (unsigned long long)r->host_page_size);
            return NULL;
        }
        if (r->length == 0 || r->length % r->host_page_size || r->addr + r->length < r->addr) {
            set_err(err, errcap,
                    "region %u: length=%llu must be a non-zero multiple of host_page_size=%llu",
                    i, (unsigned long long)r->length, (unsigned long long)r->host_page_size);
            return NULL;
        }
        for (uint32_t j = 0; j < i; j++) {
            const pc_guest_region *o = &regions[j];
            if (r->addr < o->addr + o->length && o->addr < r->addr + r->length) {
                set_err(err, errcap, "region %u [0x%llx, +%llu) overlaps region %u [0x%llx, +%llu)",
                        i, (unsigned long long)r->addr, (unsigned long long)r->length, j,
                        (unsigned long long)o->addr, (unsigned long long)o->length);
                return NULL;
            }
        }
        total += r->length / TPS;
    }
    if (total < nvcpus) {
        set_err(err, errcap, "%llu pages for %u vCPUs: need at least one 4 KiB page per vCPU",
                (unsigned long long)total, nvcpus);
        return NULL;
    }

    pc_guest *g = calloc(1, sizeof(*g));
    if (!g)
        goto oom;
    atomic_init(&g->vcpu_nice, PC_GUEST_NICE_KEEP);
    g->base_nice = nice;
    g->regions = calloc(nregions, sizeof(*g->regions));
    g->first_page = calloc(nregions + 1, sizeof(*g->first_page));
    g->vcpus = aligned_alloc(64, sizeof(struct vcpu) * nvcpus);
    if (g->vcpus)
        memset(g->vcpus, 0, sizeof(struct vcpu) * nvcpus);     /* (no stacks yet, for oom:) */
    if (!g->regions || !g->first_page || !g->vcpus)
        goto oom;
    memcpy(g->regions, regions, sizeof(*regions) * nregions);
    g->nregions = nregions;
    g->nvcpus = nvcpus;
    g->pattern = pattern;
    g->write_percent = write_percent;
    g->seed = seed;
    g->rate_limit = rate_limit;
    for (uint32_t i = 0; i < nregions; i++)
        g->first_page[i + 1] = g->first_page[i] + regions[i].length / TPS;
    g->total_pages = total;
    g->hot_pages = total * HOT_PERCENT_OF_PAGES / 100;
    if (g->hot_pages == 0)
        g->hot_pages = 1;
    /* hot: a never-touched-since-boot upper half, so migrations carry runs of zero pages */
    g->zero_tail_start = pattern == PC_GUEST_PATTERN_HOT ? total - total / 2 : UINT64_MAX;
    if (g->zero_tail_start < g->hot_pages)
        g->zero_tail_start = g->hot_pages;
    g->tag_mask = mix64(seed ^ 0x3C6EF372FE94F82BULL);
    for (uint32_t v = 0; v < nvcpus; v++) {
        struct vcpu *c = &g->vcpus[v];
        c->index = v;
        c->g = g;
        c->prng = prng_initial(g, v);
        c->read_hash = hash_initial(v);
        c->share_start = total * v / nvcpus;
        c->share_len = total * (v + 1) / nvcpus - c->share_start;
        c->stack = mmap(NULL, VCPU_STACK_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_POPULATE, -1, 0);
        if (c->stack == MAP_FAILED) {
            c->stack = NULL;
            goto oom;
        }
    }
    pthread_mutex_init(&g->ctl, NULL);
    pthread_mutex_init(&g->done_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->done_cond, &ca);
    pthread_cond_init(&g->release_cond, &ca);
    pthread_cond_init(&g->nap_cond, &ca);
    pthread_condattr_destroy(&ca);
    return g;
oom:
    if (g) {
        for (uint32_t v = 0; g->vcpus && v < nvcpus; v++)
            if (g->vcpus[v].stack)
                munmap(g->vcpus[v].stack, VCPU_STACK_SIZE);
        free(g->regions);
        free(g->first_page);
        free(g->vcpus);
        free(g);
    }
    set_err(err, errcap, "out of memory");
    return NULL;
}

void pc_guest_free(pc_guest *g)
{
    if (!g)
        return;
    pc_guest_stop(g);
    pc_guest_join(g);
    pthread_mutex_destroy(&g->ctl);
    pthread_mutex_destroy(&g->done_lock);
    pthread_cond_destroy(&g->done_cond);
    pthread_cond_destroy(&g->release_cond);
    pthread_cond_destroy(&g->nap_cond);
    for (uint32_t v = 0; v < g->nvcpus; v++)
        munmap(g->vcpus[v].stack, VCPU_STACK_SIZE);
    free(g->regions);
    free(g->first_page);
    free(g->vcpus);
    free(g);
}

uint32_t pc_guest_nvcpus(const pc_guest *g)
{
    return g->nvcpus;
}

uint64_t pc_guest_total_pages(const pc_guest *g)
{
    return g->total_pages;
}

/* ---- initial content ------------------------------------------------------------ */

static bool words_all_zero(const volatile uint64_t *p)
{
    for (uint32_t w = 0; w < WORDS_PER_PAGE; w++)
        if (p[w])
            return false;
    return true;
}

/* Under ctl: vCPU threads inside their loops. Stopped ones may not have ended yet (a vCPU
 * stopped asleep ends when it next runs): their state is written back all the same. */
static bool vcpus_running(const pc_guest *g)
{
    return g->threads_exist && atomic_load(&((pc_guest *)g)->active) != 0;
}

int pc_guest_fill_initial(pc_guest *g)
{
    uint64_t buf[WORDS_PER_PAGE];
    pthread_mutex_lock(&g->ctl);
    if (vcpus_running(g)) {
        pthread_mutex_unlock(&g->ctl);
        return -EBUSY;
    }
    for (uint32_t r = 0; r < g->nregions; r++) {
        uint64_t npages = g->regions[r].length / TPS;
        for (uint64_t p = 0; p < npages; p++) {
            uint64_t *dst = (uint64_t *)(uintptr_t)(g->regions[r].addr + p * TPS);
            initial_page_words(g, r, p, buf);
            /* reading a fresh anonymous zero page does not allocate it; writing would */
            if (buf[TAG_WORD] == 0 && words_all_zero(buf) && words_all_zero(dst))
                continue;
            memcpy(dst, buf, TPS);
        }
    }
    pthread_mutex_unlock(&g->ctl);
    return 0;
}

int pc_guest_initial_content(const pc_guest *g, uint32_t region, uint64_t offset, uint64_t length,
                             void *out)
{
    if (region >= g->nregions)
        return -EINVAL;
    const uint64_t region_length = g->regions[region].length;
    if (offset % TPS || length % TPS || offset > region_length || length > region_length - offset)
        return -ERANGE;
    uint64_t buf[WORDS_PER_PAGE];
    for (uint64_t done = 0; done < length; done += TPS) {
        initial_page_words(g, region, (offset + done) / TPS, buf);
        memcpy((uint8_t *)out + done, buf, TPS);
    }
    return 0;
}

/* ---- vCPU threads --------------------------------------------------------------- */


/* A vCPU's nap in its rate limit: asleep with its state written back, and stopped there by
 * pc_guest_request_stop (which then counts it out of its loop: it need not run to stop). */
enum { NAP_NONE, NAP_ASLEEP, NAP_STOPPED };

/* A vCPU's registers back in its struct: what pc_guest_save_state saves and the next start resumes. */
static void vcpu_write_back(struct vcpu *c, uint64_t prng, uint64_t position, uint64_t hash)
{
    c->prng = prng;
    c->position = position;
    c->read_hash = hash;
}

enum { THROTTLE_GO, THROTTLE_STOP, THROTTLE_STOPPED_ASLEEP };

/* Sleep until access number `done` (since start) is due: THROTTLE_GO, or THROTTLE_STOP when
 * asked to stop first. Before it sleeps the vCPU writes its state back (prng, position, hash)
 * and says so under done_lock: a stop finds it asleep and ends it there, without waking it
 * (THROTTLE_STOPPED_ASLEEP when it wakes: it leaves touching nothing). Waking an idle vCPU
 * cost 130-150 us here (likely an idle CPU's wakeup on this VM), all inside the downtime. */
static int throttle(struct vcpu *c, uint64_t start_ns, uint64_t done, uint64_t prng, uint64_t position,
                    uint64_t hash)
{
    pc_guest *g = c->g;
    uint64_t due = start_ns + (uint64_t)((double)done * 1e9 / (double)g->rate_limit);
    if (atomic_load_explicit(&g->stop, memory_order_relaxed))
        return THROTTLE_STOP;
    if (pc_now_ns() >= due)
        return THROTTLE_GO;
    struct timespec deadline = {.tv_sec = (time_t)(due / 1000000000ull), .tv_nsec = (long)(due % 1000000000ull)};
    int what = THROTTLE_GO;
    vcpu_write_back(c, prng, position, hash);
    pthread_mutex_lock(&g->done_lock);
    c->nap = NAP_ASLEEP;
    for (;;) {
        if (c->nap == NAP_STOPPED) {
            what = THROTTLE_STOPPED_ASLEEP;
            break;
        }
        if (atomic_load_explicit(&g->stop, memory_order_relaxed)) {
            what = THROTTLE_STOP;
            break;
        }
        if (pc_now_ns() >= due)
            break;
        pthread_cond_timedwait(&g->nap_cond, &g->done_lock, &deadline);
    }
    c->nap = NAP_NONE;
    pthread_mutex_unlock(&g->done_lock);
    return what;
}

/* Throttling (QEMU's cpu_throttle): a vCPU runs THROTTLE_SLICE_NS, then sleeps
 * pct / (100 - pct) of that; checked every THROTTLE_CHECK accesses. False if asked to stop. */
#define THROTTLE_SLICE_NS 10000000ull
#define THROTTLE_CHECK 256u
static bool throttle_pause(pc_guest *g, uint64_t *slice_start)
{
    uint32_t pct = atomic_load_explicit(&g->throttle_pct, memory_order_relaxed);
    uint64_t now = pc_now_ns();
    if (pct == 0 || now - *slice_start < THROTTLE_SLICE_NS) {
        if (pct == 0)
            *slice_start = now;
        return true;
    }
    if (pct > 99)
        pct = 99;
    uint64_t until = now + (now - *slice_start) * pct / (100 - pct);
    while (now < until) {
        if (atomic_load_explicit(&g->stop, memory_order_relaxed))
            return false;
        if (atomic_load_explicit(&g->throttle_pct, memory_order_relaxed) == 0)
            break;      /* released: run again at once */
        uint64_t nap = until - now < 500000ull ? until - now : 500000ull;  /* stop stays prompt */
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)nap};
        nanosleep(&ts, NULL);
        now = pc_now_ns();
    }
    *slice_start = pc_now_ns();
    return true;
}

void pc_guest_set_throttle(pc_guest *g, uint32_t percent)
{
    atomic_store(&g->throttle_pct, percent > 99 ? 99 : percent);
}

uint32_t pc_guest_throttle(const pc_guest *g)
{
    return atomic_load(&g->throttle_pct);
}

/* The nice a vCPU runs at under the vcpu_nice setting `setting`. */
static int vcpu_nice_for(const pc_guest *g, int setting)
{
    return setting == PC_GUEST_NICE_KEEP ? g->base_nice : setting;
}

/* Precopy: the vCPUs yield to the migration's threads (the sender, and on one host the
 * receiver): every vCPU running now and every one started later runs at `nice`;
 * PC_GUEST_NICE_KEEP puts the running ones back to the nice they started with (lowering
 * needs no privilege, putting back does: CAP_SYS_NICE or RLIMIT_NICE). Returns the
 * number of threads changed, or -errno of the first failure. */
int pc_guest_set_vcpu_nice(pc_guest *g, int nice)
{
    atomic_store(&g->vcpu_nice, nice);
    int changed = 0, err = 0;
    for (uint32_t v = 0; v < g->nvcpus; v++) {
        struct vcpu *c = &g->vcpus[v];
        uint32_t tid = atomic_load(&c->tid);
        if (!tid || !atomic_load(&c->in_loop))
            continue;
        int want = vcpu_nice_for(g, nice);
        if (setpriority(PRIO_PROCESS, (id_t)tid, want) == 0)
            changed++;
        else if (!err)
            err = -errno;
    }
    return err ? err : changed;
}

int pc_guest_vcpu_nice(const pc_guest *g)
{
    return atomic_load(&g->vcpu_nice);
}

/* A vCPU thread's own priority and name, and its kernel id recorded; returns the nice it took. */
static int vcpu_thread_setup(struct vcpu *c)
{
    pc_guest *g = c->g;
    /* Not its creator's priority: the destination makes and starts the guest on a
     * thread of the switch's path, raised above the guest (and with a short slice). */
    int nice = vcpu_nice_for(g, atomic_load(&g->vcpu_nice));
    (void)pc_thread_set_nice(nice);
    char name[16];      /* what ps -L and top -H show */
    snprintf(name, sizeof(name), "guest-vcpu%u", c->index);
    (void)pthread_setname_np(pthread_self(), name);
    atomic_store(&c->tid, (uint32_t)syscall(SYS_gettid));
    return nice;
}

static void vcpu_run(struct vcpu *c);

static void *vcpu_main(void *arg)
{
    struct vcpu *c = arg;
    vcpu_thread_setup(c);
    vcpu_run(c);
    return NULL;
}

/* A thread of pc_guest_prepare: set up, then parked until pc_guest_start (or an end). */
static void *vcpu_parked_main(void *arg)
{
    struct vcpu *c = arg;
    pc_guest *g = c->g;
    int nice = vcpu_thread_setup(c);
    /* Parked as SCHED_BATCH (same nice), whose wakeup never preempts the running thread: the
     * switch's thread releases the vCPUs at RUN and goes on to PONG 3; under SCHED_OTHER, EEVDF
     * ran a woken vCPU on its CPU at once, to the vCPU's first fault (measured: 25-280 us
     * of release). A free CPU still takes a released vCPU at once; back to SCHED_OTHER below. */
    struct sched_param param = { .sched_priority = 0 };
    bool batch = sched_setscheduler(0, SCHED_BATCH, &param) == 0;
    pthread_mutex_lock(&g->done_lock);
    g->nparked++;
    pthread_cond_broadcast(&g->done_cond);
    while (g->release == RELEASE_WAIT)
        pthread_cond_wait(&g->release_cond, &g->done_lock);
    int run = g->release == RELEASE_RUN;
    pthread_mutex_unlock(&g->done_lock);
    if (!run)
        return NULL;
    if (batch)
        (void)sched_setscheduler(0, SCHED_OTHER, &param);   /* wakeups preempt again (faults served) */
    int want = vcpu_nice_for(g, atomic_load(&g->vcpu_nice));
    if (want != nice)
        (void)pc_thread_set_nice(want);     /* precopy's writer priority changed meanwhile */
    vcpu_run(c);
    return NULL;
}

static void vcpu_run(struct vcpu *c)
{
    pc_guest *g = c->g;
    const uint32_t v = c->index;
    atomic_store(&c->in_loop, true);
    uint64_t prng = c->prng, position = c->position, hash = c->read_hash;
    uint64_t steps = atomic_load_explicit(&c->steps, memory_order_relaxed);
    uint64_t reads = atomic_load_explicit(&c->reads, memory_order_relaxed);
    uint64_t writes = atomic_load_explicit(&c->writes, memory_order_relaxed);
    const uint64_t start_ns = g->rate_limit ? pc_now_ns() : 0, first_step = steps;
    uint64_t slice_start = pc_now_ns();

    while (steps < c->limit && !atomic_load_explicit(&g->stop, memory_order_relaxed)) {
        if (g->rate_limit) {
            int nap = throttle(c, start_ns, steps - first_step, prng, position, hash);
            if (nap == THROTTLE_STOPPED_ASLEEP)
                return;     /* counted out by the stop, its state already written back */
            if (nap == THROTTLE_STOP)
                break;
        }
        if ((steps & (THROTTLE_CHECK - 1)) == 0 && !throttle_pause(g, &slice_start))
            break;
        bool is_write;
        uint64_t page = next_access(g, c, &prng, &position, &is_write);
        /* volatile: these are the guest's real memory accesses (and may fault) */
        volatile uint64_t *words = (volatile uint64_t *)page_ptr(g, page);
        if (is_write) {
            words[SLOT_WORD(v)] = words[SLOT_WORD(v)] + 1;
            atomic_store_explicit(&c->writes, ++writes, memory_order_relaxed);
        } else {
            hash = fold_read(hash, words[SLOT_WORD(v)], words[PATTERN_WORD(v)], words[TAG_WORD]);
            atomic_store_explicit(&c->reads, ++reads, memory_order_relaxed);
        }
        atomic_store_explicit(&c->steps, ++steps, memory_order_release);
    }
    vcpu_write_back(c, prng, position, hash);
    atomic_store(&c->in_loop, false);   /* pc_guest_stop renices only threads still here */

    pthread_mutex_lock(&g->done_lock);
    atomic_fetch_sub(&g->active, 1);
    pthread_cond_broadcast(&g->done_cond);
    pthread_mutex_unlock(&g->done_lock);
}

static void join_threads(pc_guest *g, uint32_t n)
{
    pthread_mutex_lock(&g->done_lock);
    pthread_cond_broadcast(&g->nap_cond);  /* vCPUs stopped asleep: they end now */
    pthread_mutex_unlock(&g->done_lock);
    for (uint32_t v = 0; v < n; v++)
        pthread_join(g->vcpus[v].thread, NULL);
}

/* Under ctl: the threads of stopped vCPUs ended (joined), before new ones use their stacks. */
static void reap_stopped(pc_guest *g)
{
    if (g->threads_exist && !vcpus_running(g)) {
        join_threads(g, g->nvcpus);
        g->threads_exist = false;
    }
}

/* Under ctl: the parked threads told what to do (RELEASE_RUN or RELEASE_EXIT). */
static void release_parked(pc_guest *g, int what)
{
    pthread_mutex_lock(&g->done_lock);
    g->release = what;
    pthread_mutex_unlock(&g->done_lock);
    /* after the unlock: woken under it, each thread ran at once only to wait for the lock
     * (traced: the switch's thread preempted twice more) */
    pthread_cond_broadcast(&g->release_cond);
    g->parked = false;
}

/* Under ctl: one thread per vCPU running `main`; on failure the ones made are ended. */
static int make_threads(pc_guest *g, void *(*main)(void *))
{
    for (uint32_t v = 0; v < g->nvcpus; v++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstack(&attr, g->vcpus[v].stack, VCPU_STACK_SIZE);
        int rc = pthread_create(&g->vcpus[v].thread, &attr, main, &g->vcpus[v]);
        pthread_attr_destroy(&attr);
        if (rc) {
            if (main == vcpu_parked_main) {
                release_parked(g, RELEASE_EXIT);
            } else {
                atomic_store(&g->stop, 1);
                atomic_fetch_sub(&g->active, g->nvcpus - v);
            }
            join_threads(g, v);
            return -rc;
        }
    }
    return 0;
}

int pc_guest_prepare(pc_guest *g)
{
    pthread_mutex_lock(&g->ctl);
    reap_stopped(g);
    int rc = 0;
    if (g->threads_exist) {
        rc = -EBUSY;
    } else if (!g->parked) {
        g->release = RELEASE_WAIT;
        g->nparked = 0;
        g->parked = true;
        rc = make_threads(g, vcpu_parked_main);    /* a failure ends those made (release_parked) */
        if (rc == 0) {
            /* set up (ids, names, priority) and waiting before this returns: none of it at the start */
            pthread_mutex_lock(&g->done_lock);
            while (g->nparked < g->nvcpus)
                pthread_cond_wait(&g->done_cond, &g->done_lock);
            pthread_mutex_unlock(&g->done_lock);
        }
    }
    pthread_mutex_unlock(&g->ctl);
    return rc;
}

int pc_guest_start(pc_guest *g, uint64_t nsteps)
{
    pthread_mutex_lock(&g->ctl);
    reap_stopped(g);
    if (g->threads_exist) {
        pthread_mutex_unlock(&g->ctl);
        return -EBUSY;
    }
    atomic_store(&g->stop, 0);
    for (uint32_t v = 0; v < g->nvcpus; v++) {
        struct vcpu *c = &g->vcpus[v];
        uint64_t steps = atomic_load(&c->steps);
        c->limit = (nsteps == 0 || steps + nsteps < steps) ? UINT64_MAX : steps + nsteps;
    }
    atomic_store(&g->active, g->nvcpus);
    int rc = 0;
    if (g->parked)
        release_parked(g, RELEASE_RUN);     /* made beforehand: no thread is made now */
    else
        rc = make_threads(g, vcpu_main);
    if (rc == 0)
        g->threads_exist = true;
    pthread_mutex_unlock(&g->ctl);
    return rc;
}

uint32_t pc_guest_vcpu_tids(pc_guest *g, uint32_t *out, uint32_t cap)
{
    uint32_t n = 0;
    for (uint32_t v = 0; v < g->nvcpus && v < cap; v++)
        if ((out[v] = atomic_load(&g->vcpus[v].tid)) != 0)
            n++;
    return n;
}

uint32_t pc_guest_wait_vcpu_tids(pc_guest *g, uint32_t *out, uint32_t cap, uint64_t timeout_ns)
{
    /* Fresh vCPU threads record their ids as their first step: yielding (not sleeping) finds
     * them as soon as they have run, which a destination starting its guest waits for. */
    uint64_t start = pc_now_ns(), now = start;
    uint32_t want = g->nvcpus < cap ? g->nvcpus : cap, n;
    while ((n = pc_guest_vcpu_tids(g, out, cap)) < want && now - start < timeout_ns) {
        if (now - start < 2000000) {
            sched_yield();
        } else {
            struct timespec nap = { 0, 200000 };    /* not started in 2 ms: a starved machine */
            nanosleep(&nap, NULL);
        }
        now = pc_now_ns();
    }
    return n;
}

void pc_guest_request_stop(pc_guest *g)
{
    /* A throttled vCPU checks the flag under done_lock, then naps; one asleep is stopped where
     * it sleeps and not woken here (only pc_guest_wait's waiters are): waking it took 40-110 us */
    pthread_mutex_lock(&g->done_lock);
    atomic_store(&g->stop, 1);
    for (uint32_t v = 0; v < g->nvcpus; v++) {
        struct vcpu *c = &g->vcpus[v];
        if (c->nap == NAP_ASLEEP) {        /* its state is written back: stopped where it sleeps */
            c->nap = NAP_STOPPED;
            atomic_store(&c->in_loop, false);
            atomic_fetch_sub(&g->active, 1);
        }
    }
    pthread_cond_broadcast(&g->done_cond);
    pthread_mutex_unlock(&g->done_lock);
}

int pc_guest_wait(pc_guest *g, int64_t timeout_ns)
{
    struct timespec deadline;
    if (timeout_ns >= 0) {
        uint64_t t = pc_now_ns() + (uint64_t)timeout_ns;
        deadline.tv_sec = (time_t)(t / 1000000000ull);
        deadline.tv_nsec = (long)(t % 1000000000ull);
    }
    int rc = 0;
    pthread_mutex_lock(&g->done_lock);
    while (atomic_load(&g->active) != 0) {
        if (timeout_ns < 0) {
            pthread_cond_wait(&g->done_cond, &g->done_lock);
        } else if (pthread_cond_timedwait(&g->done_cond, &g->done_lock, &deadline) == ETIMEDOUT) {
            rc = atomic_load(&g->active) ? -ETIMEDOUT : 0;
            break;
        }
    }
    pthread_mutex_unlock(&g->done_lock);
    return rc;
}

int pc_guest_join(pc_guest *g)
{
    pthread_mutex_lock(&g->ctl);
    if (g->threads_exist) {
        join_threads(g, g->nvcpus);
        g->threads_exist = false;
    } else if (g->parked) {
        release_parked(g, RELEASE_EXIT);    /* never started: they end without running */
        join_threads(g, g->nvcpus);
    }
    pthread_mutex_unlock(&g->ctl);
    return 0;
}

int pc_guest_stop(pc_guest *g)
{
    pc_guest_request_stop(g);
    /* A vCPU sees the request at its next access, but only once it runs: on a loaded host a
     * preempted vCPU may wait milliseconds for a CPU, and the whole wait is downtime. Raise
     * the ones still running so they reach their stop point first (they end right after; a
     * process without CAP_SYS_NICE just waits), with the short slice of the threads waiting
     * on the CPU for the switch (pc_thread_set_nice): EEVDF would pick those first. */
    for (uint32_t v = 0; v < g->nvcpus; v++) {
        uint32_t tid = atomic_load(&g->vcpus[v].tid);
        if (tid && atomic_load(&g->vcpus[v].in_loop))
            (void)pc_thread_set_nice_of(tid, PC_URGENT_NICE);
    }
    /* Out of their loops is stopped: the threads end after it (joined by pc_guest_join, or by
     * the next start), not inside the downtime (their exit and join took 8-33 us here). */
    return pc_guest_wait(g, -1);
}

uint32_t pc_guest_running(pc_guest *g)
{
    return atomic_load(&g->active);
}

int pc_guest_stats(const pc_guest *g, pc_guest_vcpu_stats *out, uint32_t cap)
{
    for (uint32_t v = 0; v < g->nvcpus && v < cap; v++) {
        struct vcpu *c = &g->vcpus[v];
        out[v].steps = atomic_load_explicit(&c->steps, memory_order_acquire);
        out[v].reads = atomic_load_explicit(&c->reads, memory_order_relaxed);
        out[v].writes = atomic_load_explicit(&c->writes, memory_order_relaxed);
    }
    return (int)g->nvcpus;
}

/* ---- saved state ---------------------------------------------------------------- */

static void put_le32(uint8_t *p, uint32_t x)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(x >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t x)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(x >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
    uint32_t x = 0;
    for (int i = 0; i < 4; i++)
        x |= (uint32_t)p[i] << (8 * i);
    return x;
}

static uint64_t get_le64(const uint8_t *p)
{
    uint64_t x = 0;
    for (int i = 0; i < 8; i++)
        x |= (uint64_t)p[i] << (8 * i);
    return x;
}

static uint64_t fnv1a64(const uint8_t *p, size_t n)
{
    uint64_t h = 0xCBF29CE484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001B3ULL;
    return h;
}

static size_t state_size_for(uint32_t nregions, uint32_t nvcpus)
{
    return STATE_HEADER_LEN + 8ull * nregions + (size_t)STATE_VCPU_LEN * nvcpus + 8;
}

size_t pc_guest_state_size(const pc_guest *g)
{
    return state_size_for(g->nregions, g->nvcpus);
}

/*
 * Layout (little-endian):
 *   0  magic "PCGUEST\0"      8  u32 version        12 u32 total length
 *   16 u32 pattern            20 u32 nvcpus         24 u32 nregions
 *   28 u32 write_percent      32 u64 seed
 *   40 nregions x u64 region length in bytes
 *   then nvcpus x {u64 steps, reads, writes, prng, position, read_hash}
 *   then u64 FNV-1a of everything before it
 */
int64_t pc_guest_save_state(const pc_guest *g, void *buf, size_t cap)
{
    size_t size = pc_guest_state_size(g);
    if (cap < size)
        return -ENOSPC;
    pc_guest *mg = (pc_guest *)g; /* the lock is not part of the logical state */
    pthread_mutex_lock(&mg->ctl);
    if (vcpus_running(g)) {
        pthread_mutex_unlock(&mg->ctl);
        return -EBUSY;
    }
    uint8_t *p = buf;
    memcpy(p, STATE_MAGIC, 8);
    put_le32(p + 8, PC_GUEST_STATE_VERSION);
    put_le32(p + 12, (uint32_t)size);
    put_le32(p + 16, g->pattern);
    put_le32(p + 20, g->nvcpus);
    put_le32(p + 24, g->nregions);
    put_le32(p + 28, g->write_percent);
    put_le64(p + 32, g->seed);
    uint8_t *q = p + STATE_HEADER_LEN;
    for (uint32_t r = 0; r < g->nregions; r++, q += 8)
        put_le64(q, g->regions[r].length);
    for (uint32_t v = 0; v < g->nvcpus; v++, q += STATE_VCPU_LEN) {
        const struct vcpu *c = &g->vcpus[v];
        put_le64(q, atomic_load(&c->steps));
        put_le64(q + 8, atomic_load(&c->reads));
        put_le64(q + 16, atomic_load(&c->writes));
        put_le64(q + 24, c->prng);
        put_le64(q + 32, c->position);
        put_le64(q + 40, c->read_hash);
    }
    put_le64(q, fnv1a64(p, (size_t)(q - p)));
    pthread_mutex_unlock(&mg->ctl);
    return (int64_t)size;
}

static uint64_t expected_position(const struct vcpu *c, const pc_guest *g, uint64_t steps)
{
    return g->pattern == PC_GUEST_PATTERN_SEQ ? steps % c->share_len : 0;
}

static int check_state(const pc_guest *g, const uint8_t *p, size_t len, char *err, size_t errcap)
{
    if (len < STATE_HEADER_LEN) {
        set_err(err, errcap, "state is %zu bytes, shorter than its %d-byte header", len,
                STATE_HEADER_LEN);
        return -EMSGSIZE;
    }
    if (memcmp(p, STATE_MAGIC, 8) != 0) {
        set_err(err, errcap, "bad magic %02x%02x%02x%02x%02x%02x%02x%02x (expected \"PCGUEST\\0\")",
                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
        return -EPROTO;
    }
    uint32_t version = get_le32(p + 8);
    if (version != PC_GUEST_STATE_VERSION) {
        set_err(err, errcap, "state version %u is not supported (this build reads version %d)",
                version, PC_GUEST_STATE_VERSION);
        return -EPROTONOSUPPORT;
    }
    uint32_t declared = get_le32(p + 12);
    if (declared != len) {
        set_err(err, errcap, "state header declares %u bytes but %zu were given (%s)", declared,
                len, len < declared ? "truncated" : "trailing bytes");
        return -EMSGSIZE;
    }
    uint32_t nvcpus = get_le32(p + 20), nregions = get_le32(p + 24);
    if (nvcpus != g->nvcpus) {
        set_err(err, errcap, "state has nvcpus=%u but this guest has nvcpus=%u", nvcpus, g->nvcpus);
        return -EINVAL;
    }
    if (nregions != g->nregions) {
        set_err(err, errcap, "state has %u regions but this guest has %u", nregions, g->nregions);
        return -EINVAL;
    }
    if (len != pc_guest_state_size(g)) {
        set_err(err, errcap, "state is %zu bytes, expected %zu for %u regions and %u vCPUs", len,
                pc_guest_state_size(g), nregions, nvcpus);
        return -EMSGSIZE;
    }
    uint32_t pattern = get_le32(p + 16), write_percent = get_le32(p + 28);
    uint64_t seed = get_le64(p + 32);
    if (pattern != g->pattern) {
        set_err(err, errcap, "state has pattern=%u but this guest has pattern=%u", pattern,
                g->pattern);
        return -EINVAL;
    }
    if (write_percent != g->write_percent) {
        set_err(err, errcap, "state has write_percent=%u but this guest has write_percent=%u",
                write_percent, g->write_percent);
        return -EINVAL;
    }
    if (seed != g->seed) {
        set_err(err, errcap, "state has seed=0x%llx but this guest has seed=0x%llx",
                (unsigned long long)seed, (unsigned long long)g->seed);
        return -EINVAL;
    }
    for (uint32_t r = 0; r < nregions; r++) {
        uint64_t length = get_le64(p + STATE_HEADER_LEN + 8ull * r);
        if (length != g->regions[r].length) {
            set_err(err, errcap, "state region %u has length=%llu but this guest's has length=%llu",
                    r, (unsigned long long)length, (unsigned long long)g->regions[r].length);
            return -EINVAL;
        }
    }
    uint64_t sum = get_le64(p + len - 8), want = fnv1a64(p, len - 8);
    if (sum != want) {
        set_err(err, errcap, "state checksum 0x%016llx does not match its content (0x%016llx)",
                (unsigned long long)sum, (unsigned long long)want);
        return -EBADMSG;
    }
    const uint8_t *q = p + STATE_HEADER_LEN + 8ull * nregions;
    for (uint32_t v = 0; v < nvcpus; v++, q += STATE_VCPU_LEN) {
        const struct vcpu *c = &g->vcpus[v];
        uint64_t steps = get_le64(q), reads = get_le64(q + 8), writes = get_le64(q + 16);
        uint64_t prng = get_le64(q + 24), position = get_le64(q + 32);
        if (reads + writes != steps) {
            set_err(err, errcap, "vCPU %u: reads=%llu + writes=%llu != steps=%llu", v,
                    (unsigned long long)reads, (unsigned long long)writes,
                    (unsigned long long)steps);
            return -EBADMSG;
        }
        if (prng != prng_initial(g, v) + 2 * steps * GAMMA) {
            set_err(err, errcap, "vCPU %u: PRNG state 0x%016llx is not the one after %llu steps",
                    v, (unsigned long long)prng, (unsigned long long)steps);
            return -EBADMSG;
        }
        if (position != expected_position(c, g, steps)) {
            set_err(err, errcap, "vCPU %u: position=%llu is not the one after %llu steps", v,
                    (unsigned long long)position, (unsigned long long)steps);
            return -EBADMSG;
        }
    }
    return 0;
}

int pc_guest_load_state(pc_guest *g, const void *buf, size_t len, char *err, size_t errcap)
{
    const uint8_t *p = buf;
    pthread_mutex_lock(&g->ctl);
    if (vcpus_running(g)) {
        pthread_mutex_unlock(&g->ctl);
        set_err(err, errcap, "the guest is running: stop it before loading state");
        return -EBUSY;
    }
    int rc = check_state(g, p, len, err, errcap);
    if (rc == 0) {
        const uint8_t *q = p + STATE_HEADER_LEN + 8ull * g->nregions;
        for (uint32_t v = 0; v < g->nvcpus; v++, q += STATE_VCPU_LEN) {
            struct vcpu *c = &g->vcpus[v];
            atomic_store(&c->steps, get_le64(q));
            atomic_store(&c->reads, get_le64(q + 8));
            atomic_store(&c->writes, get_le64(q + 16));
            c->prng = get_le64(q + 24);
            c->position = get_le64(q + 32);
            c->read_hash = get_le64(q + 40);
        }
    }
    pthread_mutex_unlock(&g->ctl);
    return rc;
}

/* ---- verification --------------------------------------------------------------- */

static bool is_slot_word(const pc_guest *g, uint32_t w)
{
    return w % 8 == 0 && w / 8 < g->nvcpus;
}

static void classify(const pc_guest *g, uint32_t region, uint64_t page_in_region,
                     const uint64_t *want, const volatile uint64_t *got, pc_guest_mismatch *m)
{
    uint32_t first = 0, first_other = WORDS_PER_PAGE;
    while (first < WORDS_PER_PAGE && want[first] == got[first])
        first++;
    for (uint32_t w = first; w < WORDS_PER_PAGE; w++) {
        if (!is_slot_word(g, w) && want[w] != got[w]) {
            first_other = w;
            break;
        }
    }
    memset(m, 0, sizeof(*m));
    m->region = region;
    m->offset = page_in_region * TPS;
    m->origin_region = -1;
    m->byte_offset = first * 8;
    m->expected = want[first];
    m->actual = got[first];
    if (words_all_zero(got)) {
        m->kind = PC_GUEST_MISMATCH_ZERO;
        return;
    }
    if (first_other == WORDS_PER_PAGE) {
        m->kind = PC_GUEST_MISMATCH_COUNTER;
        m->vcpu = first / 8;
        return;
    }
    /* does the tag name another page whose pattern this content carries? */
    uint64_t tag = got[TAG_WORD] ^ g->tag_mask;
    uint32_t r = (uint32_t)(tag >> 48);
    uint64_t p = tag & ((1ull << 48) - 1);
    if (r < g->nregions && p < g->regions[r].length / TPS && (r != region || p != page_in_region)) {
        uint64_t key = page_key(g, r, p);
        if (got[PATTERN_WORD(0)] == pattern_word(key, PATTERN_WORD(0))) {
            m->kind = PC_GUEST_MISMATCH_FOREIGN;
            m->origin_region = (int32_t)r;
            m->origin_offset = p * TPS;
            return;
        }
    }
    m->kind = PC_GUEST_MISMATCH_CONTENT;
    m->byte_offset = first_other * 8;
    m->expected = want[first_other];
    m->actual = got[first_other];
}

/* Expected value of one word of a page as it was initially (no region lookup needed). */
static inline uint64_t initial_word(const pc_guest *g, uint64_t global, uint32_t w)
{
    uint32_t r = region_of(g, global);
    uint64_t pr = global - g->first_page[r];
    uint64_t key = page_key(g, r, pr);
    if (page_is_zero(g, global, key))
        return 0;
    return w == TAG_WORD ? page_tag(g, r, pr) : pattern_word(key, w);
}

int pc_guest_verify(pc_guest *g, pc_guest_verify_result *res, pc_guest_mismatch *mm,
                    uint32_t mmcap)
{
    memset(res, 0, sizeof(*res));
    pthread_mutex_lock(&g->ctl);
    if (vcpus_running(g)) {
        pthread_mutex_unlock(&g->ctl);
        return -EBUSY;
    }
    const uint32_t nv = g->nvcpus;
    const uint64_t n = g->total_pages;
    /* writes[page * nv + v]: how many times vCPU v incremented its slot in that page */
    uint64_t *writes = calloc(n * nv, sizeof(uint64_t));
    if (!writes) {
        pthread_mutex_unlock(&g->ctl);
        return -ENOMEM;
    }

    for (uint32_t v = 0; v < nv; v++) {
        const struct vcpu *c = &g->vcpus[v];
        const uint64_t steps = atomic_load(&c->steps);
        uint64_t prng = prng_initial(g, v), position = 0, hash = hash_initial(v), reads = 0;
        for (uint64_t s = 0; s < steps; s++) {
            bool is_write;
            uint64_t page = next_access(g, c, &prng, &position, &is_write);
            uint64_t *count = &writes[page * nv + v];
            if (is_write) {
                (*count)++;
            } else {
                /* only v writes its slot, so the replay knows the value it read */
                uint64_t slot = initial_word(g, page, SLOT_WORD(v)) + *count;
                hash = fold_read(hash, slot, initial_word(g, page, PATTERN_WORD(v)),
                                 initial_word(g, page, TAG_WORD));
                reads++;
            }
        }
        if (hash != c->read_hash)
            res->read_hash_bad_mask |= 1u << v;
        if (prng != c->prng || position != c->position || reads != atomic_load(&c->reads) ||
            steps - reads != atomic_load(&c->writes))
            res->state_bad_mask |= 1u << v;
    }

    uint64_t want[WORDS_PER_PAGE];
    for (uint32_t r = 0; r < g->nregions; r++) {
        uint64_t npages = g->regions[r].length / TPS;
        for (uint64_t p = 0; p < npages; p++) {
            uint64_t global = g->first_page[r] + p;
            const volatile uint64_t *got =
                (const volatile uint64_t *)(uintptr_t)(g->regions[r].addr + p * TPS);
            initial_page_words(g, r, p, want);
            for (uint32_t v = 0; v < nv; v++)
                want[SLOT_WORD(v)] += writes[global * nv + v];
            res->pages_checked++;
            if (memcmp(want, (const void *)got, TPS) == 0)
                continue;
            res->pages_mismatched++;
            if (res->mismatches_reported < mmcap)
                classify(g, r, p, want, got, &mm[res->mismatches_reported++]);
        }
    }
    free(writes);
    pthread_mutex_unlock(&g->ctl);
    return 0;
}
