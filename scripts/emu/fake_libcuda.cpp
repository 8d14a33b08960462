// A fake libcuda.so for checking the CUDA backend's host code without a GPU: the driver calls
// that cudarc makes (context, stream, memory, copies, events, module and kernel launch) over host
// memory, and cuLaunchKernel running the real kernels/*.cu under kernels/emu/cuda_emu.h (one OS
// thread per CUDA thread, blocks one after another). Device pointers are host addresses. It
// checks argument order and types, buffer sizes and offsets, launch sequences and the decoding
// of results, not GPU memory ordering or speed.
//
// Streams are faithful to the ordering rules, and lazy: every asynchronous operation (kernel,
// async copy, memset, event record) is queued on its stream and runs only when something waits
// for it (cuStreamSynchronize, cuEventSynchronize, cuCtxSynchronize, cuStreamWaitEvent on another
// stream, a blocking copy, freeing memory). So a host that reads a pinned buffer before the copy
// into it is waited for sees stale bytes, a pinned staging buffer overwritten before the copy out
// of it ran uploads the wrong data, and a stream that does not wait for another's event runs
// before it: the bugs overlapped transfers invite. As in the driver, a copy from pageable host
// memory takes the bytes at the call, and a copy into pageable memory returns when done; copies
// to and from cuMemHostAlloc memory run in stream order. FAKE_CUDA_EAGER_STREAM (below) makes
// one stream run its operations at once instead, which finds a missing wait the lazy order hides.
//
// Built and used by scripts/emu-gpu-tests.sh. The fatbin handed to cuModuleLoadData is ignored:
// kernels are looked up by name among the ones compiled into this library.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "score.cu"
#include "select.cu"
#include "fuse.cu"

typedef int CUresult;  // CUDA_SUCCESS = 0
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
};

namespace {

// A kernel's parameters arrive as void** (each entry points at the argument's bytes).
template <class T> T arg(void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
// The arguments are read at the call (the caller may reuse them at once), the kernel runs later.
template <class... P, size_t... I>
std::function<void()> bind_impl(void (*k)(P...), unsigned g, unsigned b, void** params,
                                std::index_sequence<I...>) {
    auto args = std::make_tuple(arg<P>(params[I])...);
    return [=] { std::apply([&](auto... a) { launch(g, b, k, a...); }, args); };
}
template <class... P>
std::function<void()> bind(void (*k)(P...), unsigned g, unsigned b, void** params) {
    return bind_impl(k, g, b, params, std::index_sequence_for<P...>{});
}

struct Function {
    std::function<void()> (*bind)(unsigned grid, unsigned block, void** params);
};

#define KERNEL(name) {#name, Function{[](unsigned g, unsigned b, void** p) { return bind(name, g, b, p); }}}
const std::map<std::string, Function>& kernels() {
    static const std::map<std::string, Function> k = {
        KERNEL(score_keys),        KERNEL(keys_normalize), KERNEL(score_sum),
        KERNEL(select_init),       KERNEL(select_filter),  KERNEL(select_tie_count),
        KERNEL(select_tie_cutoff), KERNEL(select_mask),    KERNEL(dare_mask),
        KERNEL(fuse_linear),       KERNEL(fuse_ties),
    };
    return k;
}

struct Stream {
    std::deque<std::function<void()>> q;
    bool eager = false;  // runs each operation when it is queued (FAKE_CUDA_EAGER_STREAM)
};

struct Event {
    std::chrono::steady_clock::time_point t;
    Stream* stream = nullptr;  // where it was last recorded
    uint64_t recorded = 0;     // records made
    uint64_t reached = 0;      // records the stream has run up to
};

int g_ctx_token;
thread_local void* g_current = nullptr;
size_t g_allocated = 0;
std::map<uint64_t, size_t> g_sizes;
std::map<uintptr_t, size_t> g_pinned;  // cuMemHostAlloc blocks: start -> bytes
std::set<Stream*> g_streams;
Stream g_null_stream;                  // the legacy default stream (handle NULL)
std::recursive_mutex g_lock;           // one driver call at a time

Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : &g_null_stream; }

// Runs the stream's operations in order until `until` returns true (or the queue is empty).
void run_until(Stream* s, const std::function<bool()>& until) {
    while (!s->q.empty() && !until()) {
        auto op = std::move(s->q.front());
        s->q.pop_front();
        op();
    }
}
void flush(Stream* s) { run_until(s, [] { return false; }); }
void flush_all() {
    flush(&g_null_stream);
    for (Stream* s : g_streams) flush(s);
}
void flush_event(Event* e) {
    if (e->stream) {
        const uint64_t want = e->recorded;
        run_until(e->stream, [e, want] { return e->reached >= want; });
    }
}
void enqueue(void* s, std::function<void()> op) {
    Stream* st = stream_of(s);
    st->q.push_back(std::move(op));
    if (st->eager) flush(st);
}

bool is_pinned(const void* p, size_t n) {
    auto it = g_pinned.upper_bound(reinterpret_cast<uintptr_t>(p));
    if (it == g_pinned.begin()) return false;
    --it;
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    return a >= it->first && a + n <= it->first + it->second;
}

#define LOCK std::lock_guard<std::recursive_mutex> guard_(g_lock)

int env_int(const char* name, int dflt) {
    const char* v = std::getenv(name);
    return v ? std::atoi(v) : dflt;
}

// FAKE_CUDA_FREE_BYTES: the most device memory free at any time (a GPU with less memory than the
// budget assumes); unset: the whole 16 GiB.
size_t free_cap() {
    const char* v = std::getenv("FAKE_CUDA_FREE_BYTES");
    return v ? std::strtoull(v, nullptr, 10) : ~size_t(0);
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
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
CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = size_t(16) << 30; return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 16: *v = env_int("FAKE_CUDA_SMS", 2); break;  // MULTIPROCESSOR_COUNT: small grids
        case 75: *v = 9; break;                             // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                             // COMPUTE_CAPABILITY_MINOR
        default: *v = 0;                                    // e.g. MEMORY_POOLS_SUPPORTED: no
    }
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &g_ctx_token; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = g_current; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void* ctx) { g_current = ctx; return CUDA_SUCCESS; }

// FAKE_CUDA_EAGER_STREAM=k: the k-th of every three streams created (the backend creates its
// compute, copy and download streams in that order) runs each operation as soon as it is queued,
// while the others stay lazy. A consumer stream that misses a wait for another stream's event
// then runs before the producer, the opposite order to the lazy one.
int g_streams_created = 0;

CUresult cuStreamCreate(void** s, unsigned) {
    LOCK;
    auto* st = new Stream;
    st->eager = g_streams_created++ % 3 + 1 == env_int("FAKE_CUDA_EAGER_STREAM", 0);
    g_streams.insert(st);
    *s = st;
    return CUDA_SUCCESS;
}
CUresult cuStreamDestroy_v2(void* s) {
    LOCK;
    auto* st = static_cast<Stream*>(s);
    flush(st);  // the driver lets queued work finish
    g_streams.erase(st);
    delete st;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
    LOCK;
    flush(stream_of(s));
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() {
    LOCK;
    flush_all();
    return CUDA_SUCCESS;
}
// Later work on `s` must see everything before the event: running the recording stream up to
// it now is one valid schedule.
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    LOCK;
    (void)s;
    flush_event(static_cast<Event*>(e));
    return CUDA_SUCCESS;
}

CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    LOCK;
    void* m = std::aligned_alloc(4096, ((bytes + 4095) / 4096) * 4096);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(m, 0xAB, bytes);
    g_pinned[reinterpret_cast<uintptr_t>(m)] = bytes;
    *p = m;
    return CUDA_SUCCESS;
}
CUresult cuMemFreeHost(void* p) {
    LOCK;
    auto it = g_pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_pinned.end()) return CUDA_ERROR_INVALID_VALUE;
    flush_all();  // the driver waits for copies that use it
    g_pinned.erase(it);
    std::free(p);
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(uint64_t* p, size_t bytes) {
    LOCK;
    if (bytes > free_cap() || g_allocated + bytes > (size_t(16) << 30)) return CUDA_ERROR_OUT_OF_MEMORY;
    void* m = std::aligned_alloc(256, ((bytes + 255) / 256) * 256 + 256);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(m, 0xCD, bytes);  // uninitialised device memory is not zero
    *p = reinterpret_cast<uint64_t>(m);
    g_sizes[*p] = bytes;
    g_allocated += bytes;
    return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(uint64_t* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFree_v2(uint64_t p) {
    LOCK;
    flush_all();  // cuMemFree waits for the work that may use the memory
    auto it = g_sizes.find(p);
    if (it == g_sizes.end()) return CUDA_ERROR_INVALID_VALUE;
    g_allocated -= it->second;
    g_sizes.erase(it);
    std::free(reinterpret_cast<void*>(p));
    return CUDA_SUCCESS;
}
CUresult cuMemFreeAsync(uint64_t p, void*) { return cuMemFree_v2(p); }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    LOCK;
    *total = size_t(16) << 30;
    *free_b = std::min(*total - g_allocated, free_cap());
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t n, void* s) {
    LOCK;
    void* d = reinterpret_cast<void*>(dst);
    if (is_pinned(src, n)) {
        enqueue(s, [=] { std::memcpy(d, src, n); });  // read when the copy runs
    } else {
        auto bytes = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                         static_cast<const char*>(src) + n);
        enqueue(s, [=] { std::memcpy(d, bytes->data(), n); });
    }
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t n, void* s) {
    LOCK;
    const void* from = reinterpret_cast<const void*>(src);
    enqueue(s, [=] { std::memcpy(dst, from, n); });
    if (!is_pinned(dst, n)) flush(stream_of(s));  // into pageable memory: returns when done
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void* s) {
    LOCK;
    enqueue(s, [=] {
        std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    });
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(uint64_t dst, unsigned char v, size_t n, void* s) {
    LOCK;
    enqueue(s, [=] { std::memset(reinterpret_cast<void*>(dst), v, n); });
    return CUDA_SUCCESS;
}

CUresult cuModuleLoadData(void** m, const void*) { *m = new int(0); return CUDA_SUCCESS; }
CUresult cuModuleUnload(void* m) { delete static_cast<int*>(m); return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    auto it = kernels().find(name);
    if (it == kernels().end()) return CUDA_ERROR_NOT_FOUND;
    *f = const_cast<Function*>(&it->second);
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* s, void** params, void**) {
    LOCK;
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || smem != 0 || gx == 0 || bx == 0 || bx > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    if (std::getenv("FAKE_CUDA_TRACE")) {
        for (auto& [name, fn] : kernels())
            if (&fn == f) std::fprintf(stderr, "launch %s<<<%u, %u>>>\n", name.c_str(), gx, bx);
    }
    enqueue(s, static_cast<Function*>(f)->bind(gx, bx, params));
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(void** e, unsigned) { *e = new Event{}; return CUDA_SUCCESS; }
CUresult cuEventDestroy_v2(void* e) {
    LOCK;
    flush_event(static_cast<Event*>(e));  // a queued record must not touch a freed event
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* ev, void* s) {
    LOCK;
    auto* e = static_cast<Event*>(ev);
    flush_event(e);  // an earlier record of this event on another stream stays ordered
    e->stream = stream_of(s);
    const uint64_t id = ++e->recorded;
    enqueue(s, [e, id] {
        e->t = std::chrono::steady_clock::now();
        e->reached = id;
    });
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(void* e) {
    LOCK;
    flush_event(static_cast<Event*>(e));
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(void* ev) {
    LOCK;
    auto* e = static_cast<Event*>(ev);
    return e->reached >= e->recorded ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    LOCK;
    flush_event(static_cast<Event*>(a));
    flush_event(static_cast<Event*>(b));
    *ms = std::chrono::duration<float, std::milli>(static_cast<Event*>(b)->t -
                                                   static_cast<Event*>(a)->t).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuGetErrorName(int e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(int e, const char** s) {
    *s = e == CUDA_SUCCESS ? "no error" : "error in the fake libcuda";
    return CUDA_SUCCESS;
}

}  // extern "C"
