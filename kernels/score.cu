// score.cu: what is ranked (docs/SEMANTICS.md "Scores" and "Deterministic sum").
//
// score_keys: per element, tau = theta - base (fp32), the score
//     mode 0: abs(tau)              magnitude, ties, sta with missing gradients
//     mode 1: abs(theta * G)        sta, importance finetuned
//     mode 2: abs(tau * G)          sta, importance task_vector
//   optionally divided by the tensor's mean score (selection: model), turned into a sortable u32
//   key and (optionally) stored; non-finite values are reported (lowest index wins) or zeroed.
//   Fused in: the shared-memory histogram of one radix digit of the keys (the top 11 bits for
//   pass 0), added into a SelectState, and optionally the last block's pick of that digit.
//   Bytes per element: reads theta + base (+ G in modes 1, 2) in their dtypes, writes 4 (the key)
//   when keys != NULL. fp16 mode 1: 2 + 2 + 2 in, 4 out.
// score_sum: the deterministic f64 sum of the scores held in a key buffer: one block of 256
//   threads per 65 536-element chunk, each lane sums its strided elements in order, then a halving
//   tree; one f64 per chunk. Reads 4 bytes per element.
// score_mean: one thread adds the chunk sums in chunk order and writes sum and f32(sum / n), so
//   the mean never has to visit the host.

#include "common.cuh"

#define SCORE_ABS_TAU 0
#define SCORE_ABS_THETA_G 1
#define SCORE_ABS_TAU_G 2

// error codes in the low 2 bits of the `bad` word: (index << 2) | code. At one index the lowest
// code wins, so a bad input value is named before a score that merely overflowed.
#define BAD_BASE 0u   // base[i] is NaN or Inf (base model file)
#define BAD_MODEL 1u  // theta[i] is NaN or Inf, or theta - base overflowed (task model file)
#define BAD_GRAD 2u   // G[i] is NaN or Inf, so the score is (gradient file)
#define BAD_SCORE 3u  // the score overflowed with finite inputs (task model file)

#define SUM_CHUNK 65536
#define SUM_LANES 256

// The score of one element; a problem lowers *bad to (i << 2 | code) and scores 0.
__device__ __forceinline__ float score_one(float th, float b, float g, int mode, bool nonfinite_zero,
                                           size_t i, u64* bad) {
    const float tau = __fsub_rn(th, b);
    if (!is_finite_f32(tau)) {  // an error in every method, even with nonfinite_zero
        const u64 code = is_finite_f32(b) ? BAD_MODEL : BAD_BASE;
        const u64 word = (static_cast<u64>(i) << 2) | code;
        if (word < *bad) *bad = word;
        return 0.0f;
    }
    if (mode == SCORE_ABS_TAU) return fabsf(tau);
    const float s = fabsf(__fmul_rn(mode == SCORE_ABS_THETA_G ? th : tau, g));
    if (is_finite_f32(s)) return s;
    if (!nonfinite_zero) {
        const u64 code = is_finite_f32(g) ? BAD_SCORE : BAD_GRAD;
        const u64 word = (static_cast<u64>(i) << 2) | code;
        if (word < *bad) *bad = word;
    }
    return 0.0f;
}

// Grid: any (grid-stride over groups of 8), block: exactly SELECT_THREADS (256).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
score_keys(const void* theta, int theta_dtype,
           const void* base, int base_dtype,
           const void* grad, int grad_dtype,   // NULL in mode 0
           int mode, int nonfinite_zero,
           const float* mean,                  // NULL: no normalisation
           size_t n,
           u32* keys,                          // NULL: keys are not stored
           u64* bad,                           // lowest (index << 2 | code); host sets ~0 first
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
    const bool normalise = mean != nullptr;
    const float m = normalise ? *mean : 0.0f;
    const bool zero_bad = nonfinite_zero != 0;

    u64 my_bad = ~0ULL;
    const size_t ngroups = (n + 7) / 8;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t g = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups;
         g += stride) {
        float th[8], b[8], gr[8];
        load8(theta, theta_dtype, g, n, th);
        load8(base, base_dtype, g, n, b);
        if (mode != SCORE_ABS_TAU) {
            load8(grad, grad_dtype, g, n, gr);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) gr[j] = 0.0f;
        }
        float s[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // past n all inputs read 0: score 0, no error
            s[j] = score_one(th[j], b[j], gr[j], mode, zero_bad, g * 8 + j, &my_bad);
        }
        // In its own loop: __fdiv_rn's rare slow path is a call, and little is live here.
        if (normalise) {
#pragma unroll
            for (int j = 0; j < 8; ++j) s[j] = (m > 0.0f) ? __fdiv_rn(s[j], m) : 0.0f;
        }
        u32 k[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            k[j] = float_to_key(s[j]);
            if (do_hist && g * 8 + j < n && (k[j] & pmask) == prefix) {
                atomicAdd(&s_hist[radix_digit(k[j], pass)], 1u);
            }
        }
        if (keys != nullptr) store8_u32(keys, g, n, k);
    }
    if (my_bad != ~0ULL) atomicMin(bad, my_bad);

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

// Grid: 1 block of 1 thread (more threads return at once).
// sum = chunk_sums[0] + chunk_sums[1] + ... in order (from 0.0), mean = sum / n in f64,
// mean_out = f32(mean) rounded to nearest. Either output may be NULL.
extern "C" __global__ void score_mean(const double* chunk_sums, size_t nchunks, size_t n,
                                      double* sum_out, float* mean_out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double sum = 0.0;
    for (size_t c = 0; c < nchunks; ++c) sum = __dadd_rn(sum, chunk_sums[c]);
    const double mean = (n > 0) ? __ddiv_rn(sum, static_cast<double>(n)) : 0.0;
    if (sum_out != nullptr) *sum_out = sum;
    if (mean_out != nullptr) *mean_out = __double2float_rn(mean);
}
