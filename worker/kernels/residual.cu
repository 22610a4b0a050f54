// The residual connection and the bias of a linear layer, forward and backward;
// mirrors residual_forward / residual_backward and the bias part of matmul_forward /
// matmul_backward of worker/layers.py.
//
// The matmul itself is cuBLAS (through cupy.matmul), not a kernel of ours; what is
// left around it is elementwise (bias_forward) or a deterministic column sum
// (bias backward = column_partial_sums + column_accumulate from common.cuh).
// residual_backward ADDS into both inputs' gradients (both are residual streams).

template <typename T>
__global__ void residual_forward(T* out, const T* a, const T* b, long long n) {
    typedef typename Acc<T>::type A;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = (T)((A)a[i] + (A)b[i]);
}

// da += dout; db += dout. When da and db are the same buffer it gets dout twice, as
// the two in-place additions of the NumPy reference do.
template <typename T>
__global__ void residual_backward(T* da, T* db, const T* dout, long long n) {
    typedef typename Acc<T>::type A;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const A d = (A)dout[i];
        da[i] = (T)((A)da[i] + d);
        db[i] = (T)((A)db[i] + d);
    }
}

// out (N, OC) += bias (OC,), broadcast over the rows; one block per row, threads over OC.
template <typename T>
__global__ void bias_forward(T* out, const T* bias, long long N, int OC) {
    typedef typename Acc<T>::type A;
    T* o = out + (long long)blockIdx.x * OC;
    for (int c = threadIdx.x; c < OC; c += blockDim.x) o[c] = (T)((A)o[c] + (A)bias[c]);
}
