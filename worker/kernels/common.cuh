// Helpers shared by every kernel family of worker/kernels/: the accumulation type,
// warp and block reductions, and a deterministic column sum.
//
// The loader (worker/kernels/loader.py) pastes this text in front of each .cu file
// before compiling it with NVRTC, so the kernels need no include path and CuPy's
// compile cache keys on the full text (an edit here recompiles every family).
// Nothing here includes a CUDA header: NVRTC compiles it without a toolkit.
//
// Conventions (those of worker/layers.py): row-major C-contiguous arrays, 64-bit
// element offsets (B*T*V passes 2^31 quickly), every reduction in a fixed order so
// that a kernel gives the same bits run after run (no atomics anywhere).

// Accumulation type: float for float, double for double. A half type added later
// (phase 2: bf16/fp16) specialises this to float, and the kernels need no change.
template <typename T> struct Acc { typedef T type; };

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
    // butterfly: every lane ends with the same sum, added in the same order
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        A other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other > v ? other : v;
    }
    return v;
}

// Sum (or max) over the whole block; every thread gets the result. blockDim.x must be
// a multiple of 32 (at most 1024) and every thread of the block must call it.
// ``scratch`` is __shared__ A[32]; it may be reused by the next call.
template <typename A> __device__ A block_sum(A v, A* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();                       // the previous call's readers are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < n_warps ? scratch[lane] : A(0);
        v = warp_sum(v);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

template <typename A> __device__ A block_max(A v, A* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < n_warps ? scratch[lane] : neg_inf<A>();
        v = warp_max(v);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}

// Column sums of an (N, C) matrix, deterministic, in two launches:
//   column_partial_sums: grid (ceil(C/32), K), block (32, 8): chunk k of the rows
//     [k*rows_per_chunk, (k+1)*rows_per_chunk) is summed into partial[k, c];
//   column_accumulate: dst[c] += sum over k of partial[k, c], k in order.
// Used for the bias gradient (sum of dout over rows) and by LayerNorm's dw, db.
template <typename T>
__global__ void column_partial_sums(typename Acc<T>::type* partial, const T* x,
                                    long long N, int C, long long rows_per_chunk) {
    typedef typename Acc<T>::type A;
    __shared__ A tile[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = min(r0 + rows_per_chunk, N);
    A s = A(0);
    if (c < C)
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) s += (A)x[r * C + c];
    tile[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        A t = A(0);
        for (int y = 0; y < 8; y++) t += tile[y][threadIdx.x];
        partial[(long long)blockIdx.y * C + c] = t;
    }
}

template <typename T>
__global__ void column_accumulate(T* dst, const typename Acc<T>::type* partial, int K, int C) {
    typedef typename Acc<T>::type A;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    A s = A(0);
    for (int k = 0; k < K; k++) s += partial[(long long)k * C + c];
    dst[c] = (T)((A)dst[c] + s);
}
