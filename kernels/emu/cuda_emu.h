// kernels/emu/cuda_emu.h: a minimal CPU emulation of the CUDA execution model, enough to run
// kernels/*.cu on the host: one OS thread per CUDA thread, blocks run one after another (so
// `__shared__` = `static`), __syncthreads and warp intrinsics on real barriers. Full-warp masks
// only. Used by kernels_test.cpp (run.sh); nvcc never sees this file.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <memory>
#include <cstdio>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct WarpCtx {
    std::barrier<> bar{32};
    uint64_t slot[32];
};
struct BlockCtx {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<WarpCtx>> warps;
};
inline thread_local BlockCtx* g_ctx = nullptr;

inline void __syncthreads() { g_ctx->bar->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __trap() { std::fprintf(stderr, "__trap\n"); std::abort(); }

template <class T> inline uint64_t to_slot(T v) { uint64_t s = 0; std::memcpy(&s, &v, sizeof(T)); return s; }
template <class T> inline T from_slot(uint64_t s) { T v; std::memcpy(&v, &s, sizeof(T)); return v; }
inline WarpCtx& my_warp() { return *g_ctx->warps[threadIdx.x / 32]; }
inline int my_lane() { return threadIdx.x % 32; }

template <class T> inline T warp_read(T v, int src) {
    WarpCtx& w = my_warp();
    w.slot[my_lane()] = to_slot(v);
    w.bar.arrive_and_wait();
    T r = from_slot<T>(w.slot[src]);
    w.bar.arrive_and_wait();
    return r;
}
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) {
    int l = my_lane();
    return warp_read(v, l >= o ? l - o : l);
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return warp_read(v, src); }
inline unsigned __ballot_sync(unsigned, bool p) {
    WarpCtx& w = my_warp();
    w.slot[my_lane()] = p ? 1 : 0;
    w.bar.arrive_and_wait();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= (w.slot[i] ? 1u : 0u) << i;
    w.bar.arrive_and_wait();
    return r;
}
inline unsigned __reduce_add_sync(unsigned, unsigned v) {
    WarpCtx& w = my_warp();
    w.slot[my_lane()] = v;
    w.bar.arrive_and_wait();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r += (unsigned)w.slot[i];
    w.bar.arrive_and_wait();
    return r;
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
    WarpCtx& w = my_warp();
    w.slot[my_lane()] = v;
    w.bar.arrive_and_wait();
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((unsigned)w.slot[i] == v ? 1u : 0u) << i;
    w.bar.arrive_and_wait();
    return r;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double d) { return (float)d; }

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

struct __half { uint16_t x; };
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.x, &f, 2); return h; }
struct __nv_bfloat16 { uint16_t x; };
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

// launch<<<grid, block>>>(args...), synchronously
template <class... P, class... A>
void launch(unsigned grid, unsigned block, void (*kernel)(P...), A... args) {
    for (unsigned b = 0; b < grid; ++b) {
        BlockCtx ctx;
        ctx.bar = std::make_unique<std::barrier<>>(block);
        for (unsigned w = 0; w < (block + 31) / 32; ++w) ctx.warps.push_back(std::make_unique<WarpCtx>());
        std::vector<std::thread> ts;
        ts.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            ts.emplace_back([&, t] {
                threadIdx = {t}; blockIdx = {b}; blockDim = {block}; gridDim = {grid};
                g_ctx = &ctx;
                kernel(static_cast<P>(args)...);
                ctx.warps[t / 32]->bar.arrive_and_drop();
                ctx.bar->arrive_and_drop();
            });
        }
        for (auto& t : ts) t.join();
    }
}
