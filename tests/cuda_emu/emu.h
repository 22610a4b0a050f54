// A small CPU emulator of the CUDA execution model, for testing worker/kernels/*.cu
// on a machine without a GPU. It is a test tool, not a CUDA implementation: it knows
// exactly what those kernels use and nothing more.
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; the blocks of a
// grid run one after another. __syncthreads() and the warp shuffles are barriers: a
// fiber that reaches one yields, and the scheduler releases a barrier only when every
// thread it concerns has reached it (all live threads of the block for __syncthreads;
// all 32 lanes of the warp for a shuffle). A shuffle that a lane can never join (it
// exited, or waits at __syncthreads) is a deadlock of the real GPU too: reported as an
// error, not hung. __shared__ is a static local: shared by the threads of a block, and
// blocks do not overlap. Kernel arguments arrive as CUDA's launch API gets them (an
// array of pointers to the values); each one's type code is checked against the
// kernel's parameter type, so a float passed where the kernel reads a double is an
// error here, where on a GPU it would be silent garbage.
#pragma once
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

struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };

namespace emu {
enum State { RUN = 0, AT_BLOCK = 1, AT_WARP = 2, DONE = 3 };
struct Fiber {
    ucontext_t ctx;
    State state = RUN;
    emu_dim3 tid;
    int linear = 0;
};
inline emu_dim3 g_blockIdx, g_blockDim, g_gridDim;
inline std::vector<Fiber> g_fibers;
inline std::vector<std::vector<char>> g_stacks;
inline Fiber* g_cur = nullptr;
inline ucontext_t g_sched;
inline unsigned long long g_slots[32][32];          // [warp][lane]: shuffle exchange
inline std::function<void()> g_body;
inline char g_error[512] = "";

inline void yield_to_scheduler() { swapcontext(&g_cur->ctx, &g_sched); }

template <class V> V shuffle(V v, int src_lane) {
    static_assert(sizeof(V) <= 8, "shuffle of a type wider than 8 bytes");
    const int lane = g_cur->linear & 31, warp = g_cur->linear >> 5;
    std::memcpy(&g_slots[warp][lane], &v, sizeof(V));
    g_cur->state = AT_WARP;
    yield_to_scheduler();
    V r;
    std::memcpy(&r, &g_slots[warp][src_lane & 31], sizeof(V));
    g_cur->state = AT_WARP;                          // nobody writes a slot before all read
    yield_to_scheduler();
    return r;
}

inline void entry() {
    g_body();
    g_cur->state = DONE;
    swapcontext(&g_cur->ctx, &g_sched);
}

// Runs one block to the end; false (with g_error set) on a deadlock.
inline bool run_block() {
    const int n = (int)g_fibers.size();
    for (int i = 0; i < n; i++) {
        Fiber& f = g_fibers[i];
        f.state = RUN;
        f.linear = i;
        f.tid.x = i % g_blockDim.x;
        f.tid.y = (i / g_blockDim.x) % g_blockDim.y;
        f.tid.z = i / (g_blockDim.x * g_blockDim.y);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = g_stacks[i].data();
        f.ctx.uc_stack.ss_size = g_stacks[i].size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, entry, 0);
    }
    for (;;) {
        for (int i = 0; i < n; i++) {
            if (g_fibers[i].state != RUN) continue;
            g_cur = &g_fibers[i];
            swapcontext(&g_sched, &g_cur->ctx);
        }
        int done = 0, at_block = 0;
        bool released = false;
        for (int w = 0; w * 32 < n; w++) {            // warps whose every lane is at a shuffle
            const int lo = w * 32, hi = std::min(n, lo + 32);
            int at_warp = 0;
            for (int i = lo; i < hi; i++) at_warp += g_fibers[i].state == AT_WARP;
            if (at_warp == hi - lo) {
                for (int i = lo; i < hi; i++) g_fibers[i].state = RUN;
                released = true;
            } else if (at_warp > 0) {
                for (int i = lo; i < hi; i++)
                    if (g_fibers[i].state != AT_WARP && g_fibers[i].state != RUN) {
                        std::snprintf(g_error, sizeof g_error,
                                      "block (%u,%u,%u) warp %d: lane %d is at a shuffle while "
                                      "lane %d has %s", g_blockIdx.x, g_blockIdx.y, g_blockIdx.z,
                                      w, lo, i, g_fibers[i].state == DONE ? "exited"
                                                                          : "reached __syncthreads");
                        return false;
                    }
            }
        }
        if (released) continue;
        for (int i = 0; i < n; i++) {
            done += g_fibers[i].state == DONE;
            at_block += g_fibers[i].state == AT_BLOCK;
        }
        if (done == n) return true;
        if (at_block + done == n) {                   // exited threads count as arrived
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
int launch(void (*k)(P...), const unsigned* grid, const unsigned* block, void** args,
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
    if (n == 0 || n > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 ||
        grid[1] > 65535 || grid[2] > 65535) {
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

inline void __syncthreads() {
    emu::g_cur->state = emu::AT_BLOCK;
    emu::yield_to_scheduler();
}
inline float __int_as_float(unsigned bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline double __longlong_as_double(long long bits) { double d; std::memcpy(&d, &bits, 8); return d; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <class V> V __shfl_xor_sync(unsigned, V v, int lane_mask) {
    return emu::shuffle(v, (emu::g_cur->linear & 31) ^ lane_mask);
}
template <class V> V __shfl_sync(unsigned, V v, int src_lane) { return emu::shuffle(v, src_lane); }

extern "C" const char* emu_error() { return emu::g_error; }
