// A fake libcuda.so for checking the CUDA backend's host code without a GPU: the driver calls
// that cudarc makes (context, stream, memory, copies, events, module and kernel launch) over host
// memory, and cuLaunchKernel running the real kernels/*.cu under kernels/emu/cuda_emu.h (one OS
// thread per CUDA thread, blocks one after another). Device pointers are host addresses; every
// call is synchronous. It checks argument order and types, buffer sizes and offsets, launch
// sequences and the decoding of results, not GPU memory ordering or speed.
//
// Built and used by scripts/emu-gpu-tests.sh. The fatbin handed to cuModuleLoadData is ignored:
// kernels are looked up by name among the ones compiled into this library.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>

#include "score.cu"
#include "select.cu"
#include "fuse.cu"

typedef int CUresult;  // CUDA_SUCCESS = 0
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_NOT_FOUND = 500,
};

namespace {

// A kernel's parameters arrive as void** (each entry points at the argument's bytes).
template <class T> T arg(void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
template <class... P, size_t... I>
void invoke_impl(void (*k)(P...), unsigned g, unsigned b, void** params, std::index_sequence<I...>) {
    launch(g, b, k, arg<P>(params[I])...);
}
template <class... P> void invoke(void (*k)(P...), unsigned g, unsigned b, void** params) {
    invoke_impl(k, g, b, params, std::index_sequence_for<P...>{});
}

struct Function {
    void (*run)(unsigned grid, unsigned block, void** params);
};

#define KERNEL(name) {#name, Function{[](unsigned g, unsigned b, void** p) { invoke(name, g, b, p); }}}
const std::map<std::string, Function>& kernels() {
    static const std::map<std::string, Function> k = {
        KERNEL(score_keys),       KERNEL(keys_normalize),   KERNEL(score_sum),
        KERNEL(score_mean),       KERNEL(select_init),      KERNEL(select_filter),
        KERNEL(select_pick),      KERNEL(select_tie_count), KERNEL(select_tie_cutoff),
        KERNEL(select_mask),      KERNEL(dare_mask),        KERNEL(fuse_linear),
        KERNEL(fuse_ties),
    };
    return k;
}

struct Event {
    std::chrono::steady_clock::time_point t;
};

int g_ctx_token;
thread_local void* g_current = nullptr;
size_t g_allocated = 0;
std::map<uint64_t, size_t> g_sizes;

int env_int(const char* name, int dflt) {
    const char* v = std::getenv(name);
    return v ? std::atoi(v) : dflt;
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

CUresult cuStreamCreate(void** s, unsigned) { *s = new int(0); return CUDA_SUCCESS; }
CUresult cuStreamDestroy_v2(void* s) { delete static_cast<int*>(s); return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(void*) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }

CUresult cuMemAlloc_v2(uint64_t* p, size_t bytes) {
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
    auto it = g_sizes.find(p);
    if (it == g_sizes.end()) return CUDA_ERROR_INVALID_VALUE;
    g_allocated -= it->second;
    g_sizes.erase(it);
    std::free(reinterpret_cast<void*>(p));
    return CUDA_SUCCESS;
}
CUresult cuMemFreeAsync(uint64_t p, void*) { return cuMemFree_v2(p); }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *total = size_t(16) << 30;
    *free_b = *total - g_allocated;
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t n, void*) {
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t n, void*) {
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void*) {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(uint64_t dst, unsigned char v, size_t n, void*) {
    std::memset(reinterpret_cast<void*>(dst), v, n);
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
                        unsigned bz, unsigned smem, void*, void** params, void**) {
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || smem != 0 || gx == 0 || bx == 0 || bx > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    if (std::getenv("FAKE_CUDA_TRACE")) {
        for (auto& [name, fn] : kernels())
            if (&fn == f) std::fprintf(stderr, "launch %s<<<%u, %u>>>\n", name.c_str(), gx, bx);
    }
    static_cast<Function*>(f)->run(gx, bx, params);
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(void** e, unsigned) { *e = new Event{}; return CUDA_SUCCESS; }
CUresult cuEventDestroy_v2(void* e) { delete static_cast<Event*>(e); return CUDA_SUCCESS; }
CUresult cuEventRecord(void* e, void*) {
    static_cast<Event*>(e)->t = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(void*) { return CUDA_SUCCESS; }
CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
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
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(int e, const char** s) {
    *s = e == CUDA_SUCCESS ? "no error" : "error in the fake libcuda";
    return CUDA_SUCCESS;
}

}  // extern "C"
