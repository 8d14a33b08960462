// select.cu: which entries a task keeps (docs/SEMANTICS.md "Selection" and "DARE keep decision").
//
// Top-k selection by threshold, never by sorting. T is the k-th largest u32 key, found by a
// radix select over three digits (bits 21..31, 10..20, 0..9), as in AIR top-k: each pass builds a
// histogram of the current digit over the keys that match the bits decided so far (shared-memory
// histograms per block, added into the SelectState), and the LAST block of the pass (atomic
// ticket) scans the histogram from the top and picks the bucket that holds the k-th largest key,
// updating the prefix, k_rem and count_gt on the device: no host round trip between passes.
// (For selection: model, score_keys/keys_normalize build each tensor's histogram with pick = 0,
// or select_filter does over keys kept on the device since pass 1, its pick unused; the host
// reads them back, adds them up over the task's tensors and picks each digit itself.)
// Pass 1 also copies the keys that match the pass-0 prefix into a candidate buffer, so pass 2
// reads only those. Keys equal to T are kept in increasing index order: select_tie_count counts
// keys == T per 8192-key tile, select_tie_cutoff finds the tile and then the index of the r-th
// one (cutoff = that index + 1), and select_mask writes the bit mask
//   m[i] = key[i] > T || (key[i] == T && i < cutoff).
// The tie kernels consume the state's tie quota (k_rem) and tie count (count_eq). With
// selection: model each tensor of a task, in plan order, gets a state whose passes are done at
// the host's T, with k_rem = the task's remaining tie quota and count_eq = ~0 (unknown), so
// select_tie_cutoff keeps min(e, quota) of its e ties; the host lowers the quota by that.
//
// Bytes per key: select_filter pass 0 or 1 reads 4 (+ 4 written per candidate in pass 1), pass 2
// reads 4 per candidate (or per key when pass 1 wrote none); select_tie_count reads 4 (only when
// some but not all keys == T are kept); select_mask reads 4 and writes 1/8. dare_mask reads
// nothing and writes 1/8 (it is arithmetic bound: one 64-bit hash per element).

#include "common.cuh"

#define TIE_TILE 8192        // keys per select_tie_count block; = CUTOFF_THREADS * 8
#define CUTOFF_THREADS 1024  // select_tie_cutoff runs as one block of this size

// Grid: any (1 block is plenty), block: any.
// Zeroes the three histograms and sets the header for a selection of k among n keys.
extern "C" __global__ void select_init(SelectState* st, u64 n, u64 k) {
    const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const size_t nthreads = static_cast<size_t>(gridDim.x) * blockDim.x;
    u64* hist = &st->hist[0][0];
    for (size_t b = tid; b < 3 * RADIX_BINS; b += nthreads) hist[b] = 0;
    if (tid == 0) {
        st->n = n;
        st->k = k;
        st->k_rem = k;
        st->count_gt = 0;
        st->count_eq = n;
        st->cutoff = 0;
        st->cand_len = NO_CANDIDATES;
        st->cand_fill = 0;
        st->bad = ~0ULL;
        st->prefix = 0;
        st->threshold = 0;
        st->passes_done = 0;
        st->ticket = 0;
        st->flags = 0;
        st->pad = 0;
    }
}

// Appends this thread's matching keys (bit j of `match` set: k[j] matches) to cand, with one
// global atomic per warp. Must be called by all 32 lanes of the warp.
__device__ __forceinline__ void append_candidates(const u32 k[4], u32 match, u32* cand, u64* fill) {
    const int lane = threadIdx.x & 31;
    const u32 mine = __popc(match);
    u32 incl = mine;  // inclusive scan of the counts over the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += y;
    }
    const u32 warp_total = __shfl_sync(FULL_MASK, incl, 31);
    if (warp_total == 0) return;  // the same in every lane
    u64 base = 0;
    if (lane == 0) base = atomicAdd(fill, static_cast<u64>(warp_total));
    base = __shfl_sync(FULL_MASK, base, 0);
    u64 pos = base + (incl - mine);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if ((match >> j) & 1u) cand[pos++] = k[j];
    }
}

// One radix pass over the keys of one tensor. Grid: any (grid-stride), block: exactly
// SELECT_THREADS (256).
//   pass 0: histogram of bits 21..31 of every key.
//   pass 1: histogram of bits 10..20 of the keys matching the pass-0 prefix; when cand != NULL and
//           those keys number <= cand_cap (st->count_eq), they are also copied to cand.
//   pass 2: histogram of bits 0..9 of the keys matching the 22-bit prefix, read from cand when
//           pass 1 filled it, else from keys.
// The last block picks the digit (radix_pick); after pass 2, st->threshold = T,
// st->count_gt = c_gt, st->k_rem = r, st->count_eq = number of keys == T.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
select_filter(const u32* keys, size_t n, SelectState* st, int pass, u32* cand, size_t cand_cap) {
    __shared__ u32 s_hist[RADIX_BINS];
    const u32 pmask = radix_prefix_mask(pass);
    const u32 prefix = st->prefix & pmask;
    const u32* src = keys;
    size_t len = n;
    if (pass == 2 && cand != nullptr && st->cand_len != NO_CANDIDATES) {
        src = cand;
        len = st->cand_len;
    }
    // read before the ticket, so before the last block's pick changes count_eq
    const bool write = pass == 1 && cand != nullptr && st->count_eq <= cand_cap;

    // The grid is sized for n by the host, which does not know how many candidates pass 1 kept:
    // only the blocks the data needs (one per 256 quads) zero, fill and flush a histogram; the
    // others (all but a few in a pass 2 over a few thousand candidates) only take the ticket.
    const size_t nquads = (len + 3) / 4;
    const size_t need = (nquads + SELECT_THREADS - 1) / SELECT_THREADS;
    const unsigned active = need < gridDim.x ? (need > 0 ? static_cast<unsigned>(need) : 1u)
                                             : gridDim.x;
    if (blockIdx.x < active) {
        for (int b = threadIdx.x; b < RADIX_BINS; b += blockDim.x) s_hist[b] = 0;
        __syncthreads();
        const size_t stride = static_cast<size_t>(active) * blockDim.x;
        // q0 is the same in every thread of the block, so every warp runs the same trip count
        // and the warp-synchronous append below sees all 32 lanes.
        for (size_t q0 = static_cast<size_t>(blockIdx.x) * blockDim.x; q0 < nquads;
             q0 += stride) {
            const size_t q = q0 + threadIdx.x;
            u32 k[4];
            const int valid = (q < nquads) ? load4_u32(src, q, len, k) : 0;
            u32 match = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (j < valid && (k[j] & pmask) == prefix) {
                    match |= 1u << j;
                    atomicAdd(&s_hist[radix_digit(k[j], pass)], 1u);
                }
            }
            if (write) append_candidates(k, match, cand, &st->cand_fill);
        }
        __syncthreads();
        flush_hist(s_hist, st->hist[pass], RADIX_BINS);
    }
    if (!last_block_ticket(&st->ticket)) return;
    if (threadIdx.x == 0) {
        st->ticket = 0;
        if (pass == 1) st->cand_len = write ? __ldcg(&st->cand_fill) : NO_CANDIDATES;
    }
    radix_pick(st, pass);
}

// Counts keys == st->threshold in each TIE_TILE-key tile: tile_counts[b] for block b, and adds
// the tensor's total into *total (may be NULL). Grid: exactly ceil(n / 8192) blocks, block:
// exactly SELECT_THREADS (256). With skip_trivial != 0 the whole grid returns at once when
// select_tie_cutoff will not need the counts (st->k_rem == 0: no tie is kept any more, or
// st->k_rem >= st->count_eq: every remaining tie is kept).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
select_tie_count(const u32* keys, size_t n, const SelectState* st, u32* tile_counts, u64* total,
                 int skip_trivial) {
    __shared__ u32 s_warp[SELECT_THREADS / 32];
    const u64 r = st->k_rem;
    if (skip_trivial && (r == 0 || r >= st->count_eq)) return;
    const u32 T = st->threshold;

    // the tile is keys [begin, end); begin is a multiple of 4, so quads never straddle tiles
    const size_t begin = static_cast<size_t>(blockIdx.x) * TIE_TILE;
    const size_t end = (begin >= n) ? begin : ((n - begin < TIE_TILE) ? n : begin + TIE_TILE);
    u32 count = 0;
    for (size_t q = begin / 4 + threadIdx.x; q * 4 < end; q += SELECT_THREADS) {
        u32 k[4];
        const int valid = load4_u32(keys, q, n, k);
#pragma unroll
        for (int j = 0; j < 4; ++j) count += (j < valid && k[j] == T) ? 1u : 0u;
    }
    count = __reduce_add_sync(FULL_MASK, count);
    if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 sum = 0;
#pragma unroll
        for (int w = 0; w < SELECT_THREADS / 32; ++w) sum += s_warp[w];
        tile_counts[blockIdx.x] = sum;
        if (total != nullptr && sum != 0) atomicAdd(total, static_cast<u64>(sum));
    }
}

// Sets st->cutoff for this tensor's keys and charges the kept ties to the quota. With
// r = st->k_rem (ties still to keep) and eq = st->count_eq (ties not yet visited, >= r):
//   r == 0:      cutoff = 0 (no key == T kept);
//   r >= eq:     cutoff = n (every key == T kept; the state is left as it is);
//   otherwise, with e = this tensor's keys == T (from the tile counts of select_tie_count):
//     r >= e:    cutoff = n, k_rem = r - e, count_eq = eq - e;
//     r < e:     cutoff = one past the index of the r-th key == T in increasing index order,
//                k_rem = 0, count_eq = eq - e.
// With selection: tensor, after the radix passes r and eq are the tensor's own, so this is the
// tie rule of docs/SEMANTICS.md; with selection: model, the host's fixed state per tensor
// (r = the task's remaining tie quota, eq = ~0) keeps the first min(e, r) ties of the tensor, and
// the host, visiting the tensors in plan order, lowers the quota by that.
// Grid: 1 block, block: exactly CUTOFF_THREADS (1024).
extern "C" __global__ void __launch_bounds__(CUTOFF_THREADS)
select_tie_cutoff(const u32* keys, size_t n, SelectState* st, const u32* tile_counts) {
    __shared__ u64 s_tmp[32];
    __shared__ u64 s_tile, s_rank;
    const u64 r = st->k_rem;  // every thread reads the state before any thread writes it
    const u64 eq = st->count_eq;
    const u32 T = st->threshold;
    const int tid = threadIdx.x;
    if (r == 0 || r >= eq) {
        if (tid == 0) st->cutoff = (r == 0) ? 0 : n;
        return;
    }

    // 1. the tile holding the r-th key == T: thread t sums a contiguous run of tile counts
    const size_t ntiles = (n + TIE_TILE - 1) / TIE_TILE;
    const size_t per = (ntiles + CUTOFF_THREADS - 1) / CUTOFF_THREADS;
    const size_t t0 = static_cast<size_t>(tid) * per;
    const size_t t1 = (t0 >= ntiles) ? t0 : ((ntiles - t0 < per) ? ntiles : t0 + per);
    u64 mine = 0;
    for (size_t t = t0; t < t1; ++t) mine += tile_counts[t];
    if (tid == 0) s_tile = ~0ULL;
    u64 total;  // e: this tensor's keys == T
    u64 before = block_exclusive_scan<CUTOFF_THREADS>(mine, s_tmp, &total);
    if (total > eq) {  // the state does not belong to these keys: a host bug
        if (tid == 0) {
            st->flags |= SELECT_FLAG_TIE_FAILED;
            st->cutoff = n;
        }
        return;
    }
    if (r >= total) {  // every key == T of this tensor is kept
        if (tid == 0) {
            st->cutoff = n;
            st->k_rem = r - total;
            st->count_eq = eq - total;
        }
        return;
    }
    if (before < r && r <= before + mine) {  // exactly one thread
        u64 a = before;
        for (size_t t = t0; t < t1; ++t) {
            const u64 c = tile_counts[t];
            if (a + c >= r) {
                s_tile = t;
                s_rank = r - a;  // rank inside the tile, >= 1
                break;
            }
            a += c;
        }
    }
    __syncthreads();  // s_tile is always set here: r < total
    if (tid == 0) {
        st->k_rem = 0;
        st->count_eq = eq - total;
    }

    // 2. inside the tile: thread t holds the 8 consecutive keys begin + 8t .. begin + 8t + 7
    const size_t first = s_tile * TIE_TILE + static_cast<size_t>(tid) * 8;
    const u64 rank = s_rank;
    u32 k[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) load4_u32(keys, first / 4 + h, n, k + 4 * h);
    u64 count = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) count += (first + j < n && k[j] == T) ? 1 : 0;
    before = block_exclusive_scan<CUTOFF_THREADS>(count, s_tmp, &total);
    if (before < rank && rank <= before + count) {  // exactly one thread
        u64 a = before;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (first + j < n && k[j] == T) {
                ++a;
                if (a == rank) {
                    st->cutoff = first + j + 1;
                    break;
                }
            }
        }
    }
}

// Writes the bit mask m[i] = key[i] > T || (key[i] == T && i < cutoff), T and cutoff read from
// the state: all 2 * ceil(n / 64) u32 words, bits past n zero. Grid: any (grid-stride), block:
// any multiple of 32 (SELECT_THREADS suggested). Each warp handles 4 consecutive words (128 keys)
// per step: lane l reads key 32w + l of each, and a ballot makes word w.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
select_mask(const u32* keys, size_t n, const SelectState* st, u32* mask) {
    const u32 T = st->threshold;
    const u64 cutoff = st->cutoff;
    const size_t nwords = mask_words32(n);
    const int lane = threadIdx.x & 31;
    const size_t warp = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const size_t nwarps = (static_cast<size_t>(gridDim.x) * blockDim.x) >> 5;
    for (size_t w0 = warp * 4; w0 < nwords; w0 += nwarps * 4) {
        u32 key[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const size_t i = (w0 + u) * 32 + lane;
            key[u] = (i < n) ? __ldg(keys + i) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const size_t i = (w0 + u) * 32 + lane;
            const bool keep = i < n && (key[u] > T || (key[u] == T && i < cutoff));
            const u32 word = __ballot_sync(FULL_MASK, keep);
            if (lane == 0 && w0 + u < nwords) mask[w0 + u] = word;
        }
    }
}

// Breadcrumbs' band (docs/SEMANTICS.md "Sparsifying methods"): clears from a finished mask the
// entries that st keeps, m[i] &= !(key[i] > T || (key[i] == T && i < cutoff)). Run over the mask of
// the top drop + keep with the state of the top drop, it leaves ranks drop .. drop + keep: the
// CPU's band (two selections by the same tie rule, the second's keeps a subset of the first's).
// Words and lanes as select_mask (bits past n stay zero). Grid: any (grid-stride), block: any
// multiple of 32 (SELECT_THREADS suggested).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
select_mask_clear(const u32* keys, size_t n, const SelectState* st, u32* mask) {
    const u32 T = st->threshold;
    const u64 cutoff = st->cutoff;
    const size_t nwords = mask_words32(n);
    const int lane = threadIdx.x & 31;
    const size_t warp = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const size_t nwarps = (static_cast<size_t>(gridDim.x) * blockDim.x) >> 5;
    for (size_t w = warp; w < nwords; w += nwarps) {
        const size_t i = w * 32 + lane;
        const u32 key = (i < n) ? __ldg(keys + i) : 0u;
        const bool top = i < n && (key > T || (key == T && i < cutoff));
        const u32 word = __ballot_sync(FULL_MASK, top);
        if (lane == 0) mask[w] &= ~word;
    }
}

// DARE: keep(i) = (h(i) >> 32) < threshold with h(i) = fmix(stream + (i + 1) * golden), written as
// the bit mask (all 2 * ceil(n / 64) u32 words, bits past n zero); threshold = floor(d * 2^32)
// (2^32 keeps every entry). *kept (may be NULL) gets the number of kept entries added.
// Grid: any (grid-stride), block: exactly SELECT_THREADS (256).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
dare_mask(size_t n, u64 stream, u64 threshold, u32* mask, u64* kept) {
    __shared__ u64 s_warp[SELECT_THREADS / 32];
    const size_t nwords = mask_words32(n);
    const int lane = threadIdx.x & 31;
    const size_t warp = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const size_t nwarps = (static_cast<size_t>(gridDim.x) * blockDim.x) >> 5;
    u64 count = 0;  // meaningful in lane 0
    for (size_t w = warp; w < nwords; w += nwarps) {
        const size_t i = w * 32 + lane;
        const bool keep = i < n && (dare_hash(stream, i) >> 32) < threshold;
        const u32 word = __ballot_sync(FULL_MASK, keep);
        if (lane == 0) {
            mask[w] = word;
            count += __popc(word);
        }
    }
    if (kept == nullptr) return;
    if (lane == 0) s_warp[threadIdx.x >> 5] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
        u64 sum = 0;
#pragma unroll
        for (int w = 0; w < SELECT_THREADS / 32; ++w) sum += s_warp[w];
        if (sum != 0) atomicAdd(kept, sum);
    }
}
