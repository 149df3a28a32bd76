/* Atomic bitmaps for fault filtering and received/dirty tracking. */
#include "bitmap.h"
#include "core.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define WORD_BITS 64u

static inline uint64_t word_index(uint64_t i) { return i / WORD_BITS; }
static inline uint64_t bit_mask(uint64_t i) { return 1ull << (i % WORD_BITS); }

uint64_t pc_bitmap_nwords(const pc_bitmap *b) { return (b->nbits + WORD_BITS - 1) / WORD_BITS; }

/* Mask of the valid bits in the last word (all ones when nbits is a multiple of 64). */
static inline uint64_t last_word_mask(const pc_bitmap *b)
{
    uint64_t rem = b->nbits % WORD_BITS;
    return rem ? (1ull << rem) - 1 : ~0ull;
}

pc_bitmap *pc_bitmap_new(uint64_t nbits)
{
    pc_bitmap *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->nbits = nbits;
    uint64_t n = pc_bitmap_nwords(b);
    /* every page allocated now: the destination's requested and received bitmaps take their
     * first writes at the started guest's first faults otherwise (on a lazily backed VM, up to
     * 60-90 us a page inside the downtime); 1 bit a 4 KiB page */
    b->words = pc_map_populated((n ? n : 1) * sizeof(uint64_t));
    if (!b->words) {
        free(b);
        return NULL;
    }
    return b;
}

void pc_bitmap_free(pc_bitmap *b)
{
    if (b) {
        uint64_t n = pc_bitmap_nwords(b);
        pc_unmap_populated(b->words, (n ? n : 1) * sizeof(uint64_t));
        free(b);
    }
}

int pc_bitmap_test(const pc_bitmap *b, uint64_t i)
{
    return (__atomic_load_n(&b->words[word_index(i)], __ATOMIC_ACQUIRE) & bit_mask(i)) != 0;
}

void pc_bitmap_set_atomic(pc_bitmap *b, uint64_t i)
{
    __atomic_fetch_or(&b->words[word_index(i)], bit_mask(i), __ATOMIC_ACQ_REL);
}

void pc_bitmap_clear_atomic(pc_bitmap *b, uint64_t i)
{
    __atomic_fetch_and(&b->words[word_index(i)], ~bit_mask(i), __ATOMIC_ACQ_REL);
}

int pc_bitmap_test_and_set_atomic(pc_bitmap *b, uint64_t i)
{
    uint64_t m = bit_mask(i);
    return (__atomic_fetch_or(&b->words[word_index(i)], m, __ATOMIC_ACQ_REL) & m) != 0;
}

/* Apply op to [start, start+n) one word at a time with a per-word mask. */
static void range_op(pc_bitmap *b, uint64_t start, uint64_t n, int set)
{
    if (n == 0)
        return;
    uint64_t end = start + n; /* exclusive; caller guarantees <= nbits */
    uint64_t w = word_index(start);
    uint64_t last = word_index(end - 1);
    for (; w <= last; w++) {
        uint64_t lo = w == word_index(start) ? start % WORD_BITS : 0;
        uint64_t hi = w == last ? (end - 1) % WORD_BITS : WORD_BITS - 1;
        uint64_t mask = (hi == 63 ? ~0ull : ((1ull << (hi + 1)) - 1)) & ~((1ull << lo) - 1);
        if (set)
            __atomic_fetch_or(&b->words[w], mask, __ATOMIC_ACQ_REL);
        else
            __atomic_fetch_and(&b->words[w], ~mask, __ATOMIC_ACQ_REL);
    }
}

void pc_bitmap_set_range_atomic(pc_bitmap *b, uint64_t start, uint64_t n) { range_op(b, start, n, 1); }
void pc_bitmap_clear_range_atomic(pc_bitmap *b, uint64_t start, uint64_t n) { range_op(b, start, n, 0); }

static uint64_t find_next(const pc_bitmap *b, uint64_t start, int want_set)
{
    if (start >= b->nbits)
        return b->nbits;
    uint64_t nw = pc_bitmap_nwords(b);
    uint64_t w = word_index(start);
    uint64_t word = __atomic_load_n(&b->words[w], __ATOMIC_ACQUIRE);
    if (!want_set)
        word = ~word;
    word &= ~0ull << (start % WORD_BITS);
    for (;;) {
        if (word) {
            uint64_t i = w * WORD_BITS + (uint64_t)__builtin_ctzll(word);
            return i < b->nbits ? i : b->nbits;
        }
        if (++w >= nw)
            return b->nbits;
        word = __atomic_load_n(&b->words[w], __ATOMIC_ACQUIRE);
        if (!want_set)
            word = ~word;
    }
}

uint64_t pc_bitmap_find_next_set(const pc_bitmap *b, uint64_t start) { return find_next(b, start, 1); }
uint64_t pc_bitmap_find_next_zero(const pc_bitmap *b, uint64_t start) { return find_next(b, start, 0); }

uint64_t pc_bitmap_count(const pc_bitmap *b)
{
    uint64_t total = 0, nw = pc_bitmap_nwords(b);
    for (uint64_t w = 0; w < nw; w++)
        total += (uint64_t)__builtin_popcountll(__atomic_load_n(&b->words[w], __ATOMIC_RELAXED));
    return total;
}

void pc_bitmap_invert(pc_bitmap *b)
{
    uint64_t nw = pc_bitmap_nwords(b);
    for (uint64_t w = 0; w < nw; w++)
        b->words[w] = ~b->words[w];
    if (nw)
        b->words[nw - 1] &= last_word_mask(b); /* keep padding bits zero */
}

uint64_t pc_bitmap_le_size(uint64_t nbits) { return ((nbits + 63) / 64) * 8; }

void pc_bitmap_to_le(const pc_bitmap *b, uint8_t *out)
{
    uint64_t nw = pc_bitmap_nwords(b);
    for (uint64_t w = 0; w < nw; w++) {
        uint64_t v = __atomic_load_n(&b->words[w], __ATOMIC_RELAXED);
        for (unsigned k = 0; k < 8; k++)
            out[w * 8 + k] = (uint8_t)(v >> (8 * k));
    }
}

int pc_bitmap_from_le(pc_bitmap *b, const uint8_t *data, uint64_t len)
{
    uint64_t nw = pc_bitmap_nwords(b);
    if (len != nw * 8)
        return -EINVAL;
    if (nw) {
        uint64_t v = 0;
        for (unsigned k = 0; k < 8; k++)
            v |= (uint64_t)data[(nw - 1) * 8 + k] << (8 * k);
        if (v & ~last_word_mask(b))
            return -ERANGE; /* padding bits set: reject before touching b */
    }
    for (uint64_t w = 0; w < nw; w++) {
        uint64_t v = 0;
        for (unsigned k = 0; k < 8; k++)
            v |= (uint64_t)data[w * 8 + k] << (8 * k);
        __atomic_store_n(&b->words[w], v, __ATOMIC_RELEASE);
    }
    return 0;
}
