/* ramscan: scan and build QEMU RAM page records (migration/ram.c wire format).
 *
 * A record is a be64 word (byte offset in the block | flags), then, unless
 * CONTINUE is set, a counted idstr naming the block, then a body: one fill
 * byte for ZERO, TPS bytes for PAGE.  EOS (0x10) ends a chunk.  The scanner
 * validates and indexes records a buffer at a time so that Python never
 * handles one page; it never writes guest memory. */
#ifndef POSTCOPY_RAMSCAN_H
#define POSTCOPY_RAMSCAN_H

#include <stdint.h>

#define PC_RAM_FLAG_FULL          0x001
#define PC_RAM_FLAG_ZERO          0x002
#define PC_RAM_FLAG_MEM_SIZE      0x004
#define PC_RAM_FLAG_PAGE          0x008
#define PC_RAM_FLAG_EOS           0x010
#define PC_RAM_FLAG_CONTINUE      0x020
#define PC_RAM_FLAG_XBZRLE        0x040
#define PC_RAM_FLAG_HOOK          0x080
#define PC_RAM_FLAG_COMPRESS_PAGE 0x100
#define PC_RAM_FLAG_MULTIFD_FLUSH 0x200

#define PC_REC_ZERO 1
#define PC_REC_PAGE 2

#define PC_SCAN_NEED_DATA 0
#define PC_SCAN_EOS 1
#define PC_SCAN_FULL 2

#define PC_SCAN_E_UNKNOWN_BLOCK  (-1)  /* idstr names no known block */
#define PC_SCAN_E_NO_BLOCK       (-2)  /* CONTINUE with no previous block on this channel */
#define PC_SCAN_E_OFFSET         (-3)  /* offset >= used_length */
#define PC_SCAN_E_FLAGS          (-4)  /* not exactly one of ZERO/PAGE(+CONTINUE) or EOS */
#define PC_SCAN_E_MEM_SIZE       (-5)  /* MEM_SIZE outside the setup record */
#define PC_SCAN_E_XBZRLE         (-6)
#define PC_SCAN_E_COMPRESS       (-7)
#define PC_SCAN_E_HOOK           (-8)
#define PC_SCAN_E_MULTIFD_FLUSH  (-9)
#define PC_SCAN_E_ZERO_FILL      (-10) /* ZERO record with a non-zero fill byte */
#define PC_SCAN_E_EOS_OFFSET     (-11) /* EOS with non-zero offset bits */
#define PC_SCAN_E_EMPTY_IDSTR    (-12)
#define PC_SCAN_E_HOST_PAGE      (-13) /* postcopy: host page interrupted by another one */
#define PC_SCAN_E_ARGS           (-14) /* bad scanner arguments (tps not a power of two...) */

#define PC_ENC_E_BLOCK    (-1)  /* record names a block index out of range */
#define PC_ENC_E_DATA_POS (-2)  /* PAGE data outside the data buffer */
#define PC_ENC_E_KIND     (-3)  /* kind is neither ZERO nor PAGE */
#define PC_ENC_E_SPACE    (-4)  /* output buffer too small */
#define PC_ENC_E_CONTINUE (-5)  /* CONTINUE record for a block other than the previous one */
#define PC_ENC_E_IDSTR    (-6)  /* idstr length not in 1..255 */

typedef struct pc_ram_block_info {
    const char *idstr;
    uint32_t idlen;
    uint64_t used_length;
    uint64_t host_page_size;
} pc_ram_block_info;

typedef struct pc_ram_record {
    uint64_t offset;    /* byte offset in the block */
    uint64_t data_pos;  /* PAGE: first data byte in buf; ZERO: the fill byte */
    uint32_t block;     /* index into the block table */
    uint8_t kind;       /* PC_REC_ZERO / PC_REC_PAGE */
    uint8_t had_idstr;  /* 1 when the record carried its idstr (CONTINUE clear) */
    uint8_t fill;
    uint8_t pad;
} pc_ram_record;

typedef struct pc_ram_scan_state {
    int32_t last_block;        /* per channel, survives section ends; -1 none */
    uint64_t target_page_size; /* TPS, a power of two; flags are the bits below it */
    uint8_t postcopy;          /* enforce whole host pages, back to back (ram_load_postcopy) */
    int32_t hp_block;          /* host page being assembled (postcopy), -1 none */
    uint64_t hp_base;
    uint64_t hp_count;         /* target pages of it seen so far */
} pc_ram_scan_state;

void pc_ram_scan_init(pc_ram_scan_state *st, uint64_t target_page_size, int postcopy);

int64_t pc_ram_scan(pc_ram_scan_state *st, const pc_ram_block_info *blocks, uint32_t nblocks,
                    const uint8_t *buf, uint64_t len, pc_ram_record *out, uint32_t max_out,
                    uint32_t *nrec, int32_t *status, uint64_t *err_pos);

/* counts[2*b] += PAGE records of block b, counts[2*b+1] += ZERO records. */
void pc_ram_tally(const pc_ram_record *recs, uint32_t n, uint64_t *counts, uint32_t nblocks);

/* Writes the wire form of recs (data for PAGE records from data[data_pos..+tps]).
 * out == NULL: only computes the size.  Returns bytes (to be) written or PC_ENC_E_*;
 * on error *err_index is the offending record. */
int64_t pc_ram_encode(const pc_ram_block_info *blocks, uint32_t nblocks, uint64_t tps,
                      const pc_ram_record *recs, uint32_t n, const uint8_t *data,
                      uint64_t data_len, uint8_t *out, uint64_t out_cap, uint32_t *err_index);

#endif
