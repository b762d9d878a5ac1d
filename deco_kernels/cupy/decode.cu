// Decode / small batches (T <= DECODE_MAX_T): three launches over the union of the batch's active experts, fixed
// grids with early exit, no host synchronisation, so a CUDA graph captures the whole layer.
//
// 1. decode_router: one warp per router row (and one for wbar: mu = x.wbar), 8 rows per block, fp32 logits. The
//    last block to arrive (an arrival counter it resets for the next call) applies the knobs per token (bias,
//    threshold, max_active by rank: ties to the lower index), then compacts the union of active experts into
//    active[0:count] in expert order.
// 2. decode_up: one block per (slot of the active list, 8 rows of the expert's up-projection); slots past the
//    count exit at once. Splitting each expert's DE rows over DE/8 blocks keeps ~20 * 8 blocks busy at T=1
//    instead of ~20 (SPEC §5). The trailing blocks compute the shared expert's silu(x Wg^T) * (x Wu^T).
//    Both write raw fp32 results (h, hs): the NormSiLU needs all DE rows of an expert.
// 3. decode_down: one warp per output feature, 8 per block. Each block applies NormSiLU + the scaled gate to a
//    chunk of active experts into shared memory, then every warp multiplies its w_down row (2*DE contiguous bytes
//    per expert) by it, adds the shared expert and writes y. Each feature is summed by one warp in a fixed order:
//    the result is bit-identical between runs.
// TT: tokens per pass (registers), the next power of two >= T; one module per TT (-DDECODE_TT).

#define DECODE_WARPS 8
#define DECODE_THREADS (DECODE_WARPS * 32)

template <int TT>
__device__ void decode_router(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar,
                              const float* bias_v, float bias_s, float threshold, int max_active, int T, int N,
                              int D, int vec, float* g, float* gt, float* mu, int* active, int* count,
                              unsigned* arrivals) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e = blockIdx.x * DECODE_WARPS + warp;
    for (int t0 = 0; t0 < T; t0 += TT) {
        const int ntok = min(TT, T - t0);
        float out[TT];
        if (e < N) {
            warp_dot<TT>(wr + (long long)e * D, x + t0 * xs, xs, ntok, D, vec, out);
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (lane == t && t < ntok) g[(long long)(t0 + t) * N + e] = out[t];
        } else if (e == N) {
            warp_dot<TT>(wbar, x + t0 * xs, xs, ntok, D, vec, out);
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (lane == t && t < ntok) mu[t0 + t] = out[t];
        }
    }
    // The last block to arrive finishes the gates and the active list.
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int t = warp; t < T; t += DECODE_WARPS)
        finish_token_gates(g + (long long)t * N, gt, t, T, N, bias_v, bias_s, threshold, max_active);
    __syncthreads();
    __shared__ int warp_total[DECODE_WARPS];
    int base = 0;
    for (int e0 = 0; e0 < N; e0 += DECODE_WARPS * 32) {
        const int ee = e0 + threadIdx.x;
        bool on = false;
        if (ee < N)
            for (int t = 0; t < T; ++t) on |= gt[(long long)ee * T + t] > 0.0f;
        const unsigned bits = __ballot_sync(0xffffffffu, on);
        if (lane == 0) warp_total[warp] = __popc(bits);
        __syncthreads();
        int pos = base + __popc(bits & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) pos += warp_total[w];
        if (on) active[pos] = ee;
        for (int w = 0; w < DECODE_WARPS; ++w) base += warp_total[w];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *count = base;
        *arrivals = 0u;
    }
}

template <int TT>
__device__ void decode_up(const ELEM_T* x, long long xs, const ELEM_T* w_up, const ELEM_T* wsg, const ELEM_T* wsu,
                          const int* active, const int* count, int T, int N, int D, int DS, int vec, float* h,
                          float* hs) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int RB = DE / DECODE_WARPS;  // blocks per expert, one row per warp
    const long long NDE = (long long)N * DE;
    const int b = blockIdx.x;
    float out[TT];
    if (b < N * RB) {
        const int slot = b / RB;
        if (slot >= *count) return;
        const long long row = (long long)active[slot] * DE + (b % RB) * DECODE_WARPS + warp;
        for (int t0 = 0; t0 < T; t0 += TT) {
            const int ntok = min(TT, T - t0);
            warp_dot<TT>(w_up + row * D, x + t0 * xs, xs, ntok, D, vec, out);
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (lane == t && t < ntok) h[(t0 + t) * NDE + row] = out[t];
        }
    } else {
        const int j = (b - N * RB) * DECODE_WARPS + warp;
        if (j >= DS) return;
        for (int t0 = 0; t0 < T; t0 += TT) {
            const int ntok = min(TT, T - t0);
            float up[TT];
            warp_dot<TT>(wsg + (long long)j * D, x + t0 * xs, xs, ntok, D, vec, out);
            warp_dot<TT>(wsu + (long long)j * D, x + t0 * xs, xs, ntok, D, vec, up);
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (lane == t && t < ntok) hs[(long long)(t0 + t) * DS + j] = silu(out[t]) * up[t];
        }
    }
}

// Shared memory of the down kernel: fp32 activations of SLOTS experts x TT tokens, rows padded by 4 floats.
#define DECODE_ACT_FLOATS 8192
#define DECODE_AST (DE + 4)

template <int TT>
__device__ void decode_down(const float* h, const float* hs, const float* mu, const float* g, const SCALE_T* scale,
                            const GAMMA_T* gamma, const ELEM_T* w_down, const ELEM_T* ws_down, const int* active,
                            const int* count, int T, int N, int D, int DS, int vec, float eps, ELEM_T* y,
                            long long ys) {
    constexpr int SLOTS_FIT = DECODE_ACT_FLOATS / (TT * DECODE_AST);
    constexpr int SLOTS = SLOTS_FIT < 64 ? SLOTS_FIT : 64;
    static_assert(SLOTS >= 1, "decode_down: TT * DE too large for the activation buffer");
    constexpr int LPE = DE / 8;    // lanes per expert: 8 of its DE values each (a w_down row segment, or h)
    constexpr int EPP = 32 / LPE;  // experts per pass of a warp
    __shared__ __align__(16) float act[DECODE_ACT_FLOATS];
    __shared__ int ids[SLOTS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c = blockIdx.x * DECODE_WARPS + warp;
    const long long NDE = (long long)N * DE;
    const int cnt = *count;
    for (int t0 = 0; t0 < T; t0 += TT) {
        const int ntok = min(TT, T - t0);
        float acc[TT];
#pragma unroll
        for (int t = 0; t < TT; ++t) acc[t] = 0.0f;
        if (c < D)
            for (int j = lane; j < DS; j += 32) {
                const float w = to_f(ws_down[(long long)c * DS + j]);
#pragma unroll
                for (int t = 0; t < TT; ++t)
                    if (t < ntok) acc[t] += w * hs[(long long)(t0 + t) * DS + j];
            }
        for (int s0 = 0; s0 < cnt; s0 += SLOTS) {
            const int ns = min(SLOTS, cnt - s0);
            __syncthreads();  // the previous chunk is consumed
            for (int s = threadIdx.x; s < ns; s += blockDim.x) ids[s] = active[s0 + s];
            // NormSiLU + scaled gate: LPE threads per (token, slot), 8 of its DE values each, so one round of
            // loads covers 256 / LPE pairs (all of them at T=1).
            for (int p0 = 0; p0 < ntok * ns; p0 += DECODE_THREADS / LPE) {
                const int p = p0 + threadIdx.x / LPE, k = (threadIdx.x % LPE) * 8;
                const bool live = p < ntok * ns;
                const int t = live ? p / ns : 0, s = live ? p % ns : 0;
                const int e = live ? active[s0 + s] : 0;
                const long long tok = t0 + t;
                const float gs = live ? g[tok * N + e] * to_f(scale[e]) : 0.0f;
                float u[8] = {}, ss = 0.0f;
                if (gs != 0.0f) {
                    load8(h + tok * NDE + (long long)e * DE + k, true, u);
                    const float m = mu[tok];
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        u[j] -= m;
                        ss += u[j] * u[j];
                    }
                }
#pragma unroll
                for (int o = LPE / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
                if (live) {
                    float* a = act + (t * SLOTS + s) * DECODE_AST + k;
                    const float inv = 1.0f / sqrtf(ss / DE + eps);
#pragma unroll
                    for (int j = 0; j < 8; ++j) a[j] = gs == 0.0f ? 0.0f : silu(to_f(gamma[k + j]) * u[j] * inv) * gs;
                }
            }
            __syncthreads();
            if (c < D) {
                const ELEM_T* wrow = w_down + (long long)c * NDE;
                const int sub = lane / LPE, kk = (lane % LPE) * 8;
#pragma unroll 4
                for (int s = sub; s < ns; s += EPP) {
                    float wv[8];
                    load8(wrow + (long long)ids[s] * DE + kk, vec, wv);
#pragma unroll
                    for (int t = 0; t < TT; ++t) {
                        if (t < ntok) {
                            const float* a = act + (t * SLOTS + s) * DECODE_AST + kk;
#pragma unroll
                            for (int j = 0; j < 8; ++j) acc[t] += wv[j] * a[j];
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < TT; ++t) acc[t] = warp_sum(acc[t]);
        if (c < D) {
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (lane == t && t < ntok) y[(long long)(t0 + t) * ys + c] = from_f<ELEM_T>(acc[t]);
        }
    }
}

#define DECODE_INSTANTIATE(TT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        deco_decode_router(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar,            \
                                 const float* bias_v, float bias_s, float threshold, int max_active, int T, int N, \
                                 int D, int vec, float* g, float* gt, float* mu, int* active, int* count,         \
                                 unsigned* arrivals) {                                                            \
        decode_router<TT>(x, xs, wr, wbar, bias_v, bias_s, threshold, max_active, T, N, D, vec, g, gt, mu,       \
                          active, count, arrivals);                                                               \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        deco_decode_up(const ELEM_T* x, long long xs, const ELEM_T* w_up, const ELEM_T* wsg,               \
                             const ELEM_T* wsu, const int* active, const int* count, int T, int N, int D, int DS, \
                             int vec, float* h, float* hs) {                                                      \
        decode_up<TT>(x, xs, w_up, wsg, wsu, active, count, T, N, D, DS, vec, h, hs);                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                            \
        deco_decode_down(const float* h, const float* hs, const float* mu, const float* g,                 \
                               const SCALE_T* scale, const GAMMA_T* gamma, const ELEM_T* w_down,                 \
                               const ELEM_T* ws_down, const int* active, const int* count, int T, int N, int D,  \
                               int DS, int vec, float eps, ELEM_T* y, long long ys) {                            \
        decode_down<TT>(h, hs, mu, g, scale, gamma, w_down, ws_down, active, count, T, N, D, DS, vec, eps, y,   \
                        ys);                                                                                      \
    }

// One instantiation per compiled module (fast NVRTC compiles): DECODE_TT is set by geometry.compile_options.
#ifdef DECODE_TT
DECODE_INSTANTIATE(DECODE_TT)
#endif
