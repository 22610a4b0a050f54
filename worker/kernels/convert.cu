// Element type conversions over a flat vector: the float32 master parameters to their
// 16-bit compute copy (bf16 or fp16, round to nearest even) before a forward, and back
// to float where a 16-bit array must be read at full width. The conversions themselves
// are the bf16 / fp16 types of common.cuh. One grid-stride loop, elementwise.

template <typename S, typename D>
__global__ void convert(D* out, const S* in, long long n) {
    typedef typename Acc<S>::type A;       // float for every instance compiled
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = (D)(A)in[i];
}
