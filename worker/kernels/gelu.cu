// GELU in GPT-2's tanh form, forward and backward; mirrors gelu_forward / gelu_backward
// of worker/layers.py (Hendrycks & Gimpel 2016, the tanh approximation).
//
// Elementwise, one grid-stride loop each. The backward ASSIGNS dx (not the residual
// stream). Not here: fusing with the bias of the matmul before it (phase 2).

#define GELU_SCALE 0.7978845608028654   // sqrt(2 / pi), as layers.GELU_SCALE
#define GELU_CUBIC 0.044715

template <typename T>
__global__ void gelu_forward(T* out, const T* x, long long n) {
    typedef typename Acc<T>::type A;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const A xi = (A)x[i];
        const A u = (A)GELU_SCALE * (xi + (A)GELU_CUBIC * xi * xi * xi);
        out[i] = (T)((A)0.5 * xi * ((A)1 + tanh(u)));
    }
}

// dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2)),  t = tanh(u)
template <typename T>
__global__ void gelu_backward(T* dx, const T* dout, const T* x, long long n) {
    typedef typename Acc<T>::type A;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const A xi = (A)x[i];
        const A x2 = xi * xi;
        const A t = tanh((A)GELU_SCALE * xi * ((A)1 + (A)GELU_CUBIC * x2));
        const A du = (A)GELU_SCALE * ((A)1 + (A)3 * (A)GELU_CUBIC * x2);
        const A grad = (A)0.5 * ((A)1 + t) + (A)0.5 * xi * ((A)1 - t * t) * du;
        dx[i] = (T)((A)dout[i] * grad);
    }
}
