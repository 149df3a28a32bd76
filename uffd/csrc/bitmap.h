/* Bitmaps over C memory, one bit per target page, safe to update from many C
 * threads (the *_atomic functions). Bits at or past nbits are always zero, so
 * the word array is also QEMU's little-endian received-bitmap layout on a
 * little-endian host. */
#ifndef PC_BITMAP_H
#define PC_BITMAP_H

#include <stdint.h>

typedef struct pc_bitmap { uint64_t nbits; uint64_t *words; } pc_bitmap;

pc_bitmap *pc_bitmap_new(uint64_t nbits); /* NULL on allocation failure */
void pc_bitmap_free(pc_bitmap *b);
uint64_t pc_bitmap_nwords(const pc_bitmap *b);

int pc_bitmap_test(const pc_bitmap *b, uint64_t i);
void pc_bitmap_set_atomic(pc_bitmap *b, uint64_t i);
void pc_bitmap_clear_atomic(pc_bitmap *b, uint64_t i);
int pc_bitmap_test_and_set_atomic(pc_bitmap *b, uint64_t i);      /* returns old bit */
void pc_bitmap_set_range_atomic(pc_bitmap *b, uint64_t start, uint64_t n);
void pc_bitmap_clear_range_atomic(pc_bitmap *b, uint64_t start, uint64_t n);
uint64_t pc_bitmap_find_next_set(const pc_bitmap *b, uint64_t start);   /* nbits if none */
uint64_t pc_bitmap_find_next_zero(const pc_bitmap *b, uint64_t start);  /* nbits if none */
uint64_t pc_bitmap_count(const pc_bitmap *b);
/* Complement within nbits; not atomic against concurrent writers. */
void pc_bitmap_invert(pc_bitmap *b);

/* QEMU received-bitmap wire layout: bit i is bit i%8 of byte i/8, the length
 * rounded up to 8 bytes. */
uint64_t pc_bitmap_le_size(uint64_t nbits);
void pc_bitmap_to_le(const pc_bitmap *b, uint8_t *out);                  /* out: le_size bytes */
int pc_bitmap_from_le(pc_bitmap *b, const uint8_t *data, uint64_t len);  /* 0, -EINVAL wrong size, -ERANGE padding bits set */

#endif /* PC_BITMAP_H */
