// sta's overlap rules (docs/SEMANTICS.md, "sta's selection options"; the CPU reference is
// src/backend/cpu/sta.rs `consensus` and `exclusive`), applied to the finished masks of the P
// tasks that take part, after every task's mask is made and before the fuse reads them.
//
// masks_consensus: a lane stays in every part's mask where at least k parts have it. One thread
//   per 32-lane mask word: it reads the P words, counts each lane and writes the P words back.
//   Bytes per element: P/8 read, P/8 written.
// masks_exclusive: a lane stays only in the mask of the part with the largest key there among
//   the parts that have it, the lowest part among equal keys (keys order the normalised scores ŝ
//   exactly, so this is the CPU's `s[p] > s[best]` on floats). One thread per mask word; bytes
//   per element: P/8 read and written, 4·P of keys read (only where some part has the lane).
// Both clear the lanes at and beyond n in the last word, as the CPU's words hold zeros there,
// and add each part's kept count before the rule to kept_before[p] (the selection's own
// statistics are checked against it; the fuse counts the kept entries after it).
// The parts' masks (and keys) arrive as tables of device pointers, in task order.
//
// The host side: src/backend/cuda/group.rs (step 3b).

#include "common.cuh"

// The lanes of mask word w that are entries of an n-element tensor.
__device__ __forceinline__ u32 valid_lanes(size_t w, size_t n) {
    const size_t first = w * 32;
    return (n - first >= 32) ? 0xFFFFFFFFu : ((1u << (n - first)) - 1u);
}

// Grid: any (grid-stride over the ceil(n / 32) words), block: any.
extern "C" __global__ void masks_consensus(u32* const* masks, int parts, size_t n, u32 k,
                                           u64* kept_before) {
    const size_t words = (n + 31) / 32;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t w = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words;
         w += stride) {
        u32 keep = 0;
        for (int lane = 0; lane < 32; ++lane) {
            u32 count = 0;
            for (int p = 0; p < parts; ++p) count += (masks[p][w] >> lane) & 1u;
            keep |= static_cast<u32>(count >= k) << lane;
        }
        const u32 valid = valid_lanes(w, n);
        keep &= valid;
        for (int p = 0; p < parts; ++p) {
            const u32 before = masks[p][w] & valid;
            if (before != 0) atomicAdd(&kept_before[p], static_cast<u64>(__popc(before)));
            masks[p][w] = before & keep;
        }
    }
}

// Grid: any (grid-stride over the ceil(n / 32) words), block: any.
// In place, part by part: part p keeps lane l unless some part q that has l beats it (a larger
// key, or an equal key and q < p). Parts rewritten before p only lost lanes to the lane's winner,
// which keeps its bit, so "some part with the bit beats p" reads the same on the rewritten words.
// O(P² · 32) per word, with no per-lane array (which would live in local memory).
extern "C" __global__ void masks_exclusive(u32* const* masks, const u32* const* keys, int parts,
                                           size_t n, u64* kept_before) {
    const size_t words = (n + 31) / 32;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t w = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words;
         w += stride) {
        const u32 valid = valid_lanes(w, n);
        for (int p = 0; p < parts; ++p) {
            const u32 mine = masks[p][w] & valid;
            if (mine != 0) atomicAdd(&kept_before[p], static_cast<u64>(__popc(mine)));
            u32 word = 0;
            for (int lane = 0; lane < 32; ++lane) {
                if (((mine >> lane) & 1u) == 0) continue;
                const size_t i = w * 32 + lane;
                const u32 key = keys[p][i];
                bool beaten = false;
                for (int q = 0; q < parts && !beaten; ++q) {
                    if (q == p || ((masks[q][w] >> lane) & 1u) == 0) continue;
                    const u32 other = keys[q][i];
                    beaten = other > key || (other == key && q < p);
                }
                word |= static_cast<u32>(!beaten) << lane;
            }
            masks[p][w] = word;
        }
    }
}
