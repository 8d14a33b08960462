// fuse.cu: the merged tensor (docs/SEMANTICS.md "Fuse").
//
// One pass over the elements; each thread handles groups of 8 consecutive elements (16-byte
// loads: one uint4 of 8 halves or two float4 per input, a scalar tail). For every task t in
// order: tau = theta_t - base, kept entries (mask bit set) contribute u = w_t * tau' in fp32, with
// tau' = tau / rescale_t for DARE. Every operation is a single IEEE rounding (__fadd_rn, __fsub_rn,
// __fmul_rn, __fdiv_rn), never a fused multiply-add, so the bits equal the CPU backend's.
//   fuse_linear: acc = 0; acc = sign_t > 0 ? acc + u : acc - u (skipped terms skipped);
//                [normalize: acc = acc / div]; out = start + lambda * acc
//   fuse_ties:   S = sum u (skipped terms skipped); u agrees when (u > 0 && S >= 0) or
//                (u < 0 && S < 0) (zeros never agree; a NaN S agrees with nothing);
//                mixed = sum of the agreeing u, div = sum of their weights;
//                [normalize: mixed /= (div == 0 ? 1 : div)]; out = start + lambda * mixed
//                (start = base unless given). The second sum re-reads theta (an L1/L2 hit)
//                instead of keeping T x 8 contributions in registers.
// Optional statistics, all per block in shared memory first: kept entries per task (warp sums,
// then one global atomic per task per block), the histogram of mask combinations
// (bit t of the bucket = task t kept the entry, T <= 8; warp-aggregated with __match_any_sync),
// and the first NaN/Inf among start values and every task's tau (FUSE_BAD_WORD below).
//
// Bytes per element: reads base + start (when given) + T thetas in their dtypes + T/8 of masks,
// writes the output dtype. fp16, T = 4, masks, no start: 2 + 8 + 0.5 in, 2 out = 12.5 bytes.

#include "common.cuh"

#define FUSE_THREADS 256
#define FUSE_MAX_TASKS 64
#define FUSE_MAX_HIST_TASKS 8

#define FUSE_LINEAR 0  // template tags of fuse_body
#define FUSE_TIES 1

// One task of the fuse, #[repr(C)] on the Rust side (32 bytes); see docs/KERNELS.md.
struct FuseTask {
    const void* theta;  //  0  the task's tensor, n elements of `dtype`
    const u32* mask;    //  8  bit mask (common.cuh layout), NULL: every entry kept
    float weight;       // 16  w_t
    float rescale;      // 20  kept tau is divided by this (DARE: d); 1: no division
    int sign;           // 24  +1 for models, -1 for forget (linear only; ties ignores it)
    int dtype;          // 28  dtype code of theta
};
static_assert(sizeof(FuseTask) == 32, "FuseTask layout");

// The bad word, lowest wins: (index << 9) | (slot << 2) | (base_is_bad << 1) | is_nan, with
// slot 0 = the start value, slot 1 + t = task t's tau (then base_is_bad: base[i] is NaN/Inf, so
// the base model is to blame, else theta_t). At one index the start comes first, then the tasks
// in order: the CPU backend's order.
__device__ __forceinline__ u64 fuse_bad_word(size_t i, u32 slot, bool base_bad, bool nan) {
    return (static_cast<u64>(i) << 9) | (static_cast<u64>(slot) << 2) | (base_bad ? 2u : 0u) |
           (nan ? 1u : 0u);
}

// The 8 mask bits of group g of task t (bit j: element 8g + j kept).
__device__ __forceinline__ u32 mask_byte(const FuseTask& task, size_t g) {
    if (task.mask == nullptr) return 0xFFu;
    return __ldg(reinterpret_cast<const unsigned char*>(task.mask) + g);
}

// A kept entry's contribution u = w * tau' (tau' = tau / rescale for DARE).
__device__ __forceinline__ float contribution(const FuseTask& task, float tau) {
    if (task.rescale != 1.0f) tau = __fdiv_rn(tau, task.rescale);
    return __fmul_rn(task.weight, tau);
}

// Lowers *bad for every element of group g whose tau (task t) is NaN or Inf.
__device__ __forceinline__ void check_tau(const float tau[8], const float b[8], size_t g, int t,
                                          u64* bad) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (!is_finite_f32(tau[j])) {  // past n every input reads 0, so tau is 0 there
            const u64 word =
                fuse_bad_word(g * 8 + j, 1 + t, !is_finite_f32(b[j]), is_nan_f32(tau[j]));
            if (word < *bad) *bad = word;
        }
    }
}

// Loads group g of start (or copies base when start is NULL), checking start values.
__device__ __forceinline__ void load_start(const void* start, int start_dtype, const float b[8],
                                           size_t g, size_t n, bool check, u64* bad, float s[8]) {
    if (start == nullptr) {
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j] = b[j];
        return;
    }
    load8(start, start_dtype, g, n, s);
    if (!check) return;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (!is_finite_f32(s[j])) {
            const u64 word = fuse_bad_word(g * 8 + j, 0, false, is_nan_f32(s[j]));
            if (word < *bad) *bad = word;
        }
    }
}

__device__ __forceinline__ void fuse_linear_group(const FuseTask* tasks, int num_tasks,
                                                  const void* base, int base_dtype,
                                                  const void* start, int start_dtype, size_t g,
                                                  size_t n, int normalize, float div, float lambda,
                                                  void* out, int out_dtype, bool check, u64* bad) {
    float b[8], acc[8];
    load8(base, base_dtype, g, n, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
    for (int t = 0; t < num_tasks; ++t) {
        const FuseTask& task = tasks[t];
        const u32 mb = mask_byte(task, g);
        if (mb == 0 && !check) continue;
        float tau[8];
        load8(task.theta, task.dtype, g, n, tau);
#pragma unroll
        for (int j = 0; j < 8; ++j) tau[j] = __fsub_rn(tau[j], b[j]);
        if (check) check_tau(tau, b, g, t, bad);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if ((mb >> j) & 1u) {  // skipped terms are skipped, not added as +0.0
                const float u = contribution(task, tau[j]);
                acc[j] = (task.sign > 0) ? __fadd_rn(acc[j], u) : __fsub_rn(acc[j], u);
            }
        }
    }
    float s[8];
    load_start(start, start_dtype, b, g, n, check, bad, s);
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float a = normalize ? __fdiv_rn(acc[j], div) : acc[j];
        o[j] = __fadd_rn(s[j], __fmul_rn(lambda, a));
    }
    store8(out, out_dtype, g, n, o);
}

__device__ __forceinline__ void fuse_ties_group(const FuseTask* tasks, int num_tasks,
                                                const void* base, int base_dtype,
                                                const void* start, int start_dtype, size_t g,
                                                size_t n, int normalize, float lambda, void* out,
                                                int out_dtype, bool check, u64* bad) {
    float b[8], sum[8];
    load8(base, base_dtype, g, n, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum[j] = 0.0f;
    // 1. S = sum of the kept u_t, in task order
    for (int t = 0; t < num_tasks; ++t) {
        const FuseTask& task = tasks[t];
        const u32 mb = mask_byte(task, g);
        if (mb == 0 && !check) continue;
        float tau[8];
        load8(task.theta, task.dtype, g, n, tau);
#pragma unroll
        for (int j = 0; j < 8; ++j) tau[j] = __fsub_rn(tau[j], b[j]);
        if (check) check_tau(tau, b, g, t, bad);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if ((mb >> j) & 1u) sum[j] = __fadd_rn(sum[j], contribution(task, tau[j]));
        }
    }
    // the elected sign, as two bit sets (bit j: element j), so a NaN S is in neither
    u32 positive = 0, negative = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        positive |= (sum[j] >= 0.0f) ? (1u << j) : 0u;
        negative |= (sum[j] < 0.0f) ? (1u << j) : 0u;
    }
    // 2. the disjoint sum of the u_t that agree with it
    float mixed[8], div[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        mixed[j] = 0.0f;
        div[j] = 0.0f;
    }
    for (int t = 0; t < num_tasks; ++t) {
        const FuseTask& task = tasks[t];
        const u32 mb = mask_byte(task, g);
        if (mb == 0) continue;
        float th[8];
        load8(task.theta, task.dtype, g, n, th);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if ((mb >> j) & 1u) {
                const float u = contribution(task, __fsub_rn(th[j], b[j]));
                const bool pos = (positive >> j) & 1u, neg = (negative >> j) & 1u;
                if ((u > 0.0f && pos) || (u < 0.0f && neg)) {  // zeros never agree
                    mixed[j] = __fadd_rn(mixed[j], u);
                    div[j] = __fadd_rn(div[j], task.weight);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (normalize) mixed[j] = __fdiv_rn(mixed[j], div[j] == 0.0f ? 1.0f : div[j]);
    }
    float s[8];
    load_start(start, start_dtype, b, g, n, check, bad, s);
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = __fadd_rn(s[j], __fmul_rn(lambda, mixed[j]));
    store8(out, out_dtype, g, n, o);
}

// Per-group statistics; called by all 32 lanes of every warp (valid: this lane's g < ngroups).
__device__ __forceinline__ void group_stats(const FuseTask* tasks, int num_tasks, size_t g,
                                            bool valid, size_t n, bool want_kept, bool want_hist,
                                            u32* s_kept, u32* s_hist) {
    const int lane = threadIdx.x & 31;
    u32 in_range = 0;  // bit j: element 8g + j < n
    if (valid) {
        const size_t left = n - g * 8;
        in_range = (left >= 8) ? 0xFFu : ((1u << left) - 1u);
    }
    u32 combo[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) combo[j] = 0;
    for (int t = 0; t < num_tasks; ++t) {
        const u32 mb = valid ? (mask_byte(tasks[t], g) & in_range) : 0u;
        if (want_kept) {
            const u32 warp_kept = __reduce_add_sync(FULL_MASK, __popc(mb));
            if (lane == 0 && warp_kept != 0) atomicAdd(&s_kept[t], warp_kept);
        }
        if (want_hist) {
#pragma unroll
            for (int j = 0; j < 8; ++j) combo[j] |= ((mb >> j) & 1u) << t;
        }
    }
    if (!want_hist) return;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const u32 c = ((in_range >> j) & 1u) ? combo[j] : 0xFFFFFFFFu;  // ~0: no element
        const u32 peers = __match_any_sync(FULL_MASK, c);
        if (c != 0xFFFFFFFFu && lane == __ffs(peers) - 1) atomicAdd(&s_hist[c], __popc(peers));
    }
}

// The body of both fuse kernels (METHOD = FUSE_LINEAR or FUSE_TIES); see fuse_linear below.
template <int METHOD>
__device__ __forceinline__ void fuse_body(const void* base, int base_dtype, const void* start,
                                          int start_dtype, const FuseTask* tasks, int num_tasks,
                                          size_t n, int normalize, float linear_div, float lambda,
                                          void* out, int out_dtype, u64* kept, u64* combo_hist,
                                          u64* bad) {
    __shared__ FuseTask s_tasks[FUSE_MAX_TASKS];
    __shared__ u32 s_kept[FUSE_MAX_TASKS];
    __shared__ u32 s_hist[1 << FUSE_MAX_HIST_TASKS];
    if (num_tasks < 1 || num_tasks > FUSE_MAX_TASKS) __trap();  // the host checks this first

    for (int t = threadIdx.x; t < num_tasks; t += blockDim.x) {
        s_tasks[t] = tasks[t];
        s_kept[t] = 0;
    }
    for (int c = threadIdx.x; c < (1 << FUSE_MAX_HIST_TASKS); c += blockDim.x) s_hist[c] = 0;
    __syncthreads();

    const bool want_kept = kept != nullptr;
    const bool want_hist = combo_hist != nullptr && num_tasks <= FUSE_MAX_HIST_TASKS;
    const bool check = bad != nullptr;
    u64 my_bad = ~0ULL;

    const size_t ngroups = (n + 7) / 8;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    // g0 is the same in every thread of the block: every warp runs the same trip count, so the
    // warp-synchronous statistics see all 32 lanes.
    for (size_t g0 = static_cast<size_t>(blockIdx.x) * blockDim.x; g0 < ngroups; g0 += stride) {
        const size_t g = g0 + threadIdx.x;
        const bool valid = g < ngroups;
        if (valid) {
            if (METHOD == FUSE_TIES) {
                fuse_ties_group(s_tasks, num_tasks, base, base_dtype, start, start_dtype, g, n,
                                normalize, lambda, out, out_dtype, check, &my_bad);
            } else {
                fuse_linear_group(s_tasks, num_tasks, base, base_dtype, start, start_dtype, g, n,
                                  normalize, linear_div, lambda, out, out_dtype, check, &my_bad);
            }
        }
        if (want_kept || want_hist) {
            group_stats(s_tasks, num_tasks, g, valid, n, want_kept, want_hist, s_kept, s_hist);
        }
    }
    if (my_bad != ~0ULL) atomicMin(bad, my_bad);

    if (!want_kept && !want_hist) return;
    __syncthreads();
    if (want_kept) {
        for (int t = threadIdx.x; t < num_tasks; t += blockDim.x) {
            if (s_kept[t] != 0) atomicAdd(kept + t, static_cast<u64>(s_kept[t]));
        }
    }
    if (want_hist) flush_hist(s_hist, combo_hist, 1 << num_tasks);
}

// Linear fuse (task_arithmetic, magnitude, sta, dare_linear, forgetting).
// Grid: any (grid-stride over groups of 8), block: exactly FUSE_THREADS (256).
// tasks: device array of num_tasks FuseTask (1 <= num_tasks <= 64).
// kept: NULL or u64[num_tasks], added to; combo_hist: NULL or u64[1 << num_tasks] (used only when
// num_tasks <= 8), added to; bad: NULL (no check) or one u64, lowered to fuse_bad_word's.
extern "C" __global__ void __launch_bounds__(FUSE_THREADS)
fuse_linear(const void* base, int base_dtype,
            const void* start, int start_dtype,  // NULL: start = base
            const FuseTask* tasks, int num_tasks,
            size_t n,
            int normalize,     // nonzero: acc = acc / linear_div
            float linear_div,  // sum of the models' weights, |div| < 1e-8 -> 1, by the host
            float lambda,
            void* out, int out_dtype,
            u64* kept, u64* combo_hist, u64* bad) {
    fuse_body<FUSE_LINEAR>(base, base_dtype, start, start_dtype, tasks, num_tasks, n, normalize,
                           linear_div, lambda, out, out_dtype, kept, combo_hist, bad);
}

// TIES fuse (ties, dare_ties). The same arguments as fuse_linear; linear_div and each task's
// sign are ignored.
// normalize nonzero: mixed /= (sum of the agreeing weights, 0 -> 1).
// Register use: at least 3 blocks of 256 per SM (<= 80 registers; ptxas needs about 72).
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3)
fuse_ties(const void* base, int base_dtype,
          const void* start, int start_dtype,
          const FuseTask* tasks, int num_tasks,
          size_t n,
          int normalize,
          float linear_div,
          float lambda,
          void* out, int out_dtype,
          u64* kept, u64* combo_hist, u64* bad) {
    fuse_body<FUSE_TIES>(base, base_dtype, start, start_dtype, tasks, num_tasks, n, normalize,
                         linear_div, lambda, out, out_dtype, kept, combo_hist, bad);
}
