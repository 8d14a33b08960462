// fuse_fisher: fisher's Fisher-weighted average (docs/SEMANTICS.md, "fisher"; the CPU reference
// is src/backend/cpu/fisher.rs `merge`). Per element, in task order from +0.0, each one fp32
// rounding as the CPU:
//   p = c_t · (F_t + 1e-6),  num = num + p · θ_t,  den = den + p;  out = num / den
// (c_t = weight · the model's norm scale, found on the host; F_t = 0 where a model has no
// statistic), stored in the output dtype with NaN as the canonical one. A non-finite θ_t or F_t
// lowers *bad to ((i << 8) | (slot << 1) | is_nan), slot 2t for θ_t and 2t + 1 for F_t: the
// lowest index wins, then θ before F and the earlier task, the CPU's `first_fault` order.
// Grid: any (grid-stride over the elements), block: any. Bytes per element: Σ_t (θ_t + F_t) in
// their dtypes read, one output written; one element per thread step, loads through load1 (a
// baseline kernel: fisher is a baseline method, and its arithmetic is one chain per element).

#include "common.cuh"

// The task table (src/backend/cuda/device.rs `FisherTask`, 32 bytes).
struct FisherTask {
    const void* theta;
    const void* grad;  // NULL: F = 0
    float c;
    int theta_dtype;
    int grad_dtype;
    int pad;
};

#define FISHER_MIN 1e-6f  // FusionBench's minimal_fisher_weight (cpu/fisher.rs MIN_FISHER)

__device__ __forceinline__ u64 fisher_bad_word(size_t i, int slot, float v) {
    return (static_cast<u64>(i) << 8) | (static_cast<u64>(slot) << 1) | (is_nan_f32(v) ? 1u : 0u);
}

extern "C" __global__ void fuse_fisher(const FisherTask* tasks, int nt, size_t n, void* out,
                                       int out_dtype, u64* bad) {
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    u64 my_bad = ~0ULL;
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        float num = 0.0f, den = 0.0f;
        for (int t = 0; t < nt; ++t) {
            const FisherTask& k = tasks[t];
            const float th = load1(k.theta, k.theta_dtype, i);
            const float f = k.grad != nullptr ? load1(k.grad, k.grad_dtype, i) : 0.0f;
            // Words only grow with i and slot, so the first one met is the thread's lowest.
            if (!is_finite_f32(th) && my_bad == ~0ULL) my_bad = fisher_bad_word(i, 2 * t, th);
            if (!is_finite_f32(f) && my_bad == ~0ULL) my_bad = fisher_bad_word(i, 2 * t + 1, f);
            const float p = __fmul_rn(k.c, __fadd_rn(f, FISHER_MIN));
            num = __fadd_rn(num, __fmul_rn(p, th));
            den = __fadd_rn(den, p);
        }
        store1(out, out_dtype, i, __fdiv_rn(num, den));
    }
    if (my_bad != ~0ULL) atomicMin(bad, my_bad);
}
