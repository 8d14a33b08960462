// kernels/emu/cuda_emu.h: a minimal CPU emulation of the CUDA execution model, enough to run
// kernels/*.cu on the host. Used by kernels_test.cpp (run.sh) and scripts/emu/fake_libcuda.cpp;
// nvcc never sees this file.
//
// Blocks run one after another (so `__shared__` = `static`). A block's threads are user-space
// fibers on the calling OS thread, not OS threads: each runs until it reaches a barrier
// (__syncthreads, or the warp-wide exchange behind every warp intrinsic), then the next one runs;
// a barrier opens when every thread of its block (or warp) that has not exited has arrived, as
// on the GPU. So a 1024-thread block costs 1024 small stacks and cheap switches instead of 1024
// OS threads, a launch uses exactly one core, and a kernel whose threads wait at different
// barriers is reported as a deadlock instead of hanging. Full-warp masks only.
//
// Floating point follows NVIDIA hardware where it differs from x86: an fp32 operation whose
// result is NaN gives the canonical NaN 0x7FFFFFFF, and so do the fp16/bf16 conversions of a NaN
// (0x7FFF) (PTX ISA, "Floating Point Instructions": NaN payloads are not propagated). x86 and the
// `half` crate keep sign and payload instead, which is why docs/SEMANTICS.md fixes the NaN that
// is written.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__  // (the emulation inlines as it likes)
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

// ------------------------------------------------------------------------------------------------
// fibers

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer of the running context into *save and
// resumes the context whose stack pointer is `to` (System V x86-64: rbx, rbp, r12-r15 survive
// calls; the FP control words are the same in every fiber of the process).
__attribute__((naked, noinline)) static void switch_to(void** /*save*/, void* /*to*/) {
    asm volatile(
        "pushq %rbp\n\t"
        "pushq %rbx\n\t"
        "pushq %r12\n\t"
        "pushq %r13\n\t"
        "pushq %r14\n\t"
        "pushq %r15\n\t"
        "movq %rsp, (%rdi)\n\t"
        "movq %rsi, %rsp\n\t"
        "popq %r15\n\t"
        "popq %r14\n\t"
        "popq %r13\n\t"
        "popq %r12\n\t"
        "popq %rbx\n\t"
        "popq %rbp\n\t"
        "ret\n\t");
}
#endif

constexpr size_t STACK_BYTES = 128 << 10;  // kernels keep a few hundred bytes of locals
constexpr size_t GUARD_BYTES = 4096;       // an overflow faults instead of corrupting a neighbour

struct Fiber {
    void* sp = nullptr;  // saved stack pointer (x86-64)
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    char* stack = nullptr;
    unsigned tid = 0;
    bool done = false;
};

struct Warp {
    unsigned size = 0;  // lanes at launch (32 but in a block's last, partial warp)
    unsigned expected = 0, arrived = 0, gen = 0;
    uint64_t slot[32];
};

// One block being run: its fibers, the block barrier and the warps' barriers.
struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    unsigned expected = 0, arrived = 0, gen = 0;
    uint64_t events = 0;  // arrivals and exits: a round of the scheduler without any is a deadlock
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
    void* sched_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t sched_uc;
#endif
};

inline thread_local Block* t_block = nullptr;
inline thread_local Fiber* t_fiber = nullptr;

// Stacks are kept per OS thread and reused by every launch.
inline std::vector<char*>& stack_pool() {
    static thread_local struct Pool {
        std::vector<char*> v;
        ~Pool() {
            for (char* s : v) munmap(s, STACK_BYTES);
        }
    } pool;
    return pool.v;
}
inline char* stack_for(unsigned i) {
    auto& pool = stack_pool();
    while (pool.size() <= i) {
        void* m = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "cuda_emu: no memory for a fiber stack\n");
            std::abort();
        }
        mprotect(m, GUARD_BYTES, PROT_NONE);
        pool.push_back(static_cast<char*>(m));
    }
    return pool[i];
}

// Back to the block's scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
    Block* b = t_block;
#if defined(__x86_64__)
    switch_to(&t_fiber->sp, b->sched_sp);
#else
    swapcontext(&t_fiber->uc, &b->sched_uc);
#endif
}

// Where a fiber starts: the kernel, then leaving both barriers (like arrive_and_drop: a thread
// that has exited no longer holds a barrier back), then back to the scheduler for good.
inline void on_exit_barriers(Block* b, Fiber* f) {
    Warp& w = b->warps[f->tid / 32];
    --w.expected;
    if (w.arrived > 0 && w.arrived == w.expected) { w.arrived = 0; ++w.gen; }
    --b->expected;
    if (b->arrived > 0 && b->arrived == b->expected) { b->arrived = 0; ++b->gen; }
    ++b->events;
}
inline void fiber_main() {
    Block* b = t_block;
    b->body(b->arg);
    Fiber* f = t_fiber;
    f->done = true;
    on_exit_barriers(b, f);
    yield();
    std::abort();  // a finished fiber is never resumed
}
#if defined(__x86_64__)
// Entered by the `ret` of the first switch_to into the fiber, as if called (rsp = 8 mod 16).
__attribute__((noreturn)) static void fiber_entry() {
    fiber_main();
    __builtin_unreachable();
}
#endif

inline void start_fiber([[maybe_unused]] Block& b, Fiber& f, unsigned i) {
    f.stack = stack_for(i);
#if defined(__x86_64__)
    auto* top = reinterpret_cast<uintptr_t*>(f.stack + STACK_BYTES);  // 16-byte aligned
    top[-1] = 0;                                                       // fiber_entry's return address
    top[-2] = reinterpret_cast<uintptr_t>(&fiber_entry);               // popped by switch_to's ret
    for (int r = 3; r <= 8; ++r) top[-r] = 0;                          // rbp rbx r12 r13 r14 r15
    f.sp = top - 8;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack + GUARD_BYTES;
    f.uc.uc_stack.ss_size = STACK_BYTES - GUARD_BYTES;
    f.uc.uc_link = &b.sched_uc;
    makecontext(&f.uc, fiber_main, 0);
#endif
}

inline void resume(Block& b, Fiber& f) {
    t_fiber = &f;
    threadIdx = {f.tid};
#if defined(__x86_64__)
    switch_to(&b.sched_sp, f.sp);
#else
    swapcontext(&b.sched_uc, &f.uc);
#endif
}

// Runs `grid` blocks of `block` threads of body(arg), one block after another.
inline void run_grid(unsigned grid, unsigned block, void (*body)(void*), void* arg) {
    if (block == 0 || block > 1024) {
        std::fprintf(stderr, "cuda_emu: a block of %u threads\n", block);
        std::abort();
    }
    Block* outer = t_block;  // (a launch from inside a kernel is not emulated)
    for (unsigned bi = 0; bi < grid; ++bi) {
        Block b;
        b.body = body;
        b.arg = arg;
        b.fibers.resize(block);
        b.warps.resize((block + 31) / 32);
        for (unsigned w = 0; w < b.warps.size(); ++w)
            b.warps[w].size = b.warps[w].expected = std::min(32u, block - 32 * w);
        b.expected = block;
        blockIdx = {bi};
        blockDim = {block};
        gridDim = {grid};
        t_block = &b;
        for (unsigned i = 0; i < block; ++i) {
            b.fibers[i].tid = i;
            start_fiber(b, b.fibers[i], i);
        }
        for (unsigned alive = block; alive > 0;) {
            const uint64_t before = b.events;
            alive = 0;
            for (Fiber& f : b.fibers) {
                if (f.done) continue;
                resume(b, f);
                alive += !f.done;
            }
            if (alive > 0 && b.events == before) {
                std::fprintf(stderr,
                             "cuda_emu: deadlock in block %u: %u threads wait at barriers that "
                             "cannot open (a __syncthreads or warp intrinsic not reached by every "
                             "thread of the block or warp)\n",
                             bi, alive);
                std::abort();
            }
        }
    }
    t_block = outer;
}

// A barrier over `expected` participants with counters (arrived, gen): the last to arrive opens
// it and goes on; the others wait for the generation to change.
inline void barrier(unsigned& expected, unsigned& arrived, unsigned& gen) {
    const unsigned g = gen;
    ++t_block->events;
    if (++arrived == expected) {
        arrived = 0;
        ++gen;
        return;
    }
    while (gen == g) yield();
}

}  // namespace emu

inline void __syncthreads() {
    emu::Block* b = emu::t_block;
    emu::barrier(b->expected, b->arrived, b->gen);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __trap() { std::fprintf(stderr, "__trap\n"); std::abort(); }

template <class T> inline uint64_t to_slot(T v) { uint64_t s = 0; std::memcpy(&s, &v, sizeof(T)); return s; }
template <class T> inline T from_slot(uint64_t s) { T v; std::memcpy(&v, &s, sizeof(T)); return v; }
inline emu::Warp& my_warp() { return emu::t_block->warps[threadIdx.x / 32]; }
inline int my_lane() { return threadIdx.x % 32; }
inline void warp_sync(emu::Warp& w) { emu::barrier(w.expected, w.arrived, w.gen); }

template <class T> inline T warp_read(T v, int src) {
    emu::Warp& w = my_warp();
    w.slot[my_lane()] = to_slot(v);
    warp_sync(w);
    T r = from_slot<T>(w.slot[src]);
    warp_sync(w);
    return r;
}
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) {
    int l = my_lane();
    return warp_read(v, l >= o ? l - o : l);
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return warp_read(v, src); }
inline unsigned __ballot_sync(unsigned, bool p) {
    emu::Warp& w = my_warp();
    w.slot[my_lane()] = p ? 1 : 0;
    warp_sync(w);
    unsigned r = 0;
    for (unsigned i = 0; i < w.size; ++i) r |= (w.slot[i] ? 1u : 0u) << i;
    warp_sync(w);
    return r;
}
inline unsigned __reduce_add_sync(unsigned, unsigned v) {
    emu::Warp& w = my_warp();
    w.slot[my_lane()] = v;
    warp_sync(w);
    unsigned r = 0;
    for (unsigned i = 0; i < w.size; ++i) r += (unsigned)w.slot[i];
    warp_sync(w);
    return r;
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
    emu::Warp& w = my_warp();
    w.slot[my_lane()] = v;
    warp_sync(w);
    unsigned r = 0;
    for (unsigned i = 0; i < w.size; ++i) r |= ((unsigned)w.slot[i] == v ? 1u : 0u) << i;
    warp_sync(w);
    return r;
}

// Blocks of one launch run on one OS thread, but launches on different fake streams may run on
// different OS threads at once: the atomics stay real atomics.
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

// NVIDIA's canonical fp32 NaN for every NaN an operation produces (see the top of the file).
inline float emu_canon(float r) { return std::isnan(r) ? __uint_as_float(0x7FFFFFFFu) : r; }
inline float __fadd_rn(float a, float b) { return emu_canon(a + b); }
inline float __fsub_rn(float a, float b) { return emu_canon(a - b); }
inline float __fmul_rn(float a, float b) { return emu_canon(a * b); }
inline float __fdiv_rn(float a, float b) { return emu_canon(a / b); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double d) { return emu_canon((float)d); }

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

struct __half { uint16_t x; };
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float x) {
    if (std::isnan(x)) return {0x7FFF};
    _Float16 f = (_Float16)x;
    __half h;
    std::memcpy(&h.x, &f, 2);
    return h;
}
struct __nv_bfloat16 { uint16_t x; };
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7FFF};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

// launch<<<grid, block>>>(args...), synchronously, on the calling OS thread.
template <class... P, class... A>
void launch(unsigned grid, unsigned block, void (*kernel)(P...), A... args) {
    auto call = [&] { kernel(static_cast<P>(args)...); };
    emu::run_grid(grid, block, [](void* c) { (*static_cast<decltype(call)*>(c))(); }, &call);
}
