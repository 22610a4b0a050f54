// Fused softmax + cross-entropy over the vocabulary, forward and backward; mirrors
// softmax_crossentropy_forward / _backward of worker/layers.py.
//
// One block per row (position): V is 256 to 50257 wide, so the block's threads stride
// over the row and the max and the sum are block reductions (fixed order: the same
// bits every run). The loss is logsumexp - logit[target] (never log(0)), the probs are
// saved for the backward, as in the reference. A negative target means "ignored":
// loss 0 and a zero gradient. A target >= V (which the model rejects before it gets
// here) gives a NaN loss rather than a read out of bounds.
// Losses and their gradients are in the accumulation type (float for 16-bit logits).
// Not here: never materialising probs (a later, chunked variant could recompute them).

template <typename T, typename I>
__global__ void softmax_crossentropy_forward(typename Acc<T>::type* losses, T* probs,
                                             const T* logits,
                                             const I* targets, long long N, int V) {
    typedef typename Acc<T>::type A;
    __shared__ A scratch[32];
    const long long row = blockIdx.x;
    const T* l = logits + row * V;
    T* p = probs + row * V;
    A m = neg_inf<A>();
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const A lv = (A)l[v];
        m = lv > m ? lv : m;
    }
    m = block_max(m, scratch);
    A s = A(0);
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += exp((A)l[v] - m);
    s = block_sum(s, scratch);
    for (int v = threadIdx.x; v < V; v += blockDim.x) p[v] = (T)(exp((A)l[v] - m) / s);
    if (threadIdx.x == 0) {
        const long long t = (long long)targets[row];
        A loss = A(0);
        if (t >= V) loss = A(0) / A(0);                    // NaN: loud, and no stray read
        else if (t >= 0) loss = log(s) + m - (A)l[t];
        losses[row] = loss;
    }
}

// dlogits = dl * (probs - onehot(target)), dl = dlosses (0 where target < 0); ASSIGNED.
template <typename T, typename I>
__global__ void softmax_crossentropy_backward(T* dlogits, const typename Acc<T>::type* dlosses,
                                              const T* probs,
                                              const I* targets, long long N, int V) {
    typedef typename Acc<T>::type A;
    const long long row = blockIdx.x;
    const long long t = (long long)targets[row];
    const A dl = t >= 0 ? (A)dlosses[row] : A(0);
    const T* p = probs + row * V;
    T* d = dlogits + row * V;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        A g = (A)p[v] * dl;
        if (v == t) g -= dl;
        d[v] = (T)g;
    }
}
