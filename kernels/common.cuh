// common.cuh: what score.cu, select.cu and fuse.cu share.
//
// - dtype codes and loads/stores: fp32/fp16/bf16 in memory, fp32 in registers. Widening is exact;
//   narrowing rounds to nearest even (__float2half_rn, __float2bfloat16_rn); every store writes a
//   NaN as the canonical NaN of its dtype.
// - "groups" of 8 consecutive elements: element 8g+j is lane j of group g. A group is read with
//   16-byte vector loads (one uint4 of 8 halves, or two float4) when the whole group lies inside
//   the tensor and the pointer is 16-byte aligned, and element by element otherwise (the tail
//   group, or a misaligned pointer). Elements at or past n read as 0 and are never written.
// - sortable keys: key(s) = bits(s) ^ (sign(s) ? 0xFFFFFFFF : 0x80000000) (docs/SEMANTICS.md).
// - the radix digits (11, 11, 10 bits from the top), the SelectState struct the select kernels
//   keep on the device, and the last-block pick that turns a histogram into the next digit.
// - the DARE counter hash (fmix64).
// - block-wide scans used by the select kernels.
//
// Every element count and index is 64-bit (size_t / unsigned long long); 32-bit quantities are
// only block-local (thread ids, per-block shared-memory counters).

#pragma once

#include <stddef.h>
#include <stdint.h>
#ifdef __CUDACC__  // (kernels/emu/cuda_emu.h, the CPU emulation, defines these types itself)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

typedef unsigned long long u64;
typedef unsigned int u32;

#define FULL_MASK 0xffffffffu

// ----------------------------------------------------------------------------------------------
// dtypes

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ bool is_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ bool is_finite_f32(float x) {
    return (__float_as_uint(x) & 0x7F800000u) != 0x7F800000u;
}
__device__ __forceinline__ bool is_nan_f32(float x) {
    return (__float_as_uint(x) & 0x7FFFFFFFu) > 0x7F800000u;
}

// fp16 / bf16 bit patterns (low 16 bits of h) to f32; both are exact.
__device__ __forceinline__ float f16_bits_to_f32(u32 h) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xFFFFu)));
}
__device__ __forceinline__ float bf16_bits_to_f32(u32 h) {
    return __uint_as_float((h & 0xFFFFu) << 16);
}

// One element p[i] of dtype dt, as f32.
__device__ __forceinline__ float load1(const void* p, int dt, size_t i) {
    if (dt == DT_F16) {
        return f16_bits_to_f32(__ldg(static_cast<const unsigned short*>(p) + i));
    } else if (dt == DT_BF16) {
        return bf16_bits_to_f32(__ldg(static_cast<const unsigned short*>(p) + i));
    }
    return __ldg(static_cast<const float*>(p) + i);
}

// Group g (elements 8g .. 8g+7) of p as f32; elements at or past n read as 0.
__device__ __forceinline__ void load8(const void* p, int dt, size_t g, size_t n, float v[8]) {
    const size_t i0 = g * 8;
    if (i0 + 8 <= n && is_aligned16(p)) {
        if (dt == DT_F32) {
            const float4 a = __ldg(static_cast<const float4*>(p) + 2 * g);
            const float4 b = __ldg(static_cast<const float4*>(p) + 2 * g + 1);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        } else {
            const uint4 r = __ldg(static_cast<const uint4*>(p) + g);
            const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                // little endian: the lower half of each word is the earlier element
                if (dt == DT_F16) {
                    v[2 * q] = f16_bits_to_f32(w[q]);
                    v[2 * q + 1] = f16_bits_to_f32(w[q] >> 16);
                } else {
                    v[2 * q] = bf16_bits_to_f32(w[q]);
                    v[2 * q + 1] = bf16_bits_to_f32(w[q] >> 16);
                }
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            v[j] = (i0 + j < n) ? load1(p, dt, i0 + j) : 0.0f;
        }
    }
}

// ----------------------------------------------------------------------------------------------
// loads in flight: raw bytes first, widening after
//
// A memory-bound kernel keeps the memory system busy only with enough bytes in flight: on an
// H200 about 25 KB per SM (4.8 TB/s x ~0.7 us / 132 SMs). load8 above branches on the dtype and
// widens each 16-byte load as it arrives, so a thread that reads several inputs waits for each in
// turn. The fast paths instead issue the raw uint4 of every input of a group (load_raw8), then
// widen (widen8): the loads go out back to back, one latency for all of them. The dtype is a
// template parameter, chosen once per launch (uniform_dtype); DT_MIXED is the general path
// (per-pointer dtypes, misaligned pointers), which also takes every tensor's tail group.

#define DT_MIXED (-1)  // template tag: dtypes per pointer at run time (load8/store8)

// The bytes of one group of 8 elements of dtype DT as loaded: one uint4 (fp16/bf16) or two (fp32).
template <int DT> struct Raw8 {
    uint4 w[DT == DT_F32 ? 2 : 1];
};

// Group g of p (16-byte aligned, the whole group inside the tensor), not yet widened.
template <int DT> __device__ __forceinline__ Raw8<DT> load_raw8(const void* p, size_t g) {
    Raw8<DT> r;
    if constexpr (DT == DT_F32) {
        r.w[0] = __ldg(static_cast<const uint4*>(p) + 2 * g);
        r.w[1] = __ldg(static_cast<const uint4*>(p) + 2 * g + 1);
    } else {
        r.w[0] = __ldg(static_cast<const uint4*>(p) + g);
    }
    return r;
}

template <int DT> __device__ __forceinline__ void widen8(const Raw8<DT>& r, float v[8]) {
    if constexpr (DT == DT_F32) {
        const u32 w[8] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w,
                          r.w[1].x, r.w[1].y, r.w[1].z, r.w[1].w};
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __uint_as_float(w[j]);
    } else {
        const u32 w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // little endian: the lower half is the earlier element
            if constexpr (DT == DT_F16) {
                v[2 * q] = f16_bits_to_f32(w[q]);
                v[2 * q + 1] = f16_bits_to_f32(w[q] >> 16);
            } else {
                v[2 * q] = bf16_bits_to_f32(w[q]);
                v[2 * q + 1] = bf16_bits_to_f32(w[q] >> 16);
            }
        }
    }
}

// Zero bytes, for inputs a mode does not read (the compiler drops them).
template <int DT> __device__ __forceinline__ Raw8<DT> zero_raw8() {
    Raw8<DT> r;
#pragma unroll
    for (int i = 0; i < (DT == DT_F32 ? 2 : 1); ++i) r.w[i] = make_uint4(0u, 0u, 0u, 0u);
    return r;
}

// The dtype every input of a launch shares when each is 16-byte aligned (the fast path's
// template argument), else DT_MIXED. p[i] NULL: not read, not checked.
__device__ __forceinline__ int uniform_dtype(int dt, const void* p, int p_dt) {
    if (p == nullptr) return dt;
    return (dt != DT_MIXED && p_dt == dt && is_aligned16(p)) ? dt : DT_MIXED;
}

// The one NaN every output holds, whatever NaN was computed (docs/SEMANTICS.md, "Output dtype"):
// positive, quiet, no payload. The hardware writes its own canonical NaN (0x7FFFFFFF, and 0x7FFF
// from the fp16/bf16 conversions) where x86 and the CPU backend keep sign and payload, so both
// backends write these instead. A NaN output comes only from finite inputs whose task vectors
// overflow (NaN inputs are errors).
#define CANONICAL_NAN_F32 0x7FC00000u
#define CANONICAL_NAN_F16 0x7E00u
#define CANONICAL_NAN_BF16 0x7FC0u

// f32 to the bit pattern of dtype dt (16-bit dtypes in the low half), rounding to nearest even;
// a NaN becomes the canonical NaN.
__device__ __forceinline__ u32 f32_to_f16_bits(float x) {
    return is_nan_f32(x) ? CANONICAL_NAN_F16 : __half_as_ushort(__float2half_rn(x));
}
__device__ __forceinline__ u32 f32_to_bf16_bits(float x) {
    return is_nan_f32(x) ? CANONICAL_NAN_BF16 : __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ float f32_canonical(float x) {
    return is_nan_f32(x) ? __uint_as_float(CANONICAL_NAN_F32) : x;
}

__device__ __forceinline__ void store1(void* p, int dt, size_t i, float x) {
    if (dt == DT_F16) {
        static_cast<unsigned short*>(p)[i] = static_cast<unsigned short>(f32_to_f16_bits(x));
    } else if (dt == DT_BF16) {
        static_cast<unsigned short*>(p)[i] = static_cast<unsigned short>(f32_to_bf16_bits(x));
    } else {
        static_cast<float*>(p)[i] = f32_canonical(x);
    }
}

// Writes group g of p; elements at or past n are not written.
__device__ __forceinline__ void store8(void* p, int dt, size_t g, size_t n, const float v[8]) {
    const size_t i0 = g * 8;
    if (i0 + 8 <= n && is_aligned16(p)) {
        if (dt == DT_F32) {
            static_cast<float4*>(p)[2 * g] = make_float4(f32_canonical(v[0]), f32_canonical(v[1]),
                                                         f32_canonical(v[2]), f32_canonical(v[3]));
            static_cast<float4*>(p)[2 * g + 1] = make_float4(f32_canonical(v[4]), f32_canonical(v[5]),
                                                             f32_canonical(v[6]), f32_canonical(v[7]));
        } else {
            u32 w[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float a = v[2 * q], b = v[2 * q + 1];
                const u32 lo = (dt == DT_F16) ? f32_to_f16_bits(a) : f32_to_bf16_bits(a);
                const u32 hi = (dt == DT_F16) ? f32_to_f16_bits(b) : f32_to_bf16_bits(b);
                w[q] = lo | (hi << 16);
            }
            static_cast<uint4*>(p)[g] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (i0 + j < n) store1(p, dt, i0 + j, v[j]);
        }
    }
}

// Group g of 8 u32 keys; positions at or past n are not written.
__device__ __forceinline__ void store8_u32(u32* p, size_t g, size_t n, const u32 k[8]) {
    const size_t i0 = g * 8;
    if (i0 + 8 <= n && is_aligned16(p)) {
        reinterpret_cast<uint4*>(p)[2 * g] = make_uint4(k[0], k[1], k[2], k[3]);
        reinterpret_cast<uint4*>(p)[2 * g + 1] = make_uint4(k[4], k[5], k[6], k[7]);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (i0 + j < n) p[i0 + j] = k[j];
        }
    }
}

// Quad q of u32 keys (elements 4q .. 4q+3); returns how many of them are < n (0..4).
// Entries past n are set to 0. Plain loads, not __ldg: keys_normalize rewrites its keys in place.
__device__ __forceinline__ int load4_u32(const u32* p, size_t q, size_t n, u32 k[4]) {
    const size_t i0 = q * 4;
    if (i0 + 4 <= n && is_aligned16(p)) {
        const uint4 r = reinterpret_cast<const uint4*>(p)[q];
        k[0] = r.x; k[1] = r.y; k[2] = r.z; k[3] = r.w;
        return 4;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) k[j] = (i0 + j < n) ? p[i0 + j] : 0u;
    return (i0 >= n) ? 0 : static_cast<int>((n - i0) < 4 ? (n - i0) : 4);
}

// ----------------------------------------------------------------------------------------------
// sortable keys

__device__ __forceinline__ u32 float_to_key(float s) {
    const u32 b = __float_as_uint(s);
    return b ^ ((b & 0x80000000u) ? 0xFFFFFFFFu : 0x80000000u);
}

__device__ __forceinline__ float key_to_float(u32 key) {
    return __uint_as_float((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

// ----------------------------------------------------------------------------------------------
// the bit mask: bit i of a little-endian bit string, i.e. bit (i % 32) of u32 word i / 32, which
// is bit (i % 64) of u64 word i / 64 and bit (i % 8) of byte i / 8. A mask over n elements has
// 2 * ceil(n / 64) u32 words (whole u64 words); bits at or past n are 0.

__device__ __forceinline__ size_t mask_words32(size_t n) { return 2 * ((n + 63) / 64); }

// ----------------------------------------------------------------------------------------------
// DARE counter hash (docs/SEMANTICS.md). The host computes
//   stream = fmix(fmix(seed ^ fmix(task_index + 1)) ^ fnv1a64(tensor name))
// and passes it in; the kernel evaluates h(i) per element.

__host__ __device__ __forceinline__ u64 fmix64(u64 z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ULL;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return z;
}

__device__ __forceinline__ u64 dare_hash(u64 stream, u64 i) {
    return fmix64(stream + (i + 1) * 0x9E3779B97F4A7C15ULL);
}

// ----------------------------------------------------------------------------------------------
// radix select over u32 keys, from the most significant digit:
//   pass 0: bits 21..31 (11 bits)   pass 1: bits 10..20 (11 bits)   pass 2: bits 0..9 (10 bits)
// Before pass p, the bits above the pass's digit are decided ("prefix"); pass p counts, among
// the keys whose top bits equal the prefix, how many have each value of the digit.

#define RADIX_BINS 2048
#define SELECT_THREADS 256  // block size of every kernel that builds or picks a radix histogram

__host__ __device__ __forceinline__ int radix_shift(int pass) {
    return pass == 0 ? 21 : (pass == 1 ? 10 : 0);
}
__host__ __device__ __forceinline__ u32 radix_digit_mask(int pass) {
    return pass == 2 ? 0x3FFu : 0x7FFu;
}
// bits decided before pass `pass`
__host__ __device__ __forceinline__ u32 radix_prefix_mask(int pass) {
    return pass == 0 ? 0u : (pass == 1 ? 0xFFE00000u : 0xFFFFFC00u);
}
__device__ __forceinline__ u32 radix_digit(u32 key, int pass) {
    return (key >> radix_shift(pass)) & radix_digit_mask(pass);
}

#define NO_CANDIDATES 0xFFFFFFFFFFFFFFFFULL
// SelectState.flags: host bugs the kernels notice
#define SELECT_FLAG_PICK_FAILED 1u  // a pick found fewer than k_rem keys in range (bad k or n)
#define SELECT_FLAG_TIE_FAILED 2u   // a tensor held more keys == T than count_eq (wrong state)

// The device-side state of one tensor's selection (for `selection: model`, of one tensor's
// histogram pass, or of its mask at the host's threshold). #[repr(C)] on the Rust side, 49 248
// bytes; see docs/KERNELS.md.
struct SelectState {
    u64 n;          //  0  number of keys of the tensor
    u64 k;          //  8  how many to keep, 1 <= k <= n (a fixed state: the tie quota, any)
    u64 k_rem;      // 16  k minus the keys above the current prefix range; after pass 2: r,
                    //     the ties still to keep (select_tie_cutoff takes from it)
    u64 count_gt;   // 24  keys above the current prefix range; after pass 2: c_gt
    u64 count_eq;   // 32  keys inside the current prefix range; after pass 2: keys == T, then
                    //     the ties not yet visited (select_tie_cutoff takes from it)
    u64 cutoff;     // 40  tie rank result: keys == T with index < cutoff are kept
    u64 cand_len;   // 48  candidates written by pass 1, or NO_CANDIDATES
    u64 cand_fill;  // 56  slot counter while pass 1 writes candidates
    u64 bad;        // 64  a spare score-error word for the host (score_keys' `bad`), ~0 = none
    u32 prefix;     // 72  decided key bits (top 11 after pass 0, top 22 after pass 1, all after 2)
    u32 threshold;  // 76  T, valid once passes_done == 3
    u32 passes_done;// 80  0..3
    u32 ticket;     // 84  last-block counter, back to 0 after every pass
    u32 flags;      // 88  SELECT_FLAG_*
    u32 pad;        // 92
    u64 hist[3][RADIX_BINS];  // 96  one histogram per pass, zeroed by select_init
};

static_assert(offsetof(SelectState, bad) == 64, "SelectState layout");
static_assert(offsetof(SelectState, prefix) == 72, "SelectState layout");
static_assert(offsetof(SelectState, flags) == 88, "SelectState layout");
static_assert(offsetof(SelectState, hist) == 96, "SelectState layout");
static_assert(sizeof(SelectState) == 96 + 3 * RADIX_BINS * 8, "SelectState layout");

// ----------------------------------------------------------------------------------------------
// block-wide helpers

// Exclusive prefix sum of x over the threads of the block, in threadIdx order; *total gets the
// block's sum. Every thread of the block must call it (it contains __syncthreads). tmp: a
// __shared__ u64[32] that the caller does not use while this runs.
template <int NT>
__device__ __forceinline__ u64 block_exclusive_scan(u64 x, u64* tmp, u64* total) {
    static_assert(NT % 32 == 0 && NT <= 1024, "block size");
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    u64 v = x;  // inclusive scan inside the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += y;
    }
    if (lane == 31) tmp[warp] = v;
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the warp totals
        u64 w = (lane < NT / 32) ? tmp[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u64 y = __shfl_up_sync(FULL_MASK, w, o);
            if (lane >= o) w += y;
        }
        if (lane < NT / 32) tmp[lane] = w;
    }
    __syncthreads();
    const u64 before = (warp > 0 ? tmp[warp - 1] : 0) + v - x;
    *total = tmp[NT / 32 - 1];
    __syncthreads();  // tmp may be reused after return
    return before;
}

// Adds a block's shared-memory histogram into a global u64 histogram (zero bins skipped).
__device__ __forceinline__ void flush_hist(const u32* s_hist, u64* g_hist, int bins) {
    for (int b = threadIdx.x; b < bins; b += blockDim.x) {
        const u32 c = s_hist[b];
        if (c != 0) atomicAdd(g_hist + b, static_cast<u64>(c));
    }
}

// The last-block ticket: call after this block's global atomics (histogram flush, candidate
// slots) are issued. Returns true in exactly one block, the last one to arrive, once every other
// block's atomics are visible to it. Every thread of the block must call it.
__device__ __forceinline__ bool last_block_ticket(u32* ticket) {
    __shared__ int s_last;
    __threadfence();  // this thread's atomics happen before the block's ticket
    __syncthreads();
    if (threadIdx.x == 0) s_last = (atomicAdd(ticket, 1u) == gridDim.x - 1);
    __syncthreads();
    const bool last = s_last != 0;
    if (last) __threadfence();  // and everyone else's before what the last block reads next
    return last;
}

// Picks pass `pass`'s digit from st->hist[pass]: the bucket that holds the k_rem-th largest key
// of the current prefix range, scanning from the top bucket down. Run by one whole block of
// SELECT_THREADS threads (the last block of a pass). Thread t owns the 8 bins 2047 - 8t down to
// 2040 - 8t; an exclusive scan over threads gives how many keys lie above each thread's bins,
// and the one thread whose bins hold the crossing updates the state.
__device__ __forceinline__ void radix_pick(SelectState* st, int pass) {
    constexpr int BPT = RADIX_BINS / SELECT_THREADS;  // bins per thread
    __shared__ u64 s_tmp[32];
    __shared__ int s_found;
    const u64 k_rem = st->k_rem;  // read by every thread before anyone writes the state
    if (threadIdx.x == 0) s_found = 0;
    const int top = RADIX_BINS - 1 - static_cast<int>(threadIdx.x) * BPT;
    const u64* hist = st->hist[pass];
    u64 c[BPT];
    u64 mine = 0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) {
        c[j] = __ldcg(hist + (top - j));  // L2: the bins were filled by other blocks' atomics
        mine += c[j];
    }
    u64 total;
    const u64 above = block_exclusive_scan<SELECT_THREADS>(mine, s_tmp, &total);
    if (above < k_rem && k_rem <= above + mine) {
        u64 a = above;
#pragma unroll
        for (int j = 0; j < BPT; ++j) {
            if (a + c[j] >= k_rem) {
                const u32 prefix = st->prefix | (static_cast<u32>(top - j) << radix_shift(pass));
                st->prefix = prefix;
                st->count_gt += a;
                st->k_rem = k_rem - a;
                st->count_eq = c[j];
                st->passes_done = static_cast<u32>(pass + 1);
                if (pass == 2) st->threshold = prefix;
                s_found = 1;
                break;
            }
            a += c[j];
        }
    }
    __syncthreads();
    if (threadIdx.x == 0 && !s_found) st->flags |= SELECT_FLAG_PICK_FAILED;
}
