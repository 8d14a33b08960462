// A fake libcuda.so for checking the CUDA backend's host code without a GPU, as strict as the
// real driver where the host code can go wrong: the driver calls that cudarc makes (context,
// stream, memory, copies, events, module and kernel launch) over host memory, with
// cuLaunchKernel running the real kernels/*.cu under kernels/emu/cuda_emu.h. Device pointers are
// host addresses. Built and used by scripts/emu-gpu-tests.sh; the fatbin handed to
// cuModuleLoadData is ignored: kernels are looked up by name among the ones compiled in here.
//
// What it holds the host code to (docs/STREAMING.md, "The fake libcuda"):
// - a context: every call that needs one fails with CUDA_ERROR_INVALID_CONTEXT (201) unless the
//   primary context is current on the calling thread (cuCtxSetCurrent), as on a real driver;
// - memory pools, as an H200 reports them (FAKE_CUDA_POOLS=0: none): cudarc then allocates and
//   frees with cuMemAllocAsync / cuMemFreeAsync, and a free runs in stream order;
// - streams that run asynchronously on worker threads with seeded random delays, or eagerly or
//   lazily (fake_device.h), so a missing event wait or a buffer reused before its copy ran gives
//   wrong bytes or a violation;
// - freed device memory poisoned and reused; use after free, a free that is not ordered after the
//   streams using the memory, and pinned host memory freed or rewritten while a copy uses it are
//   violations (a sticky error on every later call, like a GPU fault);
// - host memory registered (cuMemHostRegister) counts as pinned while registered; overlapping
//   registrations are refused, unregistering it while a copy uses it is a violation, a copy into
//   a read-only registration is refused (FAKE_CUDA_NO_REGISTER=1: every registration refused);
// - FAKE_CUDA_STRICT (default 1): a copy from pageable host memory into a stream with kernels
//   queued since the host last waited for it is refused with CUDA_ERROR_NOT_PERMITTED (800): the
//   driver stages pageable copies and may make the host wait for those kernels.
// Other knobs: FAKE_CUDA_SEED, FAKE_CUDA_DELAY_US (most delay per operation, default 200; 0:
// none), FAKE_CUDA_SCHEDULE, FAKE_CUDA_EAGER_STREAM, FAKE_CUDA_LAZY_STREAM, FAKE_CUDA_FREE_BYTES
// (the most device memory free), FAKE_CUDA_SMS (SM count, default 2), FAKE_CUDA_TRACE (print
// launches), FAKE_CUDA_ABORT (abort at a violation).
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "score.cu"
#include "select.cu"
#include "fuse.cu"
#include "overlap.cu"
#include "fisher.cu"
#include "interp.cu"

#include "fake_device.h"

using namespace fake;

namespace {

// ------------------------------------------------------------------------------------------------
// kernels

// A kernel's parameters arrive as void** (each entry points at the argument's bytes); they are
// read at the call (the caller may reuse them at once), the kernel runs later on its stream.
template <class T> T arg(void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
template <class T> void note_ptr(T v, std::vector<Range>& dev) {
    if constexpr (std::is_pointer_v<T>) {
        if (v) dev.push_back({reinterpret_cast<uintptr_t>(v), 1});
    }
}
struct Bound {
    std::function<void()> run;
    std::vector<Range> dev;  // the pointer arguments: each must lie in live device memory
};
template <class... P, size_t... I>
Bound bind_impl(void (*k)(P...), unsigned g, unsigned b, void** params, std::index_sequence<I...>) {
    auto args = std::make_tuple(arg<P>(params[I])...);
    Bound r;
    (note_ptr(std::get<I>(args), r.dev), ...);
    r.run = [=] { std::apply([&](auto... a) { launch(g, b, k, a...); }, args); };
    return r;
}
template <class... P> Bound bind(void (*k)(P...), unsigned g, unsigned b, void** params) {
    return bind_impl(k, g, b, params, std::index_sequence_for<P...>{});
}

struct Function {
    const char* name;
    Bound (*bind)(unsigned grid, unsigned block, void** params);
};

#define KERNEL(name) {#name, Function{#name, [](unsigned g, unsigned b, void** p) { return bind(name, g, b, p); }}}
const std::map<std::string, Function>& kernels() {
    static const std::map<std::string, Function> k = {
        KERNEL(score_keys),        KERNEL(keys_normalize), KERNEL(score_sum),
        KERNEL(select_init),       KERNEL(select_filter),  KERNEL(select_tie_count),
        KERNEL(select_tie_cutoff), KERNEL(select_mask),    KERNEL(dare_mask),
        KERNEL(select_mask_clear),
        KERNEL(fuse_linear),       KERNEL(fuse_ties),
        KERNEL(fuse_linear_f32),   KERNEL(fuse_linear_f16), KERNEL(fuse_linear_bf16),
        KERNEL(fuse_ties_f32),     KERNEL(fuse_ties_f16),   KERNEL(fuse_ties_bf16),
        KERNEL(masks_consensus),   KERNEL(masks_exclusive), KERNEL(fuse_fisher),
        KERNEL(interp_dots),       KERNEL(interp_write),
    };
    return k;
}

// ------------------------------------------------------------------------------------------------
// the context

int g_ctx_token;
int g_ctx_refs = 0;
thread_local void* g_current = nullptr;
int g_streams_created = 0;
Stream* g_null_stream = nullptr;  // the default stream (handle NULL), made when first used
int g_unbound_printed = 0;

// The check at the top of every call that needs a context (with the lock held).
CUresult ctx_check(const char* fn) {
    if (g_current != &g_ctx_token || g_ctx_refs == 0) {
        if (g_unbound_printed++ < 20) {
            std::fprintf(stderr,
                         "fake libcuda: %s without a current context on this thread: "
                         "CUDA_ERROR_INVALID_CONTEXT\n",
                         fn);
        }
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    return g_sticky;
}
#define CTX                                           \
    Lock lk(mu());                                    \
    if (CUresult ctx_r_ = ctx_check(__func__)) return ctx_r_

Stream* stream_of(void* s) {
    if (s) return static_cast<Stream*>(s);
    if (!g_null_stream) g_null_stream = new_stream(0, ASYNC);
    return g_null_stream;
}

Mode mode_for(int index) {
    if (index == env_int("FAKE_CUDA_EAGER_STREAM", 0)) return EAGER;
    if (index == env_int("FAKE_CUDA_LAZY_STREAM", 0)) return LAZY;
    const char* v = std::getenv("FAKE_CUDA_SCHEDULE");
    if (v && !std::strcmp(v, "eager")) return EAGER;
    if (v && !std::strcmp(v, "lazy")) return LAZY;
    return ASYNC;
}

// FAKE_CUDA_FREE_BYTES: the most device memory free at any time (a GPU with less memory than the
// budget assumes); unset: the whole 16 GiB.
size_t free_cap() {
    const char* v = std::getenv("FAKE_CUDA_FREE_BYTES");
    return v ? std::strtoull(v, nullptr, 10) : ~size_t(0);
}

std::string what(const char* call, size_t n) { return std::string(call) + " of " + std::to_string(n) + " bytes"; }

void sync_all(Lock& lk) {
    for (Stream* s : g_streams) host_wait(lk, s, s->enqueued);
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) {
    Lock lk(mu());
    static bool said = false;
    if (!said) {
        said = true;
        const char* sv = std::getenv("FAKE_CUDA_SEED");
        g_seed = sv && *sv ? std::strtoull(sv, nullptr, 10) : std::random_device{}();
        g_delay_us = env_int("FAKE_CUDA_DELAY_US", 200);
        std::fprintf(stderr,
                     "fake libcuda: streams run on worker threads with random delays of up to %d us "
                     "(FAKE_CUDA_SEED=%llu FAKE_CUDA_DELAY_US=%d repeats the delays)\n",
                     g_delay_us, (unsigned long long)g_seed, g_delay_us);
    }
    return CUDA_SUCCESS;
}
CUresult cuDriverGetVersion(int* v) { *v = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int* c) { *c = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "fake libcuda (kernels/emu emulation)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = TOTAL; return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 16: *v = env_int("FAKE_CUDA_SMS", 2); break;    // MULTIPROCESSOR_COUNT: small grids
        case 75: *v = 9; break;                               // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                               // COMPUTE_CAPABILITY_MINOR
        case 115: *v = env_int("FAKE_CUDA_POOLS", 1); break;  // MEMORY_POOLS_SUPPORTED, as an H200
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    Lock lk(mu());
    ++g_ctx_refs;
    *ctx = &g_ctx_token;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) {
    Lock lk(mu());
    if (g_ctx_refs == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (--g_ctx_refs == 0) g_sticky = 0;  // the context is gone; the next one starts clean
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(void** ctx) { *ctx = g_current; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void* ctx) {
    if (ctx && ctx != &g_ctx_token) return CUDA_ERROR_INVALID_CONTEXT;
    g_current = ctx;
    return CUDA_SUCCESS;
}

CUresult cuStreamCreate(void** s, unsigned) {
    CTX;
    const int index = g_streams_created++ % 3 + 1;
    *s = new_stream(index, mode_for(index));
    return CUDA_SUCCESS;
}
CUresult cuStreamDestroy_v2(void* s) {
    CTX;
    auto* st = static_cast<Stream*>(s);
    if (st->stop) return CUDA_ERROR_INVALID_HANDLE;
    stop_stream(st);  // the driver lets queued work finish, without waiting for it
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
    CTX;
    Stream* st = stream_of(s);
    host_wait(lk, st, st->enqueued);
    return g_sticky;
}
CUresult cuCtxSynchronize() {
    CTX;
    sync_all(lk);
    return g_sticky;
}
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    CTX;
    auto* ev = static_cast<Event*>(e);
    if (ev->recorded == 0) return CUDA_SUCCESS;  // never recorded: nothing to wait for
    Op op;
    op.kind = WAIT;
    op.what = "cuStreamWaitEvent";
    op.event = ev;
    op.id = ev->recorded;
    op.on = ev->stream;
    op.on_seq = ev->record_seq;
    enqueue(lk, stream_of(s), std::move(op));
    return CUDA_SUCCESS;
}

CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    CTX;
    void* m = std::aligned_alloc(4096, ((bytes + 4095) / 4096) * 4096);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(m, 0xAB, bytes);
    g_pinned[reinterpret_cast<uintptr_t>(m)] = bytes;
    *p = m;
    return CUDA_SUCCESS;
}
// Registering the caller's memory (page-locking it for DMA). As on the driver: a range that
// overlaps page-locked memory is refused (712), unregistering takes the registered pointer (713
// otherwise), and a copy into a range registered read-only is refused. Unregistering while a
// copy still uses the range is a violation, like freeing pinned memory in use.
// FAKE_CUDA_NO_REGISTER=1 refuses every registration (801), as a device without it would.
CUresult cuMemHostRegister_v2(void* p, size_t bytes, unsigned flags) {
    CTX;
    if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (env_int("FAKE_CUDA_NO_REGISTER", 0)) return CUDA_ERROR_NOT_SUPPORTED;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (overlaps_pinned(a, bytes)) return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    g_registered[a] = {bytes, (flags & 0x08) != 0};  // CU_MEMHOSTREGISTER_READ_ONLY
    return CUDA_SUCCESS;
}
CUresult cuMemHostUnregister(void* p) {
    CTX;
    auto it = g_registered.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_registered.end()) return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    const Stream* where = nullptr;
    const Op* o = in_flight(nullptr, it->first, it->second.bytes, false, &where);
    g_registered.erase(it);
    if (o) {
        violation(CUDA_ERROR_UNKNOWN,
                  "cuMemHostUnregister unregistered host memory at %p while %s on stream %d, "
                  "which uses it, was in flight",
                  p, o->what.c_str(), where->index);
    }
    return CUDA_SUCCESS;
}
CUresult cuMemFreeHost(void* p) {
    CTX;
    auto it = g_pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_pinned.end()) return CUDA_ERROR_INVALID_VALUE;
    const Stream* where = nullptr;
    const Op* o = in_flight(nullptr, it->first, it->second, false, &where);
    g_pinned.erase(it);
    if (o) {
        violation(CUDA_ERROR_UNKNOWN,
                  "cuMemFreeHost freed pinned host memory at %p while %s on stream %d, which uses "
                  "it, was in flight",
                  p, o->what.c_str(), where->index);
        return CUDA_SUCCESS;  // kept allocated: the copy still runs
    }
    std::free(p);
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(uint64_t* p, size_t bytes) {
    CTX;
    if (bytes > free_cap() || g_allocated + bytes > TOTAL) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = device_alloc(bytes);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
// Stream-ordered: usable by work queued on the stream after this call (and, once the stream
// has run to here, by any stream); the fake hands the memory out at once.
CUresult cuMemAllocAsync(uint64_t* p, size_t bytes, void*) {
    CTX;
    if (bytes > free_cap() || g_allocated + bytes > TOTAL) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = device_alloc(bytes);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFree_v2(uint64_t p) {
    CTX;
    auto it = g_blocks.find(p);
    if (it == g_blocks.end() || !it->second.live) return CUDA_ERROR_INVALID_VALUE;
    sync_all(lk);  // cuMemFree waits for the device
    device_free(p);
    return CUDA_SUCCESS;
}
CUresult cuMemFreeAsync(uint64_t p, void* s) {
    CTX;
    auto it = g_blocks.find(p);
    if (it == g_blocks.end() || !it->second.live) return CUDA_ERROR_INVALID_VALUE;
    Op op;
    op.kind = FREE;
    op.what = what("cuMemFreeAsync", it->second.size);
    op.dev = {{p, it->second.size}};
    op.block = p;
    enqueue(lk, stream_of(s), std::move(op));
    return CUDA_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    CTX;
    *total = TOTAL;
    *free_b = std::min(TOTAL - g_allocated, free_cap());
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t n, void* s) {
    CTX;
    Stream* st = stream_of(s);
    void* d = reinterpret_cast<void*>(dst);
    Op op;
    op.what = what("cuMemcpyHtoDAsync", n);
    op.dev = {{dst, n}};
    if (is_pinned(src, n)) {
        op.host = {{reinterpret_cast<uintptr_t>(src), n}};
        op.src = src;
        op.src_len = n;
        op.src_hash = hash_bytes(src, n);
        op.run = [=] { std::memcpy(d, src, n); };  // reads the pinned bytes when it runs
    } else {
        if (env_int("FAKE_CUDA_STRICT", 1) && st->last_launch > st->host_waited) {
            std::fprintf(stderr,
                         "fake libcuda: STRICT: cuMemcpyHtoDAsync of %zu bytes from pageable "
                         "memory on stream %d, which has kernels queued since the host last waited "
                         "for it: the driver stages pageable copies and may make the host wait for "
                         "those kernels; upload from pinned memory before the first launch "
                         "(FAKE_CUDA_STRICT=0 allows it)\n",
                         n, st->index);
            return CUDA_ERROR_NOT_PERMITTED;
        }
        // The driver takes pageable bytes at the call.
        auto bytes = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                         static_cast<const char*>(src) + n);
        op.run = [=] { std::memcpy(d, bytes->data(), n); };
    }
    enqueue(lk, st, std::move(op));
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t n, void* s) {
    CTX;
    Stream* st = stream_of(s);
    const void* from = reinterpret_cast<const void*>(src);
    if (const Registered* r = registered(dst, n); r && r->read_only) {
        std::fprintf(stderr, "fake libcuda: cuMemcpyDtoHAsync into host memory registered read-only\n");
        return CUDA_ERROR_INVALID_VALUE;
    }
    const bool pinned = is_pinned(dst, n);
    Op op;
    op.what = what("cuMemcpyDtoHAsync", n);
    op.dev = {{src, n}};
    if (pinned) op.host = {{reinterpret_cast<uintptr_t>(dst), n}};
    op.run = [=] { std::memcpy(dst, from, n); };
    const uint64_t seq = enqueue(lk, st, std::move(op));
    if (!pinned) host_wait(lk, st, seq);  // into pageable memory: returns when done
    return g_sticky;
}
CUresult cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void* s) {
    CTX;
    Op op;
    op.what = what("cuMemcpyDtoDAsync", n);
    op.dev = {{dst, n}, {src, n}};
    op.run = [=] { std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n); };
    enqueue(lk, stream_of(s), std::move(op));
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(uint64_t dst, unsigned char v, size_t n, void* s) {
    CTX;
    Op op;
    op.what = what("cuMemsetD8Async", n);
    op.dev = {{dst, n}};
    op.run = [=] { std::memset(reinterpret_cast<void*>(dst), v, n); };
    enqueue(lk, stream_of(s), std::move(op));
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(uint64_t dst, unsigned v, size_t n, void* s) {
    CTX;
    if (dst % 4) return CUDA_ERROR_INVALID_VALUE;
    Op op;
    op.what = what("cuMemsetD32Async", 4 * n);
    op.dev = {{dst, 4 * n}};
    op.run = [=] {
        auto* p = reinterpret_cast<unsigned*>(dst);
        for (size_t i = 0; i < n; ++i) p[i] = v;
    };
    enqueue(lk, stream_of(s), std::move(op));
    return CUDA_SUCCESS;
}

CUresult cuModuleLoadData(void** m, const void*) {
    CTX;
    *m = new int(0);
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(void* m) {
    CTX;
    delete static_cast<int*>(m);
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    CTX;
    auto it = kernels().find(name);
    if (it == kernels().end()) return CUDA_ERROR_NOT_FOUND;
    *f = const_cast<Function*>(&it->second);
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* s, void** params, void**) {
    CTX;
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || smem != 0 || gx == 0 || bx == 0 || bx > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    auto* fn = static_cast<Function*>(f);
    if (std::getenv("FAKE_CUDA_TRACE")) std::fprintf(stderr, "launch %s<<<%u, %u>>>\n", fn->name, gx, bx);
    Bound b = fn->bind(gx, bx, params);
    Op op;
    op.what = std::string("kernel ") + fn->name;
    op.kernel = true;
    op.dev = std::move(b.dev);
    op.run = std::move(b.run);
    enqueue(lk, stream_of(s), std::move(op));
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(void** e, unsigned) {
    CTX;
    *e = new Event{};
    return CUDA_SUCCESS;
}
// Queued operations may still point at the event: it is never freed (a few per backend).
CUresult cuEventDestroy_v2(void*) {
    CTX;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* ev, void* s) {
    CTX;
    auto* e = static_cast<Event*>(ev);
    Stream* st = stream_of(s);
    Op op;
    op.kind = RECORD;
    op.what = "cuEventRecord";
    op.event = e;
    op.id = ++e->recorded;
    e->stream = st;
    e->record_seq = st->enqueued + 1;  // the sequence number enqueue gives it
    enqueue(lk, st, std::move(op));
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(void* ev) {
    CTX;
    auto* e = static_cast<Event*>(ev);
    if (e->stream) host_wait(lk, e->stream, e->record_seq);
    return g_sticky;
}
CUresult cuEventQuery(void* ev) {
    CTX;
    auto* e = static_cast<Event*>(ev);
    if (e->stream) release(e->stream, e->record_seq);  // a lazy stream would never get there
    return e->reached >= e->recorded ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    CTX;
    auto *ea = static_cast<Event*>(a), *eb = static_cast<Event*>(b);
    if (ea->stream) host_wait(lk, ea->stream, ea->record_seq);
    if (eb->stream) host_wait(lk, eb->stream, eb->record_seq);
    *ms = std::chrono::duration<float, std::milli>(eb->t - ea->t).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuGetErrorName(int e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case CUDA_ERROR_NOT_PERMITTED: *s = "CUDA_ERROR_NOT_PERMITTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(int e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "no error"; break;
        case CUDA_ERROR_INVALID_CONTEXT: *s = "invalid device context"; break;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "an illegal memory access was encountered (fake libcuda: see its VIOLATION line)"; break;
        case CUDA_ERROR_NOT_PERMITTED: *s = "operation not permitted (fake libcuda: see its STRICT line)"; break;
        case CUDA_ERROR_UNKNOWN: *s = "unknown error (fake libcuda: see its VIOLATION line)"; break;
        default: *s = "error in the fake libcuda";
    }
    return CUDA_SUCCESS;
}

}  // extern "C"
