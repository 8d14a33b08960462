// score.cu: what is ranked (docs/SEMANTICS.md "Scores" and "Deterministic sum").
//
// score_keys: per element, tau = theta - base (fp32), the score
//     mode 0: abs(tau)              magnitude, ties, sta with missing gradients
//     mode 1: abs(theta * G)        sta, importance finetuned
//     mode 2: abs(tau * G)          sta, importance task_vector
//   turned into a sortable u32 key and (optionally) stored; a NaN/Inf score is reported (lowest
//   index wins, with the input to blame, as the CPU backend does) or, with nonfinite_zero, scored
//   0. Fused in: the shared-memory histogram of one radix digit of the keys (the top 11 bits for
//   pass 0), added into a SelectState, and optionally the last block's pick of that digit.
//   Bytes per element: reads theta (+ base in modes 0, 2) (+ G in modes 1, 2) in their dtypes,
//   writes 4 (the key) when keys != NULL. fp16 mode 2: 2 + 2 + 2 in, 4 out.
// keys_normalize: selection: model divides each tensor's scores by the tensor's mean score:
//   rewrites raw keys in place as key(mean > 0 ? s / mean : 0), with the same fused histogram and
//   pick. (A kernel of its own: __fdiv_rn's rare slow path is a call, and inside score_keys the
//   registers live across it made ptxas spill.) Reads and writes 4 bytes per element.
// score_sum: the deterministic f64 sum of the scores held in a key buffer: one block of 256
//   threads per 65 536-element chunk, each lane sums its strided elements in order, then a halving
//   tree; one f64 per chunk. Reads 4 bytes per element. The host adds the chunk sums in chunk
//   order from 0.0 and takes the mean f32(sum / n) itself (src/backend/cuda/chunked.rs).


#include "common.cuh"

#define SCORE_ABS_TAU 0
#define SCORE_ABS_THETA_G 1
#define SCORE_ABS_TAU_G 2

// The `bad` word: (index << 3) | (source << 1) | is_nan, lowest index wins. Only the score is
// checked (a NaN/Inf tau in mode 1, where the score does not use base, is found by the fuse's
// check). The input blamed for a bad score, in this order (the CPU backend's):
#define BAD_BASE 0u   // base[i] is NaN/Inf (modes 0, 2)                      -> the base model
#define BAD_THETA 1u  // theta[i] is NaN/Inf                                  -> the task model
#define BAD_GRAD 2u   // G[i] is NaN/Inf (modes 1, 2)                          -> the gradient file
#define BAD_SCORE 3u  // finite inputs, the score overflowed (theta - base, or the product)
// is_nan: the score is NaN (else it is +Inf).

#define SUM_CHUNK 65536
#define SUM_LANES 256

// The score of one element. A NaN/Inf score is 0 with nonfinite_zero; otherwise it lowers *bad
// to this element's word and scores 0.
__device__ __forceinline__ float score_one(float th, float b, float g, int mode,
                                           bool nonfinite_zero, size_t i, u64* bad) {
    float s;
    if (mode == SCORE_ABS_TAU) {
        s = fabsf(__fsub_rn(th, b));
    } else if (mode == SCORE_ABS_THETA_G) {
        s = fabsf(__fmul_rn(th, g));
    } else {
        s = fabsf(__fmul_rn(__fsub_rn(th, b), g));
    }
    if (is_finite_f32(s)) return s;
    if (!nonfinite_zero) {
        u32 source;
        if (mode != SCORE_ABS_THETA_G && !is_finite_f32(b)) {
            source = BAD_BASE;
        } else if (!is_finite_f32(th)) {
            source = BAD_THETA;
        } else if (mode != SCORE_ABS_TAU && !is_finite_f32(g)) {
            source = BAD_GRAD;
        } else {
            source = BAD_SCORE;
        }
        const u64 word = (static_cast<u64>(i) << 3) | (source << 1) | (is_nan_f32(s) ? 1u : 0u);
        if (word < *bad) *bad = word;
    }
    return 0.0f;
}

// Group g's inputs as f32, in the fast path: the raw bytes of theta, base and G (those the mode
// reads) are loaded back to back, then widened (common.cuh, "loads in flight"). DT: the dtype of
// theta and base, GDT: G's; both 16-byte aligned, the group whole.
template <int DT, int GDT>
__device__ __forceinline__ void score_inputs_fast(const void* theta, const void* base,
                                                  const void* grad, int mode, size_t g,
                                                  float th[8], float b[8], float gr[8]) {
    // An input the mode does not read is replaced by theta (an L1 hit; score_one ignores it):
    // every load issues, with no branch to split them. Mode 0 reads no G, and then GDT == DT.
    const void* bp = mode != SCORE_ABS_THETA_G ? base : theta;
    const void* gp = grad;
    if constexpr (GDT == DT) gp = mode != SCORE_ABS_TAU ? grad : theta;
    const Raw8<DT> rt = load_raw8<DT>(theta, g);
    const Raw8<DT> rb = load_raw8<DT>(bp, g);
    const Raw8<GDT> rg = load_raw8<GDT>(gp, g);
    widen8<DT>(rt, th);
    widen8<DT>(rb, b);
    widen8<GDT>(rg, gr);
}

// The general path: per-pointer dtypes, misaligned pointers, the tail group.
__device__ __forceinline__ void score_inputs_general(const void* theta, int theta_dtype,
                                                     const void* base, int base_dtype,
                                                     const void* grad, int grad_dtype, int mode,
                                                     size_t g, size_t n, float th[8], float b[8],
                                                     float gr[8]) {
    load8(theta, theta_dtype, g, n, th);
    if (mode != SCORE_ABS_THETA_G) {
        load8(base, base_dtype, g, n, b);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = 0.0f;
    }
    if (mode != SCORE_ABS_TAU) {
        load8(grad, grad_dtype, g, n, gr);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) gr[j] = 0.0f;
    }
}

// The group loop of score_keys for one dtype pair (DT, GDT), or the general path (DT_MIXED).
template <int DT, int GDT>
__device__ __forceinline__ u64 score_groups(const void* theta, int theta_dtype, const void* base,
                                            int base_dtype, const void* grad, int grad_dtype,
                                            int mode, bool zero_bad, size_t n, u32* keys,
                                            bool do_hist, u32 pmask, u32 prefix, int pass,
                                            u32* s_hist) {
    u64 my_bad = ~0ULL;
    const size_t ngroups = (n + 7) / 8;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t g = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups;
         g += stride) {
        float th[8], b[8], gr[8];
        if (DT != DT_MIXED && g * 8 + 8 <= n) {
            if constexpr (DT != DT_MIXED) score_inputs_fast<DT, GDT>(theta, base, grad, mode, g, th, b, gr);
        } else {
            score_inputs_general(theta, theta_dtype, base, base_dtype, grad, grad_dtype, mode, g,
                                 n, th, b, gr);
        }
        u32 k[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // past n all inputs read 0: score 0, no error
            k[j] = float_to_key(score_one(th[j], b[j], gr[j], mode, zero_bad, g * 8 + j, &my_bad));
            if (do_hist && g * 8 + j < n && (k[j] & pmask) == prefix) {
                atomicAdd(&s_hist[radix_digit(k[j], pass)], 1u);
            }
        }
        if (keys != nullptr) store8_u32(keys, g, n, k);
    }
    return my_bad;
}

// Grid: any (grid-stride over groups of 8), block: exactly SELECT_THREADS (256). The dtypes are
// decided once for the launch: theta and base of one dtype (base unread in mode 1), G of one
// (unread in mode 0), all 16-byte aligned, takes that pair's fast path; anything else the general
// one.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
score_keys(const void* theta, int theta_dtype,
           const void* base, int base_dtype,   // NULL in mode 1
           const void* grad, int grad_dtype,   // NULL in mode 0
           int mode, int nonfinite_zero,
           size_t n,
           u32* keys,                          // NULL: keys are not stored
           u64* bad,                           // NULL, or lowered to a bad word; host sets ~0
           SelectState* st,                    // NULL: no histogram
           int pass,                           // which digit to histogram (0, 1, 2)
           int pick) {                         // nonzero: the last block picks the digit
    __shared__ u32 s_hist[RADIX_BINS];
    const bool do_hist = st != nullptr;
    u32 prefix = 0, pmask = 0;
    if (do_hist) {
        for (int b = threadIdx.x; b < RADIX_BINS; b += blockDim.x) s_hist[b] = 0;
        pmask = radix_prefix_mask(pass);
        prefix = st->prefix & pmask;
        __syncthreads();
    }
    const bool zero_bad = nonfinite_zero != 0;

    int dt = uniform_dtype(theta_dtype, theta, theta_dtype);
    if (mode != SCORE_ABS_THETA_G) dt = uniform_dtype(dt, base, base_dtype);
    int gdt = dt;
    if (mode != SCORE_ABS_TAU) gdt = dt == DT_MIXED ? DT_MIXED : uniform_dtype(grad_dtype, grad, grad_dtype);
    if (gdt == DT_MIXED) dt = DT_MIXED;
#define SCORE_GROUPS(D, G)                                                                       \
    score_groups<D, G>(theta, theta_dtype, base, base_dtype, grad, grad_dtype, mode, zero_bad, n, \
                       keys, do_hist, pmask, prefix, pass, s_hist)
    u64 my_bad;
    switch (dt * 4 + gdt) {
        case DT_F32 * 4 + DT_F32: my_bad = SCORE_GROUPS(DT_F32, DT_F32); break;
        case DT_F16 * 4 + DT_F16: my_bad = SCORE_GROUPS(DT_F16, DT_F16); break;
        case DT_BF16 * 4 + DT_BF16: my_bad = SCORE_GROUPS(DT_BF16, DT_BF16); break;
        case DT_F16 * 4 + DT_F32: my_bad = SCORE_GROUPS(DT_F16, DT_F32); break;
        case DT_BF16 * 4 + DT_F32: my_bad = SCORE_GROUPS(DT_BF16, DT_F32); break;
        default: my_bad = SCORE_GROUPS(DT_MIXED, DT_MIXED); break;
    }
#undef SCORE_GROUPS
    if (my_bad != ~0ULL && bad != nullptr) atomicMin(bad, my_bad);

    if (!do_hist) return;
    __syncthreads();
    flush_hist(s_hist, st->hist[pass], RADIX_BINS);
    if (!pick) return;
    if (!last_block_ticket(&st->ticket)) return;
    if (threadIdx.x == 0) st->ticket = 0;
    radix_pick(st, pass);
}

// keys[i] = key(mean > 0 ? s / mean : 0) for the score s of raw key keys[i], in place (mean: a
// device f32, the tensor's mean score uploaded by the host). Histogram and pick as in score_keys.
// Grid: any (grid-stride over quads of 4 keys), block: exactly SELECT_THREADS (256).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
keys_normalize(u32* keys, size_t n, const float* mean,
               SelectState* st,  // NULL: no histogram
               int pass, int pick) {
    __shared__ u32 s_hist[RADIX_BINS];
    const bool do_hist = st != nullptr;
    u32 prefix = 0, pmask = 0;
    if (do_hist) {
        for (int b = threadIdx.x; b < RADIX_BINS; b += blockDim.x) s_hist[b] = 0;
        pmask = radix_prefix_mask(pass);
        prefix = st->prefix & pmask;
        __syncthreads();
    }
    const float m = *mean;
    const size_t nquads = (n + 3) / 4;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t q = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < nquads;
         q += stride) {
        u32 k[4];
        const int valid = load4_u32(keys, q, n, k);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float s = key_to_float(k[j]);
            k[j] = float_to_key(m > 0.0f ? __fdiv_rn(s, m) : 0.0f);
        }
        if (valid == 4 && is_aligned16(keys)) {
            reinterpret_cast<uint4*>(keys)[q] = make_uint4(k[0], k[1], k[2], k[3]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (j < valid) {
                if (valid < 4 || !is_aligned16(keys)) keys[q * 4 + j] = k[j];
                if (do_hist && (k[j] & pmask) == prefix) {
                    atomicAdd(&s_hist[radix_digit(k[j], pass)], 1u);
                }
            }
        }
    }
    if (!do_hist) return;
    __syncthreads();
    flush_hist(s_hist, st->hist[pass], RADIX_BINS);
    if (!pick) return;
    if (!last_block_ticket(&st->ticket)) return;
    if (threadIdx.x == 0) st->ticket = 0;
    radix_pick(st, pass);
}

// Grid: exactly ceil(n / 65536) blocks, block: exactly 256 threads.
// keys: raw score keys (no mean normalisation). chunk_sums: one f64 per block.
extern "C" __global__ void __launch_bounds__(SUM_LANES)
score_sum(const u32* keys, size_t n, double* chunk_sums) {
    __shared__ double lane_sum[SUM_LANES];
    const int l = threadIdx.x;
    const size_t begin = static_cast<size_t>(blockIdx.x) * SUM_CHUNK;
    const size_t end = (begin >= n) ? begin : ((n - begin < SUM_CHUNK) ? n : begin + SUM_CHUNK);
    double acc = 0.0;
    for (size_t i = begin + l; i < end; i += SUM_LANES) {
        acc = __dadd_rn(acc, static_cast<double>(key_to_float(__ldg(keys + i))));
    }
    lane_sum[l] = acc;
    __syncthreads();
    for (int stride = SUM_LANES / 2; stride > 0; stride >>= 1) {
        if (l < stride) lane_sum[l] = __dadd_rn(lane_sum[l], lane_sum[l + stride]);
        __syncthreads();
    }
    if (l == 0) chunk_sums[blockIdx.x] = lane_sum[0];
}
