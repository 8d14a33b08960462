// The interpolating methods (docs/SEMANTICS.md, "Interpolating methods"; the CPU reference is
// src/backend/cpu/interp.rs). A method is reduction passes, scalar math on the host
// (src/method/interp.rs, the CPU's own functions) and one element-wise pass:
//
// interp_dots: the deterministic dot products (src/select/dot.rs) of pairs of operands over each
//   reduction unit (one vector's chunk of at most 65 536 elements): one block of exactly 256
//   threads per unit, lane l adds the exact f64 products of elements j = l, l + 256, … in order,
//   then the halving tree; one f64 per unit and pair. The host adds each vector's units in chunk
//   order from 0.0 (cpu/interp.rs `reduce`). Operand slot 0 is the base, slot 1 + k input k
//   (minus the base with minus_base, one f32 subtraction as the CPU). Units are numbered vector
//   by vector (whole tensors, rows), or chunk row by chunk row for vectors along the first
//   dimension, so that a piece of consecutive units is a contiguous range of elements. Reads each
//   pair's two operands per pair (the CPU's chunk is in cache; here L1/L2 serve the re-reads);
//   columns are read with the vector's stride, uncoalesced.
// interp_write: one output element per thread step from the operands and the host's scalars:
//   linear Σ w_k x_k (/ Σ w), slerp ca·a + cb·b, nuslerp per vector, nearswap, model_stock per
//   vector, multislerp from the unit vectors, mean and tangent, each with the CPU's f32
//   operations in its order (explicit _rn intrinsics, and the build has -fmad=false). Reads every
//   used operand once (multislerp: its inputs twice and the base 2k + 1 times, mostly from
//   cache), writes the output once.
// multislerp's passes 2 to 4 are interp_dots over its derived vectors (dots_rule), recomputed
// per element from the inputs rather than kept in full-size buffers, as the CPU does.
// Both check the inputs when asked (the method's first pass, as the CPU): a NaN or infinity
// lowers *bad to (i << 8) | (slot << 1) | is_nan, the lowest index then the lowest slot winning,
// the CPU's order (the base, then the inputs in order).

#include "common.cuh"

#define INTERP_CHUNK 65536
#define INTERP_LANES 256

#define INTERP_LINEAR 0
#define INTERP_SLERP 1
#define INTERP_NUSLERP 2
#define INTERP_NEARSWAP 3
#define INTERP_MODEL_STOCK 4
#define INTERP_MULTISLERP 5
#define INTERP_MS_FALLBACK 6  // multislerp of two models whose mean direction is zero
#define INTERP_COPY 7         // one input: itself

// interp_dots' vectors (dots_rule): operand pairs, or multislerp's derived vectors.
#define DOTS_PAIRS 0
#define DOTS_MS_MEAN 1     // the weighted mean m of the unit vectors, m·m
#define DOTS_MS_UNITS 2    // u_q·m̂ for each input q (npairs = k)
#define DOTS_MS_TANGENT 3  // the weighted tangent t at m̂, t·t

// One operand (src/backend/cuda/interp.rs `Operand`, 16 bytes); p is NULL when unused.
struct InterpOperand {
    const void* p;
    int dtype;
    int pad;
};

// Everything one launch reads (src/backend/cuda/interp.rs `Params`, 128 bytes).
struct InterpParams {
    const InterpOperand* ops;  // 1 + k: the base, then the inputs
    const float* weights;      // per input (linear)
    const int* pairs;          // 2 per pair: the operand slots of each dot
    const float* coefs;        // 4 per vector (nuslerp: a, b, s, colinear; model_stock: t);
                               // multislerp: 4 per input (|v_k| + eps, u_k·m̂)
    u64 at;                    // the tensor index of the piece's first element
    u64 n;                     // the piece's elements
    u64 count;                 // vectors in the tensor
    u64 vlen;                  // elements per vector
    u64 vstep;                 // tensor index of vector v's first element: v · vstep
    u64 estride;               // and of its element j: v · vstep + j · estride
    u64 cpv;                   // units (chunks) per vector
    int col_major;             // units numbered chunk row by chunk row (vectors along dim 0)
    int k;                     // inputs
    int minus_base;            // inputs become x − base
    int check;                 // look for non-finite inputs
    int rule;                  // INTERP_* (interp_write)
    int out_dtype;
    int npairs;
    int normalize;             // linear: divide by s0
    int dots_rule;             // DOTS_* (interp_dots)
    int pad;
    float s0, s1, s2, s3;      // linear: Σw; slerp: ca, cb; nearswap: t;
                               // multislerp: |m|, cos |t|, sin |t| / |t|, the mean norm
};

__device__ __forceinline__ u64 interp_bad_word(u64 i, int slot, float v) {
    return (i << 8) | (static_cast<u64>(slot) << 1) | (is_nan_f32(v) ? 1u : 0u);
}

// The first bad operand value at local index li (tensor index gi), as a word; ~0 when none.
__device__ __forceinline__ u64 interp_check(const InterpParams& p, size_t li, u64 gi) {
    const int first = p.ops[0].p != nullptr ? 0 : 1;
    for (int s = first; s <= p.k; ++s) {
        const float v = load1(p.ops[s].p, p.ops[s].dtype, li);
        if (!is_finite_f32(v)) return interp_bad_word(gi, s, v);
    }
    return ~0ULL;
}

// Operand slot s at local index li, minus the base for inputs with minus_base.
__device__ __forceinline__ float interp_value(const InterpParams& p, int s, size_t li) {
    const float x = load1(p.ops[s].p, p.ops[s].dtype, li);
    if (s == 0 || !p.minus_base) return x;
    return __fsub_rn(x, load1(p.ops[0].p, p.ops[0].dtype, li));
}

// multislerp (cpu/interp/sphere.rs), each value recomputed from the inputs with the CPU's f32
// operations: the unit vector u_k = v_k / (|v_k| + eps); the weighted mean m = Σ u_k·w_k from
// 0.0; the tangent t = Σ (u_k − (u_k·m̂)·m̂)·w_k from 0.0 at m̂ = m / |m|.
__device__ __forceinline__ float ms_unit(const InterpParams& p, int k, size_t li) {
    return __fdiv_rn(interp_value(p, 1 + k, li), p.coefs[4 * k]);
}
__device__ __forceinline__ float ms_mean(const InterpParams& p, size_t li) {
    float m = 0.0f;
    for (int k = 0; k < p.k; ++k) m = __fadd_rn(m, __fmul_rn(ms_unit(p, k, li), p.weights[k]));
    return m;
}
__device__ __forceinline__ float ms_tangent(const InterpParams& p, size_t li, float mhat) {
    float t = 0.0f;
    for (int k = 0; k < p.k; ++k) {
        const float d = __fsub_rn(ms_unit(p, k, li), __fmul_rn(p.coefs[4 * k + 1], mhat));
        t = __fadd_rn(t, __fmul_rn(d, p.weights[k]));
    }
    return t;
}

// One lane's sum of dot q over multislerp's derived vectors: `count` elements from local index
// li, `step` apart. Out of line and over the whole lane: the divisions' rare slow path is a call,
// and the fewer values live across it, the fewer ptxas spills (inlined into interp_dots' loop
// it spilled).
__device__ __noinline__ double ms_lane(const InterpParams& p, int q, size_t li, size_t step, u64 count) {
    double acc = 0.0;
    for (u64 c = 0; c < count; ++c, li += step) {
        float a, b;
        if (p.dots_rule == DOTS_MS_MEAN) {
            a = b = ms_mean(p, li);
        } else if (p.dots_rule == DOTS_MS_UNITS) {
            a = ms_unit(p, q, li);
            b = __fdiv_rn(ms_mean(p, li), p.s0);
        } else {
            a = b = ms_tangent(p, li, __fdiv_rn(ms_mean(p, li), p.s0));
        }
        acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(a), static_cast<double>(b)));
    }
    return acc;
}

// Grid: exactly the piece's units, block: exactly 256 threads. partials: npairs per block.
extern "C" __global__ void __launch_bounds__(INTERP_LANES)
interp_dots(const InterpParams* params, u64 unit0, double* partials, u64* bad) {
    __shared__ double lane_sum[INTERP_LANES];
    const InterpParams& p = *params;
    const int l = threadIdx.x;
    const u64 u = unit0 + blockIdx.x;
    u64 v, c;
    if (p.col_major) {
        c = u / p.count;
        v = u % p.count;
    } else {
        v = u / p.cpv;
        c = u % p.cpv;
    }
    const u64 first = c * INTERP_CHUNK;
    const u64 len = (p.vlen - first < INTERP_CHUNK) ? p.vlen - first : INTERP_CHUNK;
    const u64 start = v * p.vstep + first * p.estride;
    if (p.check) {
        // Indices grow with j, so the thread's first bad value is its lowest word.
        u64 my_bad = ~0ULL;
        for (u64 j = l; j < len && my_bad == ~0ULL; j += INTERP_LANES) {
            const u64 gi = start + j * p.estride;
            my_bad = interp_check(p, static_cast<size_t>(gi - p.at), gi);
        }
        if (my_bad != ~0ULL) atomicMin(bad, my_bad);
    }
    for (int q = 0; q < p.npairs; ++q) {
        double acc = 0.0;
        if (p.dots_rule == DOTS_PAIRS) {
            const int sa = p.pairs[2 * q], sb = p.pairs[2 * q + 1];
            for (u64 j = l; j < len; j += INTERP_LANES) {
                const size_t li = static_cast<size_t>(start + j * p.estride - p.at);
                const float a = interp_value(p, sa, li);
                const float b = interp_value(p, sb, li);
                // The product of two f32 is exact in f64: only the additions round.
                acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(a), static_cast<double>(b)));
            }
        } else if (static_cast<u64>(l) < len) {
            const u64 count = (len - l + INTERP_LANES - 1) / INTERP_LANES;
            acc = ms_lane(p, q, static_cast<size_t>(start + l * p.estride - p.at),
                          static_cast<size_t>(INTERP_LANES * p.estride), count);
        }
        lane_sum[l] = acc;
        __syncthreads();
        for (int stride = INTERP_LANES / 2; stride > 0; stride >>= 1) {
            if (l < stride) lane_sum[l] = __dadd_rn(lane_sum[l], lane_sum[l + stride]);
            __syncthreads();
        }
        if (l == 0) partials[static_cast<u64>(blockIdx.x) * p.npairs + q] = lane_sum[0];
        __syncthreads();
    }
}

// The vector tensor index gi belongs to (cpu/interp.rs `vector_of`).
__device__ __forceinline__ u64 interp_vector(const InterpParams& p, u64 gi) {
    if (p.count == 1) return 0;
    return p.col_major ? gi % p.estride : gi / p.vlen;
}

__device__ __forceinline__ float interp_one(const InterpParams& p, size_t li, u64 gi) {
    const int rule = p.rule;
    if (rule == INTERP_LINEAR) {
        float acc = 0.0f;
        for (int k = 0; k < p.k; ++k) {
            acc = __fadd_rn(acc, __fmul_rn(p.weights[k], load1(p.ops[1 + k].p, p.ops[1 + k].dtype, li)));
        }
        return p.normalize ? __fdiv_rn(acc, p.s0) : acc;
    }
    if (rule == INTERP_COPY) return load1(p.ops[1].p, p.ops[1].dtype, li);
    const float b = p.ops[0].p != nullptr ? load1(p.ops[0].p, p.ops[0].dtype, li) : 0.0f;
    if (rule == INTERP_MULTISLERP) {
        const float mhat = __fdiv_rn(ms_mean(p, li), p.s0);
        const float t = ms_tangent(p, li, mhat);
        const float r = __fmul_rn(__fadd_rn(__fmul_rn(mhat, p.s1), __fmul_rn(t, p.s2)), p.s3);
        return p.minus_base ? __fadd_rn(r, b) : r;
    }
    if (rule == INTERP_MS_FALLBACK) {
        const float r = __fadd_rn(__fmul_rn(interp_value(p, 1, li), p.weights[0]),
                                  __fmul_rn(interp_value(p, 2, li), p.weights[1]));
        return p.minus_base ? __fadd_rn(r, b) : r;
    }
    if (rule == INTERP_SLERP) {
        const float x = load1(p.ops[1].p, p.ops[1].dtype, li);
        return __fadd_rn(__fmul_rn(p.s0, b), __fmul_rn(p.s1, x));
    }
    if (rule == INTERP_NEARSWAP) {
        const float x = load1(p.ops[1].p, p.ops[1].dtype, li);
        // Rust's f32::max (NaN-ignoring, as fmaxf) and clamp (NaN passes through).
        float w = __fmul_rn(__fdiv_rn(1.0f, fmaxf(fabsf(__fsub_rn(b, x)), 1e-6f)), p.s0);
        if (w < 0.0f) w = 0.0f;
        if (w > 1.0f) w = 1.0f;
        return __fadd_rn(__fmul_rn(w, x), __fmul_rn(__fsub_rn(1.0f, w), b));
    }
    const float* c = p.coefs + 4 * interp_vector(p, gi);
    if (rule == INTERP_NUSLERP) {
        const float v0 = interp_value(p, 1, li), v1 = interp_value(p, 2, li);
        float r = __fadd_rn(__fmul_rn(c[0], v0), __fmul_rn(c[1], v1));
        if (c[3] == 0.0f) r = __fdiv_rn(r, c[2]);
        return p.minus_base ? __fadd_rn(b, r) : r;
    }
    // INTERP_MODEL_STOCK: the models themselves (not minus the base), summed in order.
    float sum = load1(p.ops[1].p, p.ops[1].dtype, li);
    for (int k = 1; k < p.k; ++k) sum = __fadd_rn(sum, load1(p.ops[1 + k].p, p.ops[1 + k].dtype, li));
    const float t = c[0];
    return __fadd_rn(__fmul_rn(t, __fdiv_rn(sum, static_cast<float>(p.k))), __fmul_rn(__fsub_rn(1.0f, t), b));
}

// Grid: any (grid-stride over the piece), block: any.
extern "C" __global__ void interp_write(const InterpParams* params, void* out, u64* bad) {
    const InterpParams& p = *params;
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    u64 my_bad = ~0ULL;
    for (size_t li = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; li < p.n; li += stride) {
        const u64 gi = p.at + li;
        if (p.check && my_bad == ~0ULL) my_bad = interp_check(p, li, gi);
        store1(out, p.out_dtype, li, interp_one(p, li, gi));
    }
    if (my_bad != ~0ULL) atomicMin(bad, my_bad);
}
