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

// ---- element types ----------------------------------------------------------------
// float, double, and two 16-bit storage types for mixed precision, bf16 and fp16, that
// convert to and from float (round to nearest even) and do all their arithmetic in
// float. No CUDA header is included (NVRTC has no cuda_bf16.h / cuda_fp16.h without a
// toolkit), so the conversions are written here: bf16 is the top half of a float, so
// integer arithmetic that runs alike on the GPU and in the test emulator; fp16 uses the
// PTX cvt instructions on the GPU and, elsewhere (the emulator), a software conversion
// with the same rounding, checked against NumPy's float16.

__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
    unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // NaN
    x += 0x7fffu + ((x >> 16) & 1u);       // round to nearest, ties to even; may carry to inf
    return (unsigned short)(x >> 16);
}

__device__ __forceinline__ float bf16_bits_to_float(unsigned short h) {
    return __uint_as_float((unsigned)h << 16);
}

__device__ __forceinline__ unsigned short float_to_fp16_bits(float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    const unsigned x = __float_as_uint(f);
    const unsigned sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);   // NaN: a quiet NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf
    if (a >= 0x38800000u) {                // a normal half: rebias 127 -> 15, round 13 bits
        unsigned v = a - 0x38000000u;
        v += 0x0fffu + ((v >> 13) & 1u);
        return (unsigned short)(sign | (v >> 13));
    }
    if (a <= 0x33000000u) return (unsigned short)sign;  // <= 2^-25: zero (2^-25 ties to 0)
    // a subnormal half m * 2^-24, m = |f| * 2^24 rounded to nearest even
    const unsigned e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;
    unsigned m = mant >> shift;
    const unsigned rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (m & 1u))) m++;
    return (unsigned short)(sign | m);
#endif
}

__device__ __forceinline__ float fp16_bits_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned sign = ((unsigned)h & 0x8000u) << 16, e = ((unsigned)h >> 10) & 0x1fu,
                   m = (unsigned)h & 0x3ffu;
    if (e == 31u) return __uint_as_float(sign | 0x7f800000u | (m << 13));   // inf, NaN
    if (e == 0u) {                                                         // zero, subnormal
        const float v = (float)m * 5.9604644775390625e-8f;                // m * 2^-24, exact
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

struct bf16 {                              // bfloat16: 8 exponent bits, 7 mantissa bits
    unsigned short bits;
    bf16() = default;
    __device__ bf16(float f) : bits(float_to_bf16_bits(f)) {}
    __device__ operator float() const { return bf16_bits_to_float(bits); }
};

struct fp16 {                              // IEEE half: 5 exponent bits, 10 mantissa bits
    unsigned short bits;
    fp16() = default;
    __device__ fp16(float f) : bits(float_to_fp16_bits(f)) {}
    __device__ operator float() const { return fp16_bits_to_float(bits); }
};

// Accumulation type: float for float, bf16 and fp16, double for double. It is also the
// type of what a kernel keeps at full precision beside 16-bit activations: the saved
// statistics (LayerNorm's mean and rstd, attention's lse), the losses, and the parameter
// gradients (float32 master gradients). For float and double it is the element type
// itself, so their kernels' signatures read as if it were not there.
template <typename T> struct Acc { typedef T type; };
template <> struct Acc<bf16> { typedef float type; };
template <> struct Acc<fp16> { typedef float type; };

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

// Warp and block reductions, one body each for sum and max (the operator is a type).
struct SumOp {
    template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
    template <typename A> __device__ __forceinline__ A operator()(A a, A b) const {
        return b > a ? b : a;
    }
};

template <typename A, typename Op> __device__ __forceinline__ A warp_reduce(A v, Op op) {
    // butterfly: every lane ends with the same result, combined in the same order
    for (int offset = 16; offset > 0; offset >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) { return warp_reduce(v, SumOp()); }
template <typename A> __device__ __forceinline__ A warp_max(A v) { return warp_reduce(v, MaxOp()); }

// Sum (or max) over the whole block; every thread gets the result. blockDim.x must be
// a multiple of 32 (at most 1024) and every thread of the block must call it.
// ``scratch`` is __shared__ A[32]; the next call may reuse it (softmax: a max, then a
// sum), which is what the first barrier is for.
template <typename A, typename Op>
__device__ A block_reduce(A v, A* scratch, A identity, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();                       // the previous call's readers of scratch[0] are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();                       // every warp's partial is in scratch
    if (warp == 0) {
        v = warp_reduce(lane < n_warps ? scratch[lane] : identity, op);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();                       // the result is in scratch[0]
    return scratch[0];
}

template <typename A> __device__ A block_sum(A v, A* scratch) {
    return block_reduce(v, scratch, A(0), SumOp());
}

template <typename A> __device__ A block_max(A v, A* scratch) {
    return block_reduce(v, scratch, neg_inf<A>(), MaxOp());
}

// Column sums of an (N, C) matrix, deterministic, in two launches:
//   column_partial_sums: grid (ceil(C/32), K), block (32, 8): chunk k of the rows
//     [k*rows_per_chunk, (k+1)*rows_per_chunk) is summed into partial[k, c];
//   column_accumulate: dst[c] += sum over k of partial[k, c], k in order.
// dst is a parameter gradient: with 16-bit activations the launcher takes
// column_accumulate<float> (float32 master gradients, float partials).
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
