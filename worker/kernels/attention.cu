// Causal multi-head self-attention, forward and backward; mirrors attention_forward /
// attention_backward of worker/layers.py. qkv (B,T,3C) holds q, k, v side by side,
// head h of q at columns [h*hs, (h+1)*hs), k at C + that, v at 2C + that; out (B,T,C).
//
// Two designs, chosen by the launcher from what the caller saves for the backward:
//
// 1. ``att`` (B,NH,T,T), as the NumPy reference: the matmuls are cuBLAS (cupy.matmul)
//    and only the causal softmax is ours, in place on the scores, one block per row:
//    causal_softmax_forward (scale, mask, max, exp, normalise, zero the future) and
//    causal_softmax_backward (datt <- att * (datt - sum(datt * att)) * scale).
//
// 2. ``lse`` (B,NH,T), the log-sum-exp of each row of scaled scores: memory-efficient,
//    never a T x T array (the idea of FlashAttention, Dao et al. 2022, written here
//    plainly rather than fast). A block holds ATT_WARPS consecutive rows of one (b, h),
//    one warp per row; the other side is walked in tiles of 32 rows staged in shared
//    memory, lane j of a warp owning row j of the tile (one dot product per lane over
//    a padded, bank-conflict-free tile), softmax kept online (running max and sum).
//      forward:         out, lse;
//      backward_dq:     warp per query row i:  dq_i = scale * sum_j ds_ij k_j;
//      backward_dkdv:   warp per key row j:    dv_j = sum_i p_ij do_i,
//                                              dk_j = scale * sum_i ds_ij q_i;
//    with p_ij = exp(scale q_i.k_j - lse_i), ds_ij = p_ij (do_i.v_j - D_i) and
//    D_i = do_i . out_i (attention_backward_D, from the forward's out when the caller
//    passes it, else from a re-run of the forward). lse and D are in the accumulation
//    type (float for 16-bit q, k, v).
//    Each output row is owned by one warp: deterministic, no atomics. Head size up to
//    HS_MAX (template: 64 or 128 for float, 64 for double: static shared memory must
//    stay under 48 KiB); the launcher falls back to the reference beyond.
// Design 1 is compiled for float and double; design 2 also for bf16 and fp16 (tiles
// staged in float: the same shared memory as the float kernels).
// Not here: tensor cores, or the tiled matmul-in-shared-memory speed of real
// FlashAttention kernels (to be measured on a GPU first).

#define ATT_WARPS 8                       // rows per block; blockDim.x = 32 * ATT_WARPS

// ---- design 1: the causal softmax around cuBLAS matmuls -----------------------------

// att (rows, T) holds q.k scores; row r is query position i = r % T. In place.
template <typename T>
__global__ void causal_softmax_forward(T* att, int T_, typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    __shared__ A scratch[32];
    const long long row = blockIdx.x;
    const int i = (int)(row % T_);
    T* a = att + row * T_;
    A m = neg_inf<A>();
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        const A s = (A)a[j] * scale;
        m = s > m ? s : m;
    }
    m = block_max(m, scratch);
    A sum = A(0);
    for (int j = threadIdx.x; j <= i; j += blockDim.x) sum += exp((A)a[j] * scale - m);
    sum = block_sum(sum, scratch);
    for (int j = threadIdx.x; j < T_; j += blockDim.x)
        a[j] = j <= i ? (T)(exp((A)a[j] * scale - m) / sum) : (T)0;
}

// datt (rows, T) holds dy.v; att the softmax of the forward. In place:
// datt <- att * (datt - sum_j datt_j att_j) * scale; zero in the future (att = 0 there).
template <typename T>
__global__ void causal_softmax_backward(T* datt, const T* att, int T_,
                                        typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    __shared__ A scratch[32];
    const long long row = blockIdx.x;
    const int i = (int)(row % T_);
    T* d = datt + row * T_;
    const T* a = att + row * T_;
    A dot = A(0);
    for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += (A)d[j] * (A)a[j];
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < T_; j += blockDim.x)
        d[j] = j <= i ? (T)((A)a[j] * ((A)d[j] - dot) * scale) : (T)0;
}

// ---- design 2: memory-efficient, lse saved -----------------------------------------

// dot product of two rows of hs elements in shared memory
template <typename A>
__device__ __forceinline__ A dot_row(const A* x, const A* y, int hs) {
    A s = A(0);
    for (int d = 0; d < hs; d++) s += x[d] * y[d];
    return s;
}

// grid (ceil(T / ATT_WARPS), B*NH), block 32*ATT_WARPS
template <typename T, int HS_MAX>
__global__ void __launch_bounds__(32 * ATT_WARPS)
attention_forward_flash(T* out, typename Acc<T>::type* lse, const T* qkv, int T_, int NH, int hs,
                        typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    constexpr int PER_LANE = HS_MAX / 32;
    __shared__ A k_s[32][HS_MAX + 1];      // +1: lane j reads row j, no bank conflicts
    __shared__ A v_s[32][HS_MAX];
    __shared__ A q_s[ATT_WARPS][HS_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * hs;
    const long long C3 = 3LL * C;
    const T* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;   // q of (b, 0, h)
    const int i0 = blockIdx.x * ATT_WARPS;
    const int i = i0 + warp;                                            // this warp's query
    const bool active = i < T_;
    const int i_last = min(i0 + ATT_WARPS, T_) - 1;

    if (active)
        for (int d = lane; d < hs; d += 32) q_s[warp][d] = (A)base[(long long)i * C3 + d];
    A m = neg_inf<A>(), l = A(0);
    A acc[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) acc[r] = A(0);

    for (int j0 = 0; j0 <= i_last; j0 += 32) {
        __syncthreads();                   // the previous tile is no longer read
        for (int e = threadIdx.x; e < 32 * hs; e += blockDim.x) {
            const int jj = e / hs, d = e - jj * hs;
            A kv = A(0), vv = A(0);
            if (j0 + jj < T_) {
                const T* row = base + (long long)(j0 + jj) * C3;
                kv = (A)row[C + d];
                vv = (A)row[2 * C + d];
            }
            k_s[jj][d] = kv;
            v_s[jj][d] = vv;
        }
        __syncthreads();
        if (active && j0 <= i) {           // uniform over the warp
            const int j = j0 + lane;
            A s = neg_inf<A>();
            if (j <= i) s = dot_row(q_s[warp], k_s[lane], hs) * scale;
            const A m_tile = warp_max(s);  // finite: key j0 <= i is in the tile
            const A m_new = m > m_tile ? m : m_tile;
            const A p = j <= i ? exp(s - m_new) : A(0);
            const A corr = exp(m - m_new); // 0 on the first tile, where m = -inf
            l = l * corr + warp_sum(p);
#pragma unroll
            for (int r = 0; r < PER_LANE; r++) acc[r] *= corr;
            const int n_keys = min(32, i - j0 + 1);
            for (int jj = 0; jj < n_keys; jj++) {
                const A pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
                for (int r = 0; r < PER_LANE; r++) {
                    const int d = lane + 32 * r;
                    if (d < hs) acc[r] += pj * v_s[jj][d];
                }
            }
            m = m_new;
        }
    }
    if (active) {
        T* o = out + ((long long)b * T_ + i) * C + (long long)h * hs;
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) {
            const int d = lane + 32 * r;
            if (d < hs) o[d] = (T)(acc[r] / l);
        }
        if (lane == 0) lse[(long long)bh * T_ + i] = m + log(l);
    }
}

// D (B,NH,T): D[b,h,i] = sum over d of dout[b,i,h*hs+d] * out[b,i,h*hs+d], the row term
// of the softmax backward. A warp per (b, i, h) row, grid-stride over the rows.
template <typename T>
__global__ void attention_backward_D(typename Acc<T>::type* D, const T* dout, const T* out,
                                     int B, int T_, int NH, int hs) {
    typedef typename Acc<T>::type A;
    const int lane = threadIdx.x & 31;
    const long long rows = (long long)B * T_ * NH;
    for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
         r += (long long)gridDim.x * (blockDim.x >> 5)) {     // r = (b*T + i)*NH + h
        const T* d = dout + r * hs;
        const T* o = out + r * hs;
        A s = A(0);
        for (int c = lane; c < hs; c += 32) s += (A)d[c] * (A)o[c];
        s = warp_sum(s);
        if (lane == 0) {
            const long long h = r % NH, bi = r / NH, b = bi / T_, i = bi % T_;
            D[(b * NH + h) * T_ + i] = s;
        }
    }
}

// dq rows of dqkv (ASSIGNED). D (B,NH,T) = sum over d of dout * out, per row.
// grid (ceil(T / ATT_WARPS), B*NH), block 32*ATT_WARPS
template <typename T, int HS_MAX>
__global__ void __launch_bounds__(32 * ATT_WARPS)
attention_backward_dq_flash(T* dqkv, const T* dout, const T* qkv,
                            const typename Acc<T>::type* lse, const typename Acc<T>::type* D,
                            int T_, int NH, int hs, typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    constexpr int PER_LANE = HS_MAX / 32;
    __shared__ A k_s[32][HS_MAX + 1];
    __shared__ A v_s[32][HS_MAX + 1];
    __shared__ A q_s[ATT_WARPS][HS_MAX];
    __shared__ A do_s[ATT_WARPS][HS_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * hs;
    const long long C3 = 3LL * C;
    const T* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const int i0 = blockIdx.x * ATT_WARPS;
    const int i = i0 + warp;
    const bool active = i < T_;
    const int i_last = min(i0 + ATT_WARPS, T_) - 1;

    A lse_i = A(0), D_i = A(0);
    if (active) {
        const T* dorow = dout + ((long long)b * T_ + i) * C + (long long)h * hs;
        for (int d = lane; d < hs; d += 32) {
            q_s[warp][d] = (A)base[(long long)i * C3 + d];
            do_s[warp][d] = (A)dorow[d];
        }
        lse_i = (A)lse[(long long)bh * T_ + i];
        D_i = (A)D[(long long)bh * T_ + i];
    }
    A acc[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) acc[r] = A(0);

    for (int j0 = 0; j0 <= i_last; j0 += 32) {
        __syncthreads();
        for (int e = threadIdx.x; e < 32 * hs; e += blockDim.x) {
            const int jj = e / hs, d = e - jj * hs;
            A kv = A(0), vv = A(0);
            if (j0 + jj < T_) {
                const T* row = base + (long long)(j0 + jj) * C3;
                kv = (A)row[C + d];
                vv = (A)row[2 * C + d];
            }
            k_s[jj][d] = kv;
            v_s[jj][d] = vv;
        }
        __syncthreads();
        if (active && j0 <= i) {
            const int j = j0 + lane;
            A ds = A(0);
            if (j <= i) {
                const A p = exp(dot_row(q_s[warp], k_s[lane], hs) * scale - lse_i);
                const A dp = dot_row(do_s[warp], v_s[lane], hs);
                ds = p * (dp - D_i);
            }
            const int n_keys = min(32, i - j0 + 1);
            for (int jj = 0; jj < n_keys; jj++) {
                const A dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
                for (int r = 0; r < PER_LANE; r++) {
                    const int d = lane + 32 * r;
                    if (d < hs) acc[r] += dsj * k_s[jj][d];
                }
            }
        }
    }
    if (active) {
        T* dq = dqkv + ((long long)b * T_ + i) * C3 + (long long)h * hs;
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) {
            const int d = lane + 32 * r;
            if (d < hs) dq[d] = (T)(acc[r] * scale);
        }
    }
}

// dk and dv rows of dqkv (ASSIGNED). grid (ceil(T / ATT_WARPS), B*NH): a block holds
// ATT_WARPS consecutive KEY rows and walks the query tiles from its first key on.
template <typename T, int HS_MAX>
__global__ void __launch_bounds__(32 * ATT_WARPS)
attention_backward_dkdv_flash(T* dqkv, const T* dout, const T* qkv,
                              const typename Acc<T>::type* lse,
                              const typename Acc<T>::type* D, int T_, int NH, int hs,
                              typename Acc<T>::type scale) {
    typedef typename Acc<T>::type A;
    constexpr int PER_LANE = HS_MAX / 32;
    __shared__ A q_s[32][HS_MAX + 1];
    __shared__ A do_s[32][HS_MAX + 1];
    __shared__ A k_w[ATT_WARPS][HS_MAX];
    __shared__ A v_w[ATT_WARPS][HS_MAX];
    __shared__ A lse_s[32];
    __shared__ A D_s[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int C = NH * hs;
    const long long C3 = 3LL * C;
    const T* base = qkv + (long long)b * T_ * C3 + (long long)h * hs;
    const T* dobase = dout + (long long)b * T_ * C + (long long)h * hs;
    const int j_first = blockIdx.x * ATT_WARPS;
    const int j = j_first + warp;                                       // this warp's key
    const bool active = j < T_;

    if (active) {
        const T* row = base + (long long)j * C3;
        for (int d = lane; d < hs; d += 32) {
            k_w[warp][d] = (A)row[C + d];
            v_w[warp][d] = (A)row[2 * C + d];
        }
    }
    A acc_k[PER_LANE], acc_v[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; r++) acc_k[r] = acc_v[r] = A(0);

    // queries i >= j_first matter; start at the tile that holds j_first
    for (int i0 = (j_first / 32) * 32; i0 < T_; i0 += 32) {
        __syncthreads();
        for (int e = threadIdx.x; e < 32 * hs; e += blockDim.x) {
            const int ii = e / hs, d = e - ii * hs;
            A qv = A(0), dv = A(0);
            if (i0 + ii < T_) {
                qv = (A)base[(long long)(i0 + ii) * C3 + d];
                dv = (A)dobase[(long long)(i0 + ii) * C + d];
            }
            q_s[ii][d] = qv;
            do_s[ii][d] = dv;
        }
        if (threadIdx.x < 32) {
            const int iq = i0 + threadIdx.x;
            lse_s[threadIdx.x] = iq < T_ ? (A)lse[(long long)bh * T_ + iq] : A(0);
            D_s[threadIdx.x] = iq < T_ ? (A)D[(long long)bh * T_ + iq] : A(0);
        }
        __syncthreads();
        if (active && i0 + 31 >= j) {      // some query of the tile sees key j
            const int i = i0 + lane;
            A p = A(0), ds = A(0);
            if (i >= j && i < T_) {
                p = exp(dot_row(q_s[lane], k_w[warp], hs) * scale - lse_s[lane]);
                const A dp = dot_row(do_s[lane], v_w[warp], hs);
                ds = p * (dp - D_s[lane]);
            }
            const int ii_lo = max(0, j - i0), ii_hi = min(32, T_ - i0);
            for (int ii = ii_lo; ii < ii_hi; ii++) {
                const A pi = __shfl_sync(0xffffffffu, p, ii);
                const A dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                for (int r = 0; r < PER_LANE; r++) {
                    const int d = lane + 32 * r;
                    if (d < hs) {
                        acc_v[r] += pi * do_s[ii][d];
                        acc_k[r] += dsi * q_s[ii][d];
                    }
                }
            }
        }
    }
    if (active) {
        T* row = dqkv + ((long long)b * T_ + j) * C3 + (long long)h * hs;
#pragma unroll
        for (int r = 0; r < PER_LANE; r++) {
            const int d = lane + 32 * r;
            if (d < hs) {
                row[C + d] = (T)(acc_k[r] * scale);
                row[2 * C + d] = (T)acc_v[r];
            }
        }
    }
}
