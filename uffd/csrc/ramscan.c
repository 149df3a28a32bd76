#include "ramscan.h"

#include "core.h"

#include <string.h>


void pc_ram_scan_init(pc_ram_scan_state *st, uint64_t target_page_size, int postcopy)
{
    st->last_block = -1;
    st->target_page_size = target_page_size;
    st->postcopy = postcopy ? 1 : 0;
    st->hp_block = -1;
    st->hp_base = 0;
    st->hp_count = 0;
}

static int32_t find_block(const pc_ram_block_info *blocks, uint32_t nblocks, int32_t hint,
                          const uint8_t *id, uint32_t idlen)
{
    /* Most records name the block of the previous one: try it first. */
    if (hint >= 0 && (uint32_t)hint < nblocks && blocks[hint].idlen == idlen &&
        memcmp(blocks[hint].idstr, id, idlen) == 0) {
        return hint;
    }
    for (uint32_t i = 0; i < nblocks; i++) {
        if (blocks[i].idlen == idlen && memcmp(blocks[i].idstr, id, idlen) == 0) {
            return (int32_t)i;
        }
    }
    return -1;
}

/* Error for a flags value that is neither ZERO/PAGE(+CONTINUE) nor EOS. */
static int32_t flags_error(uint64_t flags)
{
    uint64_t base = flags & ~(uint64_t)PC_RAM_FLAG_CONTINUE;
    switch (base) {
    case PC_RAM_FLAG_MEM_SIZE: return PC_SCAN_E_MEM_SIZE;
    case PC_RAM_FLAG_XBZRLE: return PC_SCAN_E_XBZRLE;
    case PC_RAM_FLAG_COMPRESS_PAGE: return PC_SCAN_E_COMPRESS;
    case PC_RAM_FLAG_HOOK: return PC_SCAN_E_HOOK;
    case PC_RAM_FLAG_MULTIFD_FLUSH: return PC_SCAN_E_MULTIFD_FLUSH;
    default: return PC_SCAN_E_FLAGS;
    }
}

int64_t pc_ram_scan(pc_ram_scan_state *st, const pc_ram_block_info *blocks, uint32_t nblocks,
                    const uint8_t *buf, uint64_t len, pc_ram_record *out, uint32_t max_out,
                    uint32_t *nrec, int32_t *status, uint64_t *err_pos)
{
    const uint64_t tps = st->target_page_size;
    uint64_t pos = 0;
    uint32_t n = 0;

    *nrec = 0;
    *err_pos = 0;
    if (tps < 1024 || (tps & (tps - 1)) != 0) {
        *status = PC_SCAN_E_ARGS;
        return 0;
    }
    for (;;) {
        const uint64_t start = pos;
        if (len - pos < 8) {
            *status = PC_SCAN_NEED_DATA;
            break;
        }
        const uint64_t word = pc_get_be64(buf + pos);
        const uint64_t flags = word & (tps - 1);
        const uint64_t offset = word & ~(tps - 1);
        if (flags == PC_RAM_FLAG_EOS) {
            if (offset != 0) {
                *status = PC_SCAN_E_EOS_OFFSET;
                *err_pos = start;
                break;
            }
            pos += 8;
            *status = PC_SCAN_EOS;
            break;
        }
        const uint64_t base = flags & ~(uint64_t)PC_RAM_FLAG_CONTINUE;
        if (base != PC_RAM_FLAG_ZERO && base != PC_RAM_FLAG_PAGE) {
            *status = flags_error(flags);
            *err_pos = start;
            break;
        }
        if (n == max_out) {
            *status = PC_SCAN_FULL;
            break;
        }
        uint64_t p = start + 8;
        int32_t blk;
        uint8_t had_idstr = 0;
        if (flags & PC_RAM_FLAG_CONTINUE) {
            blk = st->last_block;
            if (blk < 0) {
                *status = PC_SCAN_E_NO_BLOCK;
                *err_pos = start;
                break;
            }
        } else {
            if (len - p < 1) {
                *status = PC_SCAN_NEED_DATA;
                break;
            }
            const uint32_t idlen = buf[p];
            if (idlen == 0) {
                *status = PC_SCAN_E_EMPTY_IDSTR;
                *err_pos = start;
                break;
            }
            if (len - p - 1 < idlen) {
                *status = PC_SCAN_NEED_DATA;
                break;
            }
            blk = find_block(blocks, nblocks, st->last_block, buf + p + 1, idlen);
            if (blk < 0) {
                *status = PC_SCAN_E_UNKNOWN_BLOCK;
                *err_pos = start;
                break;
            }
            p += 1 + idlen;
            had_idstr = 1;
        }
        const pc_ram_block_info *b = &blocks[blk];
        if (offset >= b->used_length) {
            *status = PC_SCAN_E_OFFSET;
            *err_pos = start;
            break;
        }
        const uint64_t hps = b->host_page_size;
        const int huge = st->postcopy && hps > tps;
        const uint64_t hp_base = huge ? (offset & ~(hps - 1)) : 0;
        if (huge && st->hp_count > 0 && (st->hp_block != blk || st->hp_base != hp_base)) {
            *status = PC_SCAN_E_HOST_PAGE;
            *err_pos = start;
            break;
        }
        const uint64_t body = (base == PC_RAM_FLAG_ZERO) ? 1 : tps;
        if (len - p < body) {
            *status = PC_SCAN_NEED_DATA;
            break;
        }
        uint8_t fill = 0;
        if (base == PC_RAM_FLAG_ZERO) {
            fill = buf[p];
            if (fill != 0) {
                *status = PC_SCAN_E_ZERO_FILL;
                *err_pos = start;
                break;
            }
        }
        pc_ram_record *r = &out[n++];
        r->offset = offset;
        r->data_pos = p;
        r->block = (uint32_t)blk;
        r->kind = (base == PC_RAM_FLAG_ZERO) ? PC_REC_ZERO : PC_REC_PAGE;
        r->had_idstr = had_idstr;
        r->fill = fill;
        r->pad = 0;
        st->last_block = blk;
        if (huge) {
            if (st->hp_count == 0) {
                st->hp_block = blk;
                st->hp_base = hp_base;
            }
            if (++st->hp_count == hps / tps) {
                st->hp_count = 0;
                st->hp_block = -1;
            }
        }
        pos = p + body;
    }
    *nrec = n;
    return (int64_t)pos;
}

void pc_ram_tally(const pc_ram_record *recs, uint32_t n, uint64_t *counts, uint32_t nblocks)
{
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t b = recs[i].block;
        if (b < nblocks) {
            counts[2 * (uint64_t)b + (recs[i].kind == PC_REC_ZERO ? 1 : 0)]++;
        }
    }
}

int64_t pc_ram_encode(const pc_ram_block_info *blocks, uint32_t nblocks, uint64_t tps,
                      const pc_ram_record *recs, uint32_t n, const uint8_t *data,
                      uint64_t data_len, uint8_t *out, uint64_t out_cap, uint32_t *err_index)
{
    uint64_t pos = 0;
    int64_t last = -1;
    *err_index = 0;
    for (uint32_t i = 0; i < n; i++) {
        const pc_ram_record *r = &recs[i];
        *err_index = i;
        if (r->block >= nblocks) {
            return PC_ENC_E_BLOCK;
        }
        if (r->kind != PC_REC_ZERO && r->kind != PC_REC_PAGE) {
            return PC_ENC_E_KIND;
        }
        /* A leading CONTINUE refers to a block named before this batch. */
        if (!r->had_idstr && last >= 0 && (uint32_t)last != r->block) {
            return PC_ENC_E_CONTINUE;
        }
        const pc_ram_block_info *b = &blocks[r->block];
        if (r->had_idstr && (b->idlen == 0 || b->idlen > 255)) {
            return PC_ENC_E_IDSTR;
        }
        const uint64_t body = r->kind == PC_REC_ZERO ? 1 : tps;
        if (r->kind == PC_REC_PAGE && (r->data_pos > data_len || data_len - r->data_pos < tps)) {
            return PC_ENC_E_DATA_POS;
        }
        const uint64_t size = 8 + (r->had_idstr ? 1 + b->idlen : 0) + body;
        if (out != NULL) {
            if (out_cap - pos < size) {
                return PC_ENC_E_SPACE;
            }
            uint64_t flags = r->kind == PC_REC_ZERO ? PC_RAM_FLAG_ZERO : PC_RAM_FLAG_PAGE;
            if (!r->had_idstr) {
                flags |= PC_RAM_FLAG_CONTINUE;
            }
            uint8_t *o = out + pos;
            pc_put_be64(o, (r->offset & ~(tps - 1)) | flags);
            o += 8;
            if (r->had_idstr) {
                *o++ = (uint8_t)b->idlen;
                memcpy(o, b->idstr, b->idlen);
                o += b->idlen;
            }
            if (r->kind == PC_REC_ZERO) {
                *o = r->fill;
            } else {
                memcpy(o, data + r->data_pos, tps);
            }
        }
        pos += size;
        last = r->block;
    }
    return (int64_t)pos;
}
