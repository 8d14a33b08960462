// fuse.cu: the merged tensor (docs/SEMANTICS.md "Fuse").
//
// One pass over the elements; each thread handles groups of 8 consecutive elements (16-byte
// loads: one uint4 of 8 halves or two float4 per input, a scalar tail). For every task t in
// order: tau = theta_t - base, kept entries (mask bit set) contribute u = w_t * tau' in fp32, with
// tau' = tau / rescale_t for DARE's 1/d, tau' = tau * scale_t for mergekit's L1 rescale (a
// per-tensor factor the host computes, method::sparse::l1_factor; a task has one or the other),
// else tau. Every operation is a single IEEE rounding (__fadd_rn, __fsub_rn,
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

// One task of the fuse, #[repr(C)] on the Rust side (40 bytes); see docs/KERNELS.md.
struct FuseTask {
    const void* theta;  //  0  the task's tensor, n elements of `dtype`
    const u32* mask;    //  8  bit mask (common.cuh layout), NULL: every entry kept
    float weight;       // 16  w_t
    float rescale;      // 20  kept tau is divided by this (DARE: d); 1: no division
    int sign;           // 24  +1 for models, -1 for forget (linear only; ties ignores it)
    int dtype;          // 28  dtype code of theta
    float scale;        // 32  kept tau is multiplied by this (L1 rescale); 1: none. Never
                        //     beside a rescale != 1 (the host sets one or the other)
    u32 pad;            // 36
};
static_assert(sizeof(FuseTask) == 40, "FuseTask layout");

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

// A kept entry's contribution u = w * tau' (tau' = tau / rescale for DARE's 1/d, tau * scale
// for the L1 rescale: cpu/fuse.rs `term`, w * (tau * s), two roundings). RESCALE false (the
// typed kernels, whose launches have neither): no division or factor. __fdiv_rn's rare slow path
// is a call, and what is live across it (the other tasks' loads in flight) would be spilled.
template <bool RESCALE = true>
__device__ __forceinline__ float contribution(const FuseTask& task, float tau) {
    if (RESCALE && task.rescale != 1.0f) tau = __fdiv_rn(tau, task.rescale);
    if (RESCALE && task.scale != 1.0f) tau = __fmul_rn(tau, task.scale);
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

// The start values of a fast-path group: start's raw bytes widened and checked, or base.
template <int DT>
__device__ __forceinline__ void widen_start(const void* start, const Raw8<DT>& rs, const float b[8],
                                            size_t g, bool check, u64* bad, float s[8]) {
    if (start == nullptr) {
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j] = b[j];
        return;
    }
    widen8<DT>(rs, s);
    if (!check) return;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (!is_finite_f32(s[j])) {
            const u64 word = fuse_bad_word(g * 8 + j, 0, false, is_nan_f32(s[j]));
            if (word < *bad) *bad = word;
        }
    }
}

// The elected sign of S, as two bit sets (bit j: element j), so a NaN S is in neither.
__device__ __forceinline__ u32 sign_bits_nonneg(const float sum[8]) {
    u32 m = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) m |= (sum[j] >= 0.0f) ? (1u << j) : 0u;
    return m;
}
__device__ __forceinline__ u32 sign_bits_neg(const float sum[8]) {
    u32 m = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) m |= (sum[j] < 0.0f) ? (1u << j) : 0u;
    return m;
}

// TIES, step 2 for one task: its kept u that agree with the elected sign go into mixed, their
// weight into div. Zeros never agree.
template <bool RESCALE = true>
__device__ __forceinline__ void agree(const FuseTask& task, const float th[8], const float b[8],
                                      u32 mb, u32 positive, u32 negative, float mixed[8],
                                      float div[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if ((mb >> j) & 1u) {
            const float u = contribution<RESCALE>(task, __fsub_rn(th[j], b[j]));
            const bool pos = (positive >> j) & 1u, neg = (negative >> j) & 1u;
            if ((u > 0.0f && pos) || (u < 0.0f && neg)) {
                mixed[j] = __fadd_rn(mixed[j], u);
                div[j] = __fadd_rn(div[j], task.weight);
            }
        }
    }
}

// TIES, the end: normalise, add to start (base unless given) and store.
__device__ __forceinline__ void finish_ties(const void* start, int start_dtype, const float b[8],
                                            size_t g, size_t n, int normalize, float lambda,
                                            float mixed[8], const float div[8], void* out,
                                            int out_dtype, bool check, u64* bad) {
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

// ---- the general path (DT_MIXED): per-pointer dtypes, misaligned pointers, tail groups.
// Each input is loaded with load8 (a dtype branch per load, widened on arrival). The mask byte is
// loaded beside the task's theta, never tested first: a test would make the theta load wait
// for it.

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
    const u32 positive = sign_bits_nonneg(sum), negative = sign_bits_neg(sum);
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
        float th[8];
        load8(task.theta, task.dtype, g, n, th);
        agree(task, th, b, mb, positive, negative, mixed, div);
    }
    finish_ties(start, start_dtype, b, g, n, normalize, lambda, mixed, div, out, out_dtype, check,
                bad);
}

// ---- the fast path (DT = the launch's one dtype, every pointer 16-byte aligned, no rescale or
// scale).
// Base, start and the thetas and mask bytes of a batch of tasks (Batch below) are loaded raw,
// back to back, before anything is widened: 4 to 7 loads in flight per thread instead of one
// (docs/KERNELS.md, "Loads in flight"). More tasks go in further batches. Whole groups only: a
// tensor's tail group takes the general path, out of line (fuse_tail).

// Tasks whose loads go out together: 64 bytes of theta per thread (4 tasks of fp16/bf16, 2 of
// fp32), which with base and start is what 80 registers hold without spilling.
template <int DT> struct Batch {
    static constexpr int N = DT == DT_F32 ? 2 : 4;
    Raw8<DT> th[N];
    u32 mb[N];
};

// Issues the loads of tasks t0 .. t0 + Batch<DT>::N - 1 of group g. Slots past the last task
// load the last task again (an L1 hit; the caller skips them): a branch around each load would
// split them into basic blocks, and ptxas fills each block with the widening of what is already
// loaded, which waits for it.
template <int DT>
__device__ __forceinline__ void load_batch(const FuseTask* tasks, int num_tasks, int t0, size_t g,
                                           Batch<DT>& bt) {
#pragma unroll
    for (int j = 0; j < Batch<DT>::N; ++j) {
        const int t = t0 + j < num_tasks ? t0 + j : num_tasks - 1;
        bt.th[j] = load_raw8<DT>(tasks[t].theta, g);
        bt.mb[j] = mask_byte(tasks[t], g);
    }
}

template <int DT>
__device__ __forceinline__ void fuse_linear_fast(const FuseTask* tasks, int num_tasks,
                                                 const void* base, const void* start, size_t g,
                                                 int normalize, float div, float lambda, void* out,
                                                 int out_dtype, bool check, u64* bad) {
    const Raw8<DT> rb = load_raw8<DT>(base, g);
    Raw8<DT> rs = zero_raw8<DT>();  // (not `: rb`: copying rb would wait for its load)
    if (start != nullptr) rs = load_raw8<DT>(start, g);
    Batch<DT> bt;
    load_batch<DT>(tasks, num_tasks, 0, g, bt);
    float b[8], acc[8];
    widen8<DT>(rb, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
    for (int t0 = 0;;) {
#pragma unroll
        for (int q = 0; q < Batch<DT>::N; ++q) {
            const int t = t0 + q;
            if (t < num_tasks) {
                const FuseTask& task = tasks[t];
                float tau[8];
                widen8<DT>(bt.th[q], tau);
#pragma unroll
                for (int j = 0; j < 8; ++j) tau[j] = __fsub_rn(tau[j], b[j]);
                if (check) check_tau(tau, b, g, t, bad);
                const u32 mb = bt.mb[q];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if ((mb >> j) & 1u) {
                        const float u = contribution<false>(task, tau[j]);
                        acc[j] = (task.sign > 0) ? __fadd_rn(acc[j], u) : __fsub_rn(acc[j], u);
                    }
                }
            }
        }
        t0 += Batch<DT>::N;
        if (t0 >= num_tasks) break;
        load_batch<DT>(tasks, num_tasks, t0, g, bt);
    }
    float s[8];
    widen_start<DT>(start, rs, b, g, check, bad, s);
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float a = normalize ? __fdiv_rn(acc[j], div) : acc[j];
        o[j] = __fadd_rn(s[j], __fmul_rn(lambda, a));
    }
    store8(out, out_dtype, g, g * 8 + 8, o);
}

template <int DT>
__device__ __forceinline__ void fuse_ties_fast(const FuseTask* tasks, int num_tasks,
                                               const void* base, const void* start, size_t g,
                                               int normalize, float lambda, void* out,
                                               int out_dtype, bool check, u64* bad) {
    const Raw8<DT> rb = load_raw8<DT>(base, g);
    Batch<DT> bt;
    load_batch<DT>(tasks, num_tasks, 0, g, bt);
    float b[8], sum[8];
    widen8<DT>(rb, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum[j] = 0.0f;
    // 1. S = sum of the kept u_t, in task order
    for (int t0 = 0;;) {
#pragma unroll
        for (int q = 0; q < Batch<DT>::N; ++q) {
            const int t = t0 + q;
            if (t < num_tasks) {
                const FuseTask& task = tasks[t];
                float tau[8];
                widen8<DT>(bt.th[q], tau);
#pragma unroll
                for (int j = 0; j < 8; ++j) tau[j] = __fsub_rn(tau[j], b[j]);
                if (check) check_tau(tau, b, g, t, bad);
                const u32 mb = bt.mb[q];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if ((mb >> j) & 1u) sum[j] = __fadd_rn(sum[j], contribution<false>(task, tau[j]));
                }
            }
        }
        t0 += Batch<DT>::N;
        if (t0 >= num_tasks) break;
        load_batch<DT>(tasks, num_tasks, t0, g, bt);
    }
    const u32 positive = sign_bits_nonneg(sum), negative = sign_bits_neg(sum);
    // 2. the agreeing terms: theta and the masks again (L1/L2 hits), in batches
    float mixed[8], div[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        mixed[j] = 0.0f;
        div[j] = 0.0f;
    }
    for (int t0 = 0; t0 < num_tasks; t0 += Batch<DT>::N) {
        load_batch<DT>(tasks, num_tasks, t0, g, bt);
#pragma unroll
        for (int q = 0; q < Batch<DT>::N; ++q) {
            if (t0 + q < num_tasks) {
                float th[8];
                widen8<DT>(bt.th[q], th);
                agree<false>(tasks[t0 + q], th, b, bt.mb[q], positive, negative, mixed, div);
            }
        }
    }
    // start is read last here: fuse_ties is held to 80 registers (3 blocks per SM)
    finish_ties(start, DT, b, g, g * 8 + 8, normalize, lambda, mixed, div, out, out_dtype, check,
                bad);
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

// One group by the general path, out of line: inlined into a typed kernel its registers would add
// to the fast loop's. Runs for a typed launch's tail group.
template <int METHOD>
__device__ __noinline__ u64 fuse_general(const FuseTask* tasks, int num_tasks, const void* base,
                                         int base_dtype, const void* start, int start_dtype,
                                         size_t g, size_t n, int normalize, float linear_div,
                                         float lambda, void* out, int out_dtype, bool check,
                                         u64 bad) {
    if (METHOD == FUSE_TIES) {
        fuse_ties_group(tasks, num_tasks, base, base_dtype, start, start_dtype, g, n, normalize,
                        lambda, out, out_dtype, check, &bad);
    } else {
        fuse_linear_group(tasks, num_tasks, base, base_dtype, start, start_dtype, g, n,
                          normalize, linear_div, lambda, out, out_dtype, check, &bad);
    }
    return bad;
}

// Both fuse kernels, for every dtype template DT: DT_MIXED is the general kernel (`fuse_linear`,
// `fuse_ties`), which takes any dtypes, alignment, rescale and scale; DT_F32/F16/BF16 the typed
// ones (`fuse_linear_bf16`, ...), for launches whose base, start and thetas all have dtype DT,
// are 16-byte aligned and have no rescale or scale (the host checks; a typed kernel launched on
// anything else traps, like num_tasks out of range: a host bug).
template <int METHOD, int DT>
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
    bool typed = false;
    if constexpr (DT != DT_MIXED) {
        int dt = uniform_dtype(DT, base, base_dtype);
        dt = uniform_dtype(dt, start, start_dtype);
        bool rescale = false;
        for (int t = 0; t < num_tasks; ++t) {
            dt = uniform_dtype(dt, s_tasks[t].theta, s_tasks[t].dtype);
            rescale |= s_tasks[t].rescale != 1.0f || s_tasks[t].scale != 1.0f;
        }
        typed = dt == DT && !rescale;
    }
    u64 my_bad = ~0ULL;

    if (DT != DT_MIXED && !typed) __trap();  // the host picks a typed kernel only when it fits

    // Whole groups on the fast path; the tail group (n not a multiple of 8) after the loop.
    const size_t ngroups = (n + 7) / 8;
    const size_t loop_groups = DT != DT_MIXED ? n / 8 : ngroups;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    // g0 is the same in every thread of the block: every warp runs the same trip count, so the
    // warp-synchronous statistics see all 32 lanes.
    for (size_t g0 = static_cast<size_t>(blockIdx.x) * blockDim.x; g0 < loop_groups;
         g0 += stride) {
        const size_t g = g0 + threadIdx.x;
        const bool valid = g < loop_groups;
        if (valid) {
            if constexpr (DT == DT_MIXED) {
                if (METHOD == FUSE_TIES) {
                    fuse_ties_group(s_tasks, num_tasks, base, base_dtype, start, start_dtype, g,
                                    n, normalize, lambda, out, out_dtype, check, &my_bad);
                } else {
                    fuse_linear_group(s_tasks, num_tasks, base, base_dtype, start, start_dtype,
                                      g, n, normalize, linear_div, lambda, out, out_dtype, check,
                                      &my_bad);
                }
            } else {
                if (METHOD == FUSE_TIES) {
                    fuse_ties_fast<DT>(s_tasks, num_tasks, base, start, g, normalize, lambda, out,
                                       out_dtype, check, &my_bad);
                } else {
                    fuse_linear_fast<DT>(s_tasks, num_tasks, base, start, g, normalize,
                                         linear_div, lambda, out, out_dtype, check, &my_bad);
                }
            }
        }
        if (want_kept || want_hist) {
            group_stats(s_tasks, num_tasks, g, valid, n, want_kept, want_hist, s_kept, s_hist);
        }
    }
    if (loop_groups < ngroups && blockIdx.x == 0 && threadIdx.x < 32) {
        // the tail group of a typed launch: lane 0 of block 0's first warp; the whole warp for
        // the statistics
        const size_t g = loop_groups;
        const bool valid = threadIdx.x == 0;
        if (valid) {
            my_bad = fuse_general<METHOD>(s_tasks, num_tasks, base, base_dtype, start, start_dtype,
                                          g, n, normalize, linear_div, lambda, out, out_dtype,
                                          check, my_bad);
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
// The general kernel: any dtypes (each pointer its own), any alignment, any rescale or scale.
#define FUSE_LINEAR_ARGS                                                                         \
    const void *base, int base_dtype, const void *start, /* NULL: start = base */               \
        int start_dtype, const FuseTask *tasks, int num_tasks, size_t n,                         \
        int normalize,     /* nonzero: acc = acc / linear_div */                                 \
        float linear_div,  /* sum of the models' weights, |div| < 1e-8 -> 1, by the host */      \
        float lambda, void *out, int out_dtype, u64 *kept, u64 *combo_hist, u64 *bad
#define FUSE_PASS                                                                                \
    base, base_dtype, start, start_dtype, tasks, num_tasks, n, normalize, linear_div, lambda,   \
        out, out_dtype, kept, combo_hist, bad

extern "C" __global__ void __launch_bounds__(FUSE_THREADS) fuse_linear(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_LINEAR, DT_MIXED>(FUSE_PASS);
}

// TIES fuse (ties, dare_ties). The same arguments as fuse_linear; linear_div and each task's
// sign are ignored.
// normalize nonzero: mixed /= (sum of the agreeing weights, 0 -> 1).
// Register use: at least 3 blocks of 256 per SM (<= 80 registers; ptxas needs about 72).
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3) fuse_ties(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_TIES, DT_MIXED>(FUSE_PASS);
}

// The typed kernels: the same arguments and results, for launches whose inputs all have the
// kernel's dtype, are 16-byte aligned and have no rescale or scale (docs/KERNELS.md: the host
// picks the kernel once per launch). One kernel per dtype rather than a switch inside one: ptxas
// allocates a kernel's registers for all its paths together, and the three fast paths side by
// side spill.
// fuse_linear_*: at least 3 blocks per SM (<= 80 registers, ~78 used).
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3) fuse_linear_f32(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_LINEAR, DT_F32>(FUSE_PASS);
}
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3) fuse_linear_f16(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_LINEAR, DT_F16>(FUSE_PASS);
}
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3) fuse_linear_bf16(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_LINEAR, DT_BF16>(FUSE_PASS);
}
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3) fuse_ties_f32(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_TIES, DT_F32>(FUSE_PASS);
}
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3) fuse_ties_f16(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_TIES, DT_F16>(FUSE_PASS);
}
extern "C" __global__ void __launch_bounds__(FUSE_THREADS, 3) fuse_ties_bf16(FUSE_LINEAR_ARGS) {
    fuse_body<FUSE_TIES, DT_BF16>(FUSE_PASS);
}
