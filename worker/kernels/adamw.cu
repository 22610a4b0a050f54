// AdamW over a flat parameter vector in one fused pass; mirrors AdamW.step of
// common/optim.py (Loshchilov & Hutter 2019, PyTorch's order): decoupled decay
// p *= 1 - lr*wd on the decay ranges first, then the Adam step with bias correction.
//
// Every scalar that depends on the step (1 - b1, 1/sqrt(1 - b2^t), lr/(1 - b1^t), ...)
// is computed by the launcher in double and passed in the element's type, as NumPy
// rounds the Python floats of the reference, so the arithmetic per element is the
// reference's, operation for operation. Decay ranges: a sorted, merged list of
// [begin, end) pairs; each element finds its range by binary search (a GPT-2 has
// ~50 matrices, so ~6 steps in a list that stays in cache).
// Not here: the learning-rate schedule and clipping (plain host functions in optim.py).

__device__ __forceinline__ bool in_ranges(long long i, const long long* ranges, int n_ranges) {
    int lo = 0, hi = n_ranges;             // first range whose begin is > i
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (ranges[2 * mid] <= i) lo = mid + 1;
        else hi = mid;
    }
    return lo > 0 && i < ranges[2 * (lo - 1) + 1];
}

template <typename T>
__global__ void adamw_update(T* params, const T* grads, T* m, T* v,
                             const long long* ranges, int n_ranges, long long n,
                             T grad_scale, T beta1, T one_minus_beta1, T beta2,
                             T one_minus_beta2, T inv_sqrt_bc2, T eps, T step_size, T keep) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        T p = params[i];
        if (n_ranges > 0 && in_ranges(i, ranges, n_ranges)) p *= keep;
        const T g = grads[i] * grad_scale;
        const T mi = m[i] * beta1 + g * one_minus_beta1;
        const T vi = v[i] * beta2 + g * g * one_minus_beta2;
        const T denom = sqrt(vi) * inv_sqrt_bc2 + eps;
        p -= (mi / denom) * step_size;
        m[i] = mi;
        v[i] = vi;
        params[i] = p;
    }
}
