// cuda_cpu_compat.h — run the CUDA C kernels of this folder on the CPU, unchanged.
//
// The kernels (*.cu) are compiled by g++ as C++17 with this header force-included first
// (see backends/cupy/cpu.py). It maps the CUDA built-ins the kernels use:
//
//   * qualifiers: __global__, __device__, __host__, __forceinline__, __restrict__ and
//     __launch_bounds__ vanish; __shared__ becomes `static`, so a __shared__ array is one
//     object shared by the threads of the block that is running. Blocks of a grid run one
//     after another (never two at once), so this is exactly block-shared memory.
//   * threadIdx / blockIdx are thread_local; blockDim / gridDim are per launch.
//   * one OS thread per CUDA thread (std::thread); __syncthreads() is a barrier over the
//     block's threads, __syncwarp() a barrier over the 32 threads of a warp.
//   * __shfl_xor_sync: each lane writes its value into its warp's exchange buffer, the warp
//     meets at a barrier, each lane reads its partner's slot, and the warp meets again
//     (so the buffer can be reused). All 32 lanes (or the partial last warp) must call it,
//     as on the GPU with a full mask.
//   * float intrinsics __fadd_rn & co. are the plain IEEE operations (the library is built
//     with -ffp-contract=off and without -ffast-math, so nothing is fused or reordered);
//     the fp16 conversions are bit-exact software versions of cvt.rn.f16.f32 / cvt.f32.f16.
//
// A barrier that is not reached by every thread (a divergent __syncthreads, which is a bug
// on the GPU as well) aborts the process with a message after MIXKVQ_CPU_BARRIER_TIMEOUT
// seconds (default 120) instead of hanging.
//
// Launches are serialised by a mutex. Launch entry point: cuda_cpu::launch(&kernel, grid,
// block, argv) with argv an array of pointers to the arguments (as cuLaunchKernel takes
// them); cuda_cpu::signature(&kernel) gives the argument type codes so the Python side can
// check its argument list against the real C++ signature.
#pragma once
#include "mixkvq_host.h"

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>


#define __global__
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;


namespace cuda_cpu {

// A reusable barrier (generation counting) that aborts on a timeout instead of hanging.
class Barrier {
public:
    explicit Barrier(unsigned n) : n_(n) {}
    void wait() {
        std::unique_lock<std::mutex> lock(m_);
        unsigned gen = gen_;
        if (++count_ == n_) {
            count_ = 0;
            ++gen_;
            cv_.notify_all();
            return;
        }
        if (!cv_.wait_for(lock, timeout(), [&] { return gen != gen_; })) {
            fprintf(stderr, "cuda_cpu_compat: a barrier timed out (%u of %u threads arrived): "
                            "divergent __syncthreads/__syncwarp/__shfl in a kernel\n", count_, n_);
            abort();
        }
    }
    static std::chrono::seconds timeout() {
        const char* s = getenv("MIXKVQ_CPU_BARRIER_TIMEOUT");
        return std::chrono::seconds(s ? atoi(s) : 120);
    }
private:
    std::mutex m_;
    std::condition_variable cv_;
    unsigned n_, count_ = 0, gen_ = 0;
};

struct LaunchState {
    std::unique_ptr<Barrier> block;
    std::vector<std::unique_ptr<Barrier>> warps;
    std::vector<unsigned long long> exchange;  // 32 slots per warp
};
inline LaunchState* g_state = nullptr;
inline thread_local unsigned t_linear = 0;  // linear thread index within the block

inline std::mutex& launch_mutex() { static std::mutex m; return m; }

template <class F>
void run_grid(dim3 grid, dim3 block, F&& body) {
    std::lock_guard<std::mutex> guard(launch_mutex());
    unsigned nthreads = block.x * block.y * block.z;
    unsigned nwarps = (nthreads + 31) / 32;
    LaunchState state;
    state.block.reset(new Barrier(nthreads));
    for (unsigned w = 0; w < nwarps; ++w) {
        unsigned lanes = (w + 1) * 32 <= nthreads ? 32 : nthreads - w * 32;
        state.warps.emplace_back(new Barrier(lanes));
    }
    state.exchange.assign((size_t)nwarps * 32, 0);
    g_state = &state;
    gridDim = grid;
    blockDim = block;
    auto worker = [&](unsigned tid) {
        t_linear = tid;
        threadIdx = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
        for (unsigned z = 0; z < grid.z; ++z)
            for (unsigned y = 0; y < grid.y; ++y)
                for (unsigned x = 0; x < grid.x; ++x) {
                    blockIdx = uint3{x, y, z};
                    body();
                    state.block->wait();  // the next block may reuse __shared__ memory
                }
    };
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) threads.emplace_back(worker, t);
    for (auto& t : threads) t.join();
    g_state = nullptr;
}

template <class... A, size_t... I>
void call_with(void (*k)(A...), void** argv, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(argv[I])...);
}

template <class... A>
void launch(void (*k)(A...), dim3 grid, dim3 block, void** argv) {
    run_grid(grid, block, [&] { call_with(k, argv, std::index_sequence_for<A...>{}); });
}

template <class T> constexpr char type_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) return 'p';
    else if constexpr (std::is_same_v<U, int>) return 'i';
    else if constexpr (std::is_same_v<U, unsigned int>) return 'I';
    else if constexpr (std::is_same_v<U, long long>) return 'q';
    else if constexpr (std::is_same_v<U, unsigned long long>) return 'Q';
    else if constexpr (std::is_same_v<U, float>) return 'f';
    else if constexpr (std::is_same_v<U, double>) return 'd';
    else return '?';
}

template <class... A>
const char* signature(void (*)(A...)) {
    static const char s[] = {type_code<A>()..., '\0'};
    return s;
}

}  // namespace cuda_cpu

inline void __syncthreads() { cuda_cpu::g_state->block->wait(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { cuda_cpu::g_state->warps[cuda_cpu::t_linear / 32]->wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    using namespace cuda_cpu;
    unsigned warp = t_linear / 32, lane = t_linear % 32;
    unsigned long long* buf = &g_state->exchange[(size_t)warp * 32];
    unsigned long long slot = 0;
    memcpy(&slot, &v, sizeof(T));
    buf[lane] = slot;
    g_state->warps[warp]->wait();
    slot = buf[lane ^ (unsigned)lane_mask];
    g_state->warps[warp]->wait();
    T out;
    memcpy(&out, &slot, sizeof(T));
    return out;
}
