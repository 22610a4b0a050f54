// LayerNorm over the last axis, forward and backward; mirrors layernorm_forward /
// layernorm_backward of worker/layers.py (Ba, Kiros & Hinton 2016; GPT-2's eps 1e-5).
//
// Rows are the N = B*T positions, each of C channels. One warp per row: C is a few
// hundred to a few thousand, so 32 lanes striding over the row keep loads coalesced
// and the row statistics are two warp reductions (two-pass: mean, then the variance
// of the centred row, as the NumPy reference does, never E[x^2] - E[x]^2).
// Backward: dx per row (warp per row, dx ADDED: the residual stream), then dw, db as
// deterministic column sums (partials per chunk of rows, then an ordered sum).
// mean and rstd are kept in the accumulation type (float for 16-bit activations).
// Not here: the launch geometry (worker/kernels/ops.py chooses it).

template <typename T>
__global__ void layernorm_forward(T* out, typename Acc<T>::type* mean,
                                  typename Acc<T>::type* rstd, const T* x, const T* w,
                                  const T* b, long long N, int C, typename Acc<T>::type eps) {
    typedef typename Acc<T>::type A;
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;                  // uniform over the warp: shuffles stay safe
    const T* xr = x + row * C;
    A s = A(0);
    for (int c = lane; c < C; c += 32) s += (A)xr[c];
    const A m = warp_sum(s) / (A)C;
    A v = A(0);
    for (int c = lane; c < C; c += 32) {
        const A d = (A)xr[c] - m;
        v += d * d;
    }
    const A var = warp_sum(v) / (A)C;      // biased, as GPT-2
    const A rs = A(1) / sqrt(var + eps);
    T* o = out + row * C;
    for (int c = lane; c < C; c += 32) {
        const A xhat = ((A)xr[c] - m) * rs;
        o[c] = (T)(xhat * (A)w[c] + (A)b[c]);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

// dx += rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dout * w
template <typename T>
__global__ void layernorm_backward_dx(T* dx, const T* dout, const T* x,
                                      const typename Acc<T>::type* mean,
                                      const typename Acc<T>::type* rstd, const T* w,
                                      long long N, int C) {
    typedef typename Acc<T>::type A;
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;
    const T* xr = x + row * C;
    const T* dr = dout + row * C;
    const A m = (A)mean[row], rs = (A)rstd[row];
    A sg = A(0), sgx = A(0);
    for (int c = lane; c < C; c += 32) {
        const A xhat = ((A)xr[c] - m) * rs;
        const A g = (A)dr[c] * (A)w[c];
        sg += g;
        sgx += g * xhat;
    }
    const A g_mean = warp_sum(sg) / (A)C;
    const A gx_mean = warp_sum(sgx) / (A)C;
    T* dxr = dx + row * C;
    for (int c = lane; c < C; c += 32) {
        const A xhat = ((A)xr[c] - m) * rs;
        const A g = (A)dr[c] * (A)w[c];
        dxr[c] = (T)((A)dxr[c] + (g - g_mean - xhat * gx_mean) * rs);
    }
}

// partial_dw[k, c] = sum over the rows of chunk k of dout * xhat; partial_db likewise of
// dout. grid (ceil(C/32), K), block (32, 8); then column_accumulate adds them in order.
template <typename T>
__global__ void layernorm_backward_dwdb_partial(typename Acc<T>::type* partial_dw,
                                                typename Acc<T>::type* partial_db,
                                                const T* dout, const T* x,
                                                const typename Acc<T>::type* mean,
                                                const typename Acc<T>::type* rstd,
                                                long long N, int C,
                                                long long rows_per_chunk) {
    typedef typename Acc<T>::type A;
    __shared__ A tile_w[8][33];
    __shared__ A tile_b[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = min(r0 + rows_per_chunk, N);
    A sw = A(0), sb = A(0);
    if (c < C) {
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            const A d = (A)dout[r * C + c];
            const A xhat = ((A)x[r * C + c] - (A)mean[r]) * (A)rstd[r];
            sw += d * xhat;
            sb += d;
        }
    }
    tile_w[threadIdx.y][threadIdx.x] = sw;
    tile_b[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        A tw = A(0), tb = A(0);
        for (int y = 0; y < 8; y++) {
            tw += tile_w[y][threadIdx.x];
            tb += tile_b[y][threadIdx.x];
        }
        partial_dw[(long long)blockIdx.y * C + c] = tw;
        partial_db[(long long)blockIdx.y * C + c] = tb;
    }
}
