// Token + position embedding, forward and backward; mirrors embedding_forward /
// embedding_backward of worker/layers.py.
//
// Forward: one block per position (b, t), threads over the channels.
// Backward, deterministic (no atomics), parameter gradients ACCUMULATED:
//   dwpe[t, c] += sum over b of dout[b, t, c], b in order (a thread per (t, c));
//   dwte: the launcher sorts the N = B*T token ids once (``order``, ``sorted_ids``);
//   the block at the first sorted position of each run of equal ids sums that run's
//   rows of dout in sorted order and adds the sum to dwte[id]; other blocks exit.
// A run of one id repeated N times is summed by one block (slow but right).
// The gradients dwte, dwpe are in the accumulation type (float32 master gradients
// when the activations are 16-bit). Token ids are trusted to lie in [0, V): the model checks them before the forward.

template <typename T, typename I>
__global__ void embedding_forward(T* out, const I* idx, const T* wte, const T* wpe,
                                  long long N, int T_, int C) {
    typedef typename Acc<T>::type A;
    const long long row = blockIdx.x;                  // position b*T + t
    const long long t = row % T_;
    const T* te = wte + (long long)idx[row] * C;
    const T* pe = wpe + t * C;
    T* o = out + row * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = (T)((A)te[c] + (A)pe[c]);
}

template <typename T>
__global__ void embedding_backward_wpe(typename Acc<T>::type* dwpe, const T* dout, int B, int T_,
                                       int C) {
    typedef typename Acc<T>::type A;
    const long long n = (long long)T_ * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        A s = A(0);
        for (int b = 0; b < B; b++) s += (A)dout[(long long)b * n + i];
        dwpe[i] += s;
    }
}

// grid N blocks (one per sorted position), threads over C.
template <typename T, typename I>
__global__ void embedding_backward_wte(typename Acc<T>::type* dwte, const T* dout,
                                       const long long* order,
                                       const I* sorted_ids, long long N, int C) {
    typedef typename Acc<T>::type A;
    const long long p = blockIdx.x;
    const I id = sorted_ids[p];
    if (p > 0 && sorted_ids[p - 1] == id) return;      // not the head of its run
    long long end = p + 1;
    while (end < N && sorted_ids[end] == id) end++;
    A* dst = dwte + (long long)id * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        A s = A(0);
        for (long long q = p; q < end; q++) s += (A)dout[order[q] * C + c];
        dst[c] += s;
    }
}
