/* A fast 64-bit hash of one 4 KiB target page, used by --verify on both roles.
 * Not cryptographic: it only has to make an accidental match of two different
 * pages vanishingly unlikely. Four independent lanes keep the multiplier busy. */
#ifndef PC_PAGEHASH_H
#define PC_PAGEHASH_H
#include <stdint.h>
#include <string.h>

#define PC_TARGET_PAGE_SIZE 4096u
#define PC_TARGET_PAGE_BITS 12u

static inline uint64_t pc_mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline uint64_t pc_page_hash(const uint8_t *page)
{
    uint64_t a = 0x9e3779b97f4a7c15ULL, b = 0xbf58476d1ce4e5b9ULL;
    uint64_t c = 0x94d049bb133111ebULL, d = 0x2545f4914f6cdd1dULL;
    for (unsigned i = 0; i < PC_TARGET_PAGE_SIZE; i += 32) {
        uint64_t w0, w1, w2, w3;
        memcpy(&w0, page + i, 8);
        memcpy(&w1, page + i + 8, 8);
        memcpy(&w2, page + i + 16, 8);
        memcpy(&w3, page + i + 24, 8);
        a = (a ^ w0) * 0x100000001b3ULL;
        b = (b ^ w1) * 0x100000001b3ULL;
        c = (c ^ w2) * 0x100000001b3ULL;
        d = (d ^ w3) * 0x100000001b3ULL;
    }
    return pc_mix64(a ^ pc_mix64(b ^ pc_mix64(c ^ pc_mix64(d))));
}

/* The hash of an all-zero page, computed once. */
static inline uint64_t pc_zero_page_hash(void)
{
    static uint64_t h;
    static int done;
    if (!__atomic_load_n(&done, __ATOMIC_ACQUIRE)) {
        static const uint8_t zero[PC_TARGET_PAGE_SIZE];
        h = pc_page_hash(zero);
        __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
    }
    return h;
}

/* True when the n bytes at p are all zero (n a multiple of 64). */
static inline int pc_is_zero(const uint8_t *p, uint64_t n)
{
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, 64);
        acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
        if (acc)
            return 0;
    }
    return 1;
}
#endif
