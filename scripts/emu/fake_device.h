// scripts/emu/fake_device.h: the device behind the fake libcuda (fake_libcuda.cpp): streams that
// run their operations on worker threads, events, device memory from a stream-ordered pool, pinned
// host memory, and the checks that turn a host-code ordering bug into a failure instead of luck.
//
// Streams. Each stream has a worker thread that runs its queue in order, sleeping a random delay
// (seeded, printed once) before each operation, so copies and kernels run concurrently with the
// host and with the other streams, as on a GPU. A stream can instead be
//   eager: the host call returns only once the operation has run (FAKE_CUDA_EAGER_STREAM=k), or
//   lazy:  nothing runs until something waits for it (FAKE_CUDA_LAZY_STREAM=k): a stream or event
//          synchronisation, another stream's wait on its event, a blocking copy;
// where k counts the streams of each backend in creation order (1 compute, 2 copy, 3 download),
// or FAKE_CUDA_SCHEDULE=async|eager|lazy sets every stream. Eager against lazy gives the two
// extreme orders of a missing wait; async with delays gives the rest.
//
// Checks (a violation prints "fake libcuda: VIOLATION: ..." and makes every later call of the
// context fail with the error, as a real GPU fault does; FAKE_CUDA_ABORT=1 aborts instead):
// - an operation that touches device memory that is not allocated (never, or freed), checked
//   when it runs: CUDA_ERROR_ILLEGAL_ADDRESS;
// - device memory freed (cuMemFreeAsync, when the free runs) while an operation of another stream
//   that uses it has not finished: the freeing stream was not ordered after it;
// - pinned host memory freed while a copy from or to it is queued or running, or rewritten between
//   the queueing of a copy from it and the copy (compared by hash): CUDA_ERROR_UNKNOWN.
// Freed device memory is poisoned with 0xFF bytes (NaN in every float type) and handed out again
// by later allocations, as a memory pool does; fresh allocations hold 0xCD.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

typedef int CUresult;
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_NOT_PERMITTED = 800,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

namespace fake {

inline int env_int(const char* name, int dflt) {
    const char* v = std::getenv(name);
    return v && *v ? std::atoi(v) : dflt;
}

// One lock for the whole fake device; never destroyed, so that worker threads still blocked on it
// when the process exits are harmless.
inline std::mutex& mu() { static auto* m = new std::mutex; return *m; }
inline std::condition_variable& cv() { static auto* c = new std::condition_variable; return *c; }
using Lock = std::unique_lock<std::mutex>;

// ------------------------------------------------------------------------------------------------
// violations

inline int g_sticky = 0;          // the error every later call returns (0: none)
inline int g_violations = 0;

inline void violation(int code, const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ++g_violations;
    std::fprintf(stderr, "fake libcuda: VIOLATION: %s\n", msg);
    if (env_int("FAKE_CUDA_ABORT", 0)) std::abort();
    if (!g_sticky) g_sticky = code;
}

// ------------------------------------------------------------------------------------------------
// memory

struct Range {
    uintptr_t at;
    size_t len;
    bool overlaps(uintptr_t a, size_t n) const { return at < a + n && a < at + len; }
};

struct Block {
    size_t cap = 0;   // bytes behind the pointer
    size_t size = 0;  // bytes of the current allocation
    bool live = false;
};

inline std::map<uintptr_t, Block> g_blocks;      // every device block, live or in the pool
inline std::map<uintptr_t, size_t> g_pinned;     // cuMemHostAlloc blocks: start -> bytes
struct Registered {
    size_t bytes;
    bool read_only;
};
inline std::map<uintptr_t, Registered> g_registered;  // cuMemHostRegister ranges
inline size_t g_allocated = 0;                   // bytes of live device allocations
inline size_t g_pooled = 0;                      // bytes of freed blocks kept for reuse
constexpr size_t TOTAL = size_t(16) << 30;       // the fake GPU's memory
constexpr size_t POOL_KEEP = size_t(1) << 30;    // freed bytes kept for reuse at most

// The live allocation holding all of [at, at + n), or null.
inline Block* live_block(uintptr_t at, size_t n) {
    auto it = g_blocks.upper_bound(at);
    if (it == g_blocks.begin()) return nullptr;
    --it;
    Block& b = it->second;
    if (!b.live || at + n > it->first + b.size) return nullptr;
    return &b;
}

// The cuMemHostRegister range holding all of [p, p + n), or null.
inline const Registered* registered(const void* p, size_t n) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = g_registered.upper_bound(a);
    if (it == g_registered.begin()) return nullptr;
    --it;
    return a >= it->first && a + n <= it->first + it->second.bytes ? &it->second : nullptr;
}

// Page-locked: allocated by cuMemHostAlloc or registered by cuMemHostRegister.
inline bool is_pinned(const void* p, size_t n) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = g_pinned.upper_bound(a);
    if (it != g_pinned.begin()) {
        --it;
        if (a >= it->first && a + n <= it->first + it->second) return true;
    }
    return registered(p, n) != nullptr;
}

// Whether [a, a + n) overlaps any page-locked memory (allocated or registered).
inline bool overlaps_pinned(uintptr_t a, size_t n) {
    for (const auto& [at, len] : g_pinned)
        if (a < at + len && at < a + n) return true;
    for (const auto& [at, r] : g_registered)
        if (a < at + r.bytes && at < a + n) return true;
    return false;
}

// A device allocation: a pooled block that fits (poisoned by its free), else fresh memory.
inline uintptr_t device_alloc(size_t bytes) {
    const size_t need = bytes ? bytes : 1;
    for (auto& [at, b] : g_blocks) {
        if (!b.live && b.cap >= need && b.cap <= 2 * need + (1 << 20)) {
            b.live = true;
            b.size = need;
            g_pooled -= b.cap;
            g_allocated += need;
            return at;
        }
    }
    const size_t cap = (need + 255) / 256 * 256;
    void* m = std::aligned_alloc(256, cap);
    if (!m) return 0;
    std::memset(m, 0xCD, cap);  // uninitialised device memory is not zero
    uintptr_t at = reinterpret_cast<uintptr_t>(m);
    g_blocks[at] = Block{cap, need, true};
    g_allocated += need;
    return at;
}

// Frees a live block into the pool, poisoned; the pool returns its oldest bytes to the host when
// it holds more than POOL_KEEP.
inline void device_free(uintptr_t at) {
    Block& b = g_blocks.at(at);
    b.live = false;
    g_allocated -= b.size;
    std::memset(reinterpret_cast<void*>(at), 0xFF, b.cap);
    g_pooled += b.cap;
    for (auto it = g_blocks.begin(); g_pooled > POOL_KEEP && it != g_blocks.end();) {
        if (!it->second.live && it->first != at) {
            g_pooled -= it->second.cap;
            std::free(reinterpret_cast<void*>(it->first));
            it = g_blocks.erase(it);
        } else {
            ++it;
        }
    }
}

inline uint64_t hash_bytes(const void* p, size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, c + i, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 29;
    }
    for (; i < n; ++i) h = (h ^ c[i]) * 0x100000001b3ull;
    return h;
}

// ------------------------------------------------------------------------------------------------
// streams and events

enum Mode { ASYNC, EAGER, LAZY };
enum Kind { WORK, RECORD, WAIT, FREE };

struct Stream;

struct Event {
    Stream* stream = nullptr;  // where it was last recorded
    uint64_t recorded = 0;     // records made
    uint64_t reached = 0;      // the latest record that has run
    uint64_t record_seq = 0;   // the operation of `stream` that makes the latest record
    std::chrono::steady_clock::time_point t;
};

struct Op {
    uint64_t seq = 0;           // position in its stream, from 1
    Kind kind = WORK;
    std::string what;           // for messages: "cuMemcpyHtoDAsync of 4096 bytes"
    std::vector<Range> dev;     // device memory it reads or writes
    std::vector<Range> host;    // pinned host memory it reads or writes
    std::function<void()> run;  // WORK: runs without the lock
    bool kernel = false;
    // a copy from pinned memory: the source's hash when queued
    const void* src = nullptr;
    size_t src_len = 0;
    uint64_t src_hash = 0;
    // RECORD / WAIT
    Event* event = nullptr;
    uint64_t id = 0;
    Stream* on = nullptr;       // WAIT: the event's stream
    uint64_t on_seq = 0;        // WAIT: its operation that records it
    uintptr_t block = 0;        // FREE
};

struct Stream {
    int index = 0;  // 1 compute, 2 copy, 3 download (creation order, per backend)
    Mode mode = ASYNC;
    std::deque<Op> q;
    const Op* running = nullptr;
    uint64_t enqueued = 0, completed = 0, released = 0;
    uint64_t last_launch = 0;  // the latest kernel's operation
    uint64_t host_waited = 0;  // the host has waited for every operation up to this one
    bool stop = false;
    std::mt19937_64 rng;
    std::thread worker;
};

inline std::vector<Stream*> g_streams;  // every stream ever created (never freed: events point here)
inline uint64_t g_seed = 0;
inline int g_delay_us = 0;
inline std::mutex& kernel_mu() { static auto* m = new std::mutex; return *m; }

// Lets a lazy stream run up to operation `seq` (no effect on the others).
inline void release(Stream* s, uint64_t seq) {
    if (s->released < seq) {
        s->released = seq;
        cv().notify_all();
    }
}

inline void wait_done(Lock& lk, Stream* s, uint64_t seq) {
    release(s, seq);
    cv().wait(lk, [&] { return s->completed >= seq; });
}

// The host waits for stream s up to operation seq (a synchronisation the host code asked for).
inline void host_wait(Lock& lk, Stream* s, uint64_t seq) {
    wait_done(lk, s, seq);
    if (s->host_waited < seq) s->host_waited = seq;
}

// The operations on other streams than `self` that have not finished and use [at, at + n) of
// device memory (dev) or pinned host memory (!dev): the first one, for the message.
inline const Op* in_flight(const Stream* self, uintptr_t at, size_t n, bool dev, const Stream** where) {
    for (const Stream* s : g_streams) {
        if (s == self) continue;
        auto uses = [&](const Op& op) {
            for (const Range& r : dev ? op.dev : op.host)
                if (r.overlaps(at, n)) return true;
            return false;
        };
        if (s->running && uses(*s->running)) { *where = s; return s->running; }
        for (const Op& op : s->q)
            if (uses(op)) { *where = s; return &op; }
    }
    return nullptr;
}

// Runs the checks of an operation about to run (with the lock): false when it must not run.
inline bool check_before(Stream* s, const Op& op) {
    for (const Range& r : op.dev) {
        if (!live_block(r.at, r.len)) {
            violation(CUDA_ERROR_ILLEGAL_ADDRESS,
                      "%s on stream %d touches device memory %#lx..%#lx that is not allocated "
                      "(freed before the operation ran, or never allocated)",
                      op.what.c_str(), s->index, (unsigned long)r.at, (unsigned long)(r.at + r.len));
            return false;
        }
    }
    if (op.kind == FREE) {
        const Block& b = g_blocks.at(op.block);
        const Stream* other = nullptr;
        if (const Op* o = in_flight(s, op.block, b.cap, true, &other)) {
            violation(CUDA_ERROR_ILLEGAL_ADDRESS,
                      "cuMemFreeAsync on stream %d freed %zu bytes at %#lx while %s on stream %d, "
                      "which uses them, had not finished: the freeing stream must be ordered after "
                      "every stream that uses the memory",
                      s->index, b.size, (unsigned long)op.block, o->what.c_str(), other->index);
        }
    }
    return true;
}

inline void worker_loop(Stream* s) {
    Lock lk(mu());
    for (;;) {
        cv().wait(lk, [&] {
            return (s->stop && s->q.empty()) ||
                   (!s->q.empty() && (s->mode != LAZY || s->q.front().seq <= s->released));
        });
        if (s->q.empty()) return;
        Op op = std::move(s->q.front());
        s->q.pop_front();
        s->running = &op;
        if (op.kind == WAIT) {  // the event's stream runs up to its record first
            release(op.on, op.on_seq);
            cv().wait(lk, [&] { return op.event->reached >= op.id; });
        } else {
            const int us = g_delay_us > 0 ? (int)(s->rng() % (uint64_t)(g_delay_us + 1)) : 0;
            if (us > 0) {
                lk.unlock();
                std::this_thread::sleep_for(std::chrono::microseconds(us));
                lk.lock();
            }
            if (check_before(s, op)) {
                if (op.kind == RECORD) {
                    op.event->t = std::chrono::steady_clock::now();
                    if (op.event->reached < op.id) op.event->reached = op.id;
                } else if (op.kind == FREE) {
                    device_free(op.block);
                } else {
                    lk.unlock();
                    if (op.src && hash_bytes(op.src, op.src_len) != op.src_hash) {
                        lk.lock();
                        violation(CUDA_ERROR_UNKNOWN,
                                  "pinned host memory at %p (%zu bytes) was rewritten while %s on "
                                  "stream %d, which reads it, was in flight: the copy took the new "
                                  "bytes",
                                  op.src, op.src_len, op.what.c_str(), s->index);
                        lk.unlock();
                    }
                    if (op.kernel) {
                        std::lock_guard<std::mutex> k(kernel_mu());  // kernels share `static`s
                        op.run();
                    } else {
                        op.run();
                    }
                    lk.lock();
                }
            }
        }
        s->running = nullptr;
        s->completed = op.seq;
        cv().notify_all();
    }
}

inline Stream* new_stream(int index, Mode mode) {
    auto* s = new Stream;
    s->index = index;
    s->mode = mode;
    s->rng.seed(g_seed ^ (0x9E3779B97F4A7C15ull * (g_streams.size() + 1)));
    g_streams.push_back(s);
    s->worker = std::thread(worker_loop, s);
    return s;
}

// Queues op on s; an eager stream runs it before this returns. Returns its sequence number.
inline uint64_t enqueue(Lock& lk, Stream* s, Op op) {
    if (s->stop) violation(CUDA_ERROR_INVALID_HANDLE, "%s queued on a destroyed stream", op.what.c_str());
    op.seq = ++s->enqueued;
    const uint64_t seq = op.seq;
    if (op.kind == WORK && op.kernel) s->last_launch = seq;
    s->q.push_back(std::move(op));
    cv().notify_all();
    if (s->mode == EAGER) wait_done(lk, s, seq);
    return seq;
}

// cuStreamDestroy: returns at once; the queued work still runs (a lazy stream's only when
// something waits for it), then the worker ends.
inline void stop_stream(Stream* s) {
    s->stop = true;
    cv().notify_all();
    s->worker.detach();
}

}  // namespace fake
