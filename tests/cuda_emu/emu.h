// A small CPU emulator of the CUDA execution model, for testing worker/kernels/*.cu
// on a machine without a GPU. It is a test tool, not a CUDA implementation: it knows
// exactly what those kernels use and nothing more.
//
// Each CUDA thread of a block is a fiber on one OS thread (started with makecontext,
// switched with _setjmp/_longjmp: no system call per switch); the blocks of a grid run
// one after another. __syncthreads() and the warp shuffles are barriers: a fiber that
// reaches one yields, and the scheduler releases a barrier only when every thread it
// concerns has reached it (all live threads of the block for __syncthreads; every lane
// named in the mask for a shuffle, all with the same mask). A lane that calls a shuffle
// whose mask leaves it out, reads a lane outside the mask, or waits for a lane that
// exited or waits at __syncthreads is an error (undefined or a deadlock on a GPU), not
// a hang. The fibers of a block run in the order set by emu_set_order (forward,
// reverse, or a seeded shuffle redrawn at every round).
//
// __shared__ is a static local, registered with the race checker (racecheck.cpp) when
// its declaration runs (the build adds EMU_SHARED after each one). The kernel code is
// compiled with GCC's -fsanitize=thread instrumentation, whose __tsan_* hooks are
// racecheck.cpp's own (no ThreadSanitizer runtime): every load and store of a kernel
// goes through the checker, which keeps the shared and global accesses of each barrier
// interval and each launch and reports two threads (or blocks) touching one address,
// one of them writing. The emulator's own functions here are not instrumented.
//
// Kernel arguments arrive as CUDA's launch API gets them (an array of pointers to the
// values); each one's type code is checked against the kernel's parameter type, so a
// float passed where the kernel reads a double is an error here, where on a GPU it
// would be silent garbage.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

using std::exp;
using std::log;
using std::max;
using std::min;
using std::sqrt;
using std::tanh;

#define EMU_NOTRACK __attribute__((no_sanitize_thread, noinline))

struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };

extern "C" {                               // the race checker (racecheck.cpp)
void emu_rc_shared(const void* p, unsigned long n, const char* name);
void emu_rc_block(unsigned bx, unsigned by, unsigned bz, unsigned dx, unsigned dy, unsigned gx,
                  unsigned gy);
void emu_rc_interval();
void emu_rc_thread(int linear);
int emu_rc_failed();
const char* emu_rc_report();
}

namespace emu {
enum State { RUN = 0, AT_BLOCK = 1, AT_WARP = 2, DONE = 3, FAILED = 4 };
struct Fiber {
    jmp_buf jb;
    ucontext_t start;
    bool started = false;
    State state = RUN;
    emu_dim3 tid;
    int linear = 0;
    unsigned mask = 0;                     // the mask of the shuffle it waits at
    unsigned shuffles = 0;                 // shuffles done: selects the exchange bank
};
inline emu_dim3 g_blockIdx, g_blockDim, g_gridDim;
inline std::vector<Fiber> g_fibers;
inline std::vector<std::vector<char>> g_stacks;
inline std::vector<int> g_order;
inline int g_order_mode = 0;               // 0 forward, 1 reverse, 2 shuffled
inline unsigned long long g_seed = 1;
inline Fiber* g_cur = nullptr;
inline jmp_buf g_sched;
inline unsigned long long g_slots[2][32][32];    // [bank][warp][lane]: shuffle exchange
inline std::function<void()> g_body;
inline char g_error[2048] = "";

EMU_NOTRACK inline void yield_to_scheduler() {
    if (!_setjmp(g_cur->jb)) _longjmp(g_sched, 1);
}

EMU_NOTRACK inline void fail(const char* msg) {
    std::snprintf(g_error, sizeof g_error, "block (%u,%u,%u) thread %d: %s", g_blockIdx.x,
                  g_blockIdx.y, g_blockIdx.z, g_cur->linear, msg);
    g_cur->state = FAILED;
    for (;;) yield_to_scheduler();                // never resumed
}

template <class V> EMU_NOTRACK V shuffle(unsigned mask, V v, int src_lane) {
    static_assert(sizeof(V) <= 8, "shuffle of a type wider than 8 bytes");
    const int lane = g_cur->linear & 31, warp = g_cur->linear >> 5;
    char msg[160];
    if (!((mask >> lane) & 1u)) {
        std::snprintf(msg, sizeof msg, "lane %d calls a shuffle whose mask 0x%08x leaves it out",
                      lane, mask);
        fail(msg);
    }
    src_lane &= 31;
    if (!((mask >> src_lane) & 1u)) {
        std::snprintf(msg, sizeof msg, "lane %d reads lane %d, outside the shuffle's mask 0x%08x",
                      lane, src_lane, mask);
        fail(msg);
    }
    const unsigned bank = g_cur->shuffles++ & 1u;  // two banks: a lane may write the next
    std::memcpy(&g_slots[bank][warp][lane], &v, sizeof(V));   // while others still read
    g_cur->mask = mask;
    g_cur->state = AT_WARP;
    yield_to_scheduler();
    V r;
    std::memcpy(&r, &g_slots[bank][warp][src_lane], sizeof(V));
    return r;
}

EMU_NOTRACK inline void entry() {
    g_body();
    g_cur->state = DONE;
    _longjmp(g_sched, 1);
}

EMU_NOTRACK inline void resume(int i) {
    g_cur = &g_fibers[i];
    emu_rc_thread(i);
    if (!_setjmp(g_sched)) {
        if (!g_cur->started) {
            g_cur->started = true;
            setcontext(&g_cur->start);
        }
        _longjmp(g_cur->jb, 1);
    }
    emu_rc_thread(-1);
}

EMU_NOTRACK inline void draw_order(int n) {
    g_order.resize(n);
    for (int i = 0; i < n; i++) g_order[i] = g_order_mode == 1 ? n - 1 - i : i;
    if (g_order_mode == 2)
        for (int i = n - 1; i > 0; i--) {             // Fisher-Yates, xorshift64
            g_seed ^= g_seed << 13, g_seed ^= g_seed >> 7, g_seed ^= g_seed << 17;
            std::swap(g_order[i], g_order[g_seed % (i + 1)]);
        }
}

// Releases the shuffle groups whose every lane has arrived; false (g_error set) when a
// group waits for a lane that can never join. One pass over each warp's lanes per group.
EMU_NOTRACK inline bool release_group(int n, int lo, unsigned mask, int first, bool* released) {
    bool complete = true;
    for (int l = 0; l < 32; l++) {
        if (!((mask >> l) & 1u)) continue;
        const int j = lo + l;
        const char* why = nullptr;
        if (j >= n) why = "does not exist (the block is not a multiple of 32)";
        else if (g_fibers[j].state == DONE) why = "has exited";
        else if (g_fibers[j].state == AT_BLOCK) why = "waits at __syncthreads";
        else if (g_fibers[j].state == AT_WARP && g_fibers[j].mask != mask)
            why = "waits at a shuffle with another mask";
        if (why) {
            std::snprintf(g_error, sizeof g_error,
                          "block (%u,%u,%u) warp %d: lane %d is at a shuffle (mask 0x%08x) while "
                          "lane %d %s", g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, lo >> 5, first,
                          mask, l, why);
            return false;
        }
        complete &= g_fibers[j].state == AT_WARP;
    }
    if (complete) {
        for (int l = 0; l < 32; l++)
            if ((mask >> l) & 1u) g_fibers[lo + l].state = RUN;
        *released = true;
    }
    return true;
}

EMU_NOTRACK inline bool release_shuffles(int n, bool* released) {
    for (int lo = 0; lo < n; lo += 32) {
        unsigned handled = 0;
        for (int l = 0; l < 32 && lo + l < n; l++) {
            const Fiber& f = g_fibers[lo + l];
            if (f.state != AT_WARP || ((handled >> l) & 1u)) continue;
            handled |= f.mask;
            if (!release_group(n, lo, f.mask, l, released)) return false;
        }
    }
    return true;
}

// Runs one block to the end; false (with g_error set) on a deadlock, an invalid
// shuffle or a race.
EMU_NOTRACK inline bool run_block() {
    const int n = (int)g_fibers.size();
    emu_rc_block(g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, g_blockDim.x, g_blockDim.y,
                 g_gridDim.x, g_gridDim.y);
    for (int i = 0; i < n; i++) {
        Fiber& f = g_fibers[i];
        f.state = RUN;
        f.started = false;
        f.shuffles = 0;
        f.linear = i;
        f.tid.x = i % g_blockDim.x;
        f.tid.y = (i / g_blockDim.x) % g_blockDim.y;
        f.tid.z = i / (g_blockDim.x * g_blockDim.y);
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = g_stacks[i].data();
        f.start.uc_stack.ss_size = g_stacks[i].size();
        f.start.uc_link = nullptr;
        makecontext(&f.start, entry, 0);
    }
    for (;;) {
        draw_order(n);
        for (int k = 0; k < n; k++) {
            const int i = g_order[k];
            if (g_fibers[i].state != RUN) continue;
            resume(i);
            if (g_fibers[i].state == FAILED) return false;
        }
        if (emu_rc_failed()) {
            std::snprintf(g_error, sizeof g_error, "%s", emu_rc_report());
            return false;
        }
        bool released = false;
        if (!release_shuffles(n, &released)) return false;
        if (released) continue;
        int done = 0, at_block = 0;
        for (int i = 0; i < n; i++) {
            done += g_fibers[i].state == DONE;
            at_block += g_fibers[i].state == AT_BLOCK;
        }
        if (done == n) return true;
        if (at_block + done == n) {                   // exited threads count as arrived
            emu_rc_interval();
            for (int i = 0; i < n; i++)
                if (g_fibers[i].state == AT_BLOCK) g_fibers[i].state = RUN;
            continue;
        }
        std::snprintf(g_error, sizeof g_error, "block (%u,%u,%u): deadlock", g_blockIdx.x,
                      g_blockIdx.y, g_blockIdx.z);
        return false;
    }
}

template <class P> constexpr char code() {
    if constexpr (std::is_pointer_v<P>) return 'p';
    else if constexpr (std::is_same_v<P, float>) return 'f';
    else if constexpr (std::is_same_v<P, double>) return 'd';
    else if constexpr (std::is_same_v<P, int>) return 'i';
    else if constexpr (std::is_same_v<P, long long>) return 'q';
    else return '?';
}

template <typename... P, size_t... I>
void call(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <typename... P>
EMU_NOTRACK int launch(void (*k)(P...), const unsigned* grid, const unsigned* block, void** args,
                       const char* codes, int nargs) {
    const char expect[] = {code<P>()..., '\0'};
    if (nargs != (int)sizeof...(P) || std::strncmp(expect, codes, sizeof...(P)) != 0) {
        std::snprintf(g_error, sizeof g_error, "argument types: kernel takes '%s', got '%.*s'",
                      expect, nargs, codes);
        return 1;
    }
    g_gridDim = {grid[0], grid[1], grid[2]};
    g_blockDim = {block[0], block[1], block[2]};
    const unsigned n = block[0] * block[1] * block[2];
    if (n == 0 || n > 1024 || block[2] > 64 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 ||
        grid[0] > 2147483647u || grid[1] > 65535 || grid[2] > 65535) {
        std::snprintf(g_error, sizeof g_error, "invalid launch: grid (%u,%u,%u) block (%u,%u,%u)",
                      grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        return 1;
    }
    g_fibers.assign(n, Fiber());
    g_stacks.resize(n);
    for (auto& s : g_stacks) s.resize(64 * 1024);
    g_body = [&] { call(k, args, std::index_sequence_for<P...>{}); };
    for (unsigned z = 0; z < grid[2]; z++)
        for (unsigned y = 0; y < grid[1]; y++)
            for (unsigned x = 0; x < grid[0]; x++) {
                g_blockIdx = {x, y, z};
                if (!run_block()) return 1;
            }
    return 0;
}
}  // namespace emu

#define threadIdx (emu::g_cur->tid)
#define blockIdx (emu::g_blockIdx)
#define blockDim (emu::g_blockDim)
#define gridDim (emu::g_gridDim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define EMU_SHARED(x) emu_rc_shared(&(x), sizeof(x), #x)

EMU_NOTRACK inline void __syncthreads() {
    emu::g_cur->state = emu::AT_BLOCK;
    emu::yield_to_scheduler();
}
inline float __int_as_float(unsigned bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline double __longlong_as_double(long long bits) { double d; std::memcpy(&d, &bits, 8); return d; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <class V> V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
    return emu::shuffle(mask, v, (emu::g_cur->linear & 31) ^ lane_mask);
}
template <class V> V __shfl_sync(unsigned mask, V v, int src_lane) {
    return emu::shuffle(mask, v, src_lane);
}

extern "C" const char* emu_error() { return emu::g_error; }
extern "C" void emu_set_order(int mode, unsigned long long seed) {
    emu::g_order_mode = mode;
    emu::g_seed = seed ? seed : 1;
}
