// Decode / small batches (T <= DECODE_MAX_T): two launches (three with max_active), fixed grids with early exit,
// no host synchronisation, so a CUDA graph captures the whole layer. No active list leaves a kernel: each block
// that needs one finds its experts from the gates g itself.
//
// 1. decode_up, blocks in this order:
//    - ceil(DS / 8) shared-expert blocks first (they stream twice an expert row's bytes): hs = silu(x Wg^T) *
//      (x Wu^T), one row per warp;
//    - one block for mu = x . wbar;
//    - one block per (expert, 8 rows of its up-projection): DE/8 blocks per expert keep ~20 * 8 blocks busy at
//      T=1 instead of ~20 (SPEC §5). Each block first computes its expert's router logits for the T tokens
//      (the whole block on one router row, from L2: every block of the expert gets the same bits) and its gates
//      relu(r + bias) cut at threshold; the expert's first block writes them to g (the only writer of g[:, e],
//      zeros included). A block whose expert no token activates exits before reading its w_up rows; the others
//      write raw fp32 h rows (the NormSiLU needs all DE rows of an expert).
//    With gates_given (max_active: a top-k needs all of a token's logits at once) decode_router ran first and
//    wrote g and mu: the expert blocks read their gates from g and the mu block exits.
// 2. decode_down: one warp per output feature, 8 per block. Each block compacts the experts some token of the
//    pass activates (g > 0) in expert order, 256 experts per window (ballot prefix in shared memory), applies
//    NormSiLU + the scaled gate to a chunk of them into shared memory, then every warp multiplies its w_down row
//    (2*DE contiguous bytes per expert) by it, adds the shared expert and writes y. Each feature is summed by
//    one warp in a fixed order: the result is bit-identical between runs.
// decode_router (max_active only): one warp per router row (and one for mu), 8 rows per block; the last block
//    to arrive (an arrival counter it resets for the next call) applies the knobs per token (bias, threshold,
//    max_active by rank: ties to the lower index) and writes g.
// TT: tokens per pass (registers), the next power of two >= T; one module per TT (-DDECODE_TT).

#define DECODE_WARPS 8
#define DECODE_THREADS (DECODE_WARPS * 32)

// out[t] = x[t, :D] . w[:D] for t < ntok (0 beyond), by the whole block: every thread reads at most a few
// chunks (one round of loads up to D = 2048 with vec), then the warps' sums are added in warp order through
// red [DECODE_WARPS * TT], so every thread gets the same bits. Call from every thread of the block.
template <int TT, typename W>
__device__ __forceinline__ void block_dot(const W* w, const ELEM_T* x, long long xs, int ntok, int D, bool vec,
                                          float* red, float out[TT]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = 0.0f;
    thread_dot<TT>(w, x, xs, ntok, D, vec, threadIdx.x, DECODE_THREADS, acc);
#pragma unroll
    for (int t = 0; t < TT; ++t) {
        acc[t] = warp_sum(acc[t]);
        if (lane == 0) red[warp * TT + t] = acc[t];
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < TT; ++t) {
        float v = 0.0f;
#pragma unroll
        for (int w8 = 0; w8 < DECODE_WARPS; ++w8) v += red[w8 * TT + t];
        out[t] = v;
    }
    __syncthreads();  // red is free again
}

template <int TT>
__device__ void decode_router(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar,
                              const float* bias_v, float bias_s, float threshold, int max_active, int T, int N,
                              int D, int vec, float* g, float* gt, float* mu, unsigned* arrivals) {
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
    // The last block to arrive finishes the gates.
    if (!last_to_arrive(arrivals, gridDim.x)) return;
    for (int t = warp; t < T; t += DECODE_WARPS)
        finish_token_gates(g + (long long)t * N, gt, t, T, N, bias_v, bias_s, threshold, max_active);
}

template <int TT>
__device__ void decode_up(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar, const ELEM_T* w_up,
                          const ELEM_T* wsg, const ELEM_T* wsu, const float* bias_v, float bias_s, float threshold,
                          int gates_given, int T, int N, int D, int DS, int vec, float* g, float* mu, float* h,
                          float* hs) {
    constexpr int RB = DE / DECODE_WARPS;  // blocks per expert, one row per warp
    __shared__ float red[DECODE_WARPS * TT];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n_shared = (DS + DECODE_WARPS - 1) / DECODE_WARPS;
    const long long NDE = (long long)N * DE;
    float out[TT];
    if ((int)blockIdx.x < n_shared) {
        const int j = blockIdx.x * DECODE_WARPS + warp;
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
        return;
    }
    if ((int)blockIdx.x == n_shared) {
        if (gates_given) return;  // the router wrote mu
        for (int t0 = 0; t0 < T; t0 += TT) {
            const int ntok = min(TT, T - t0);
            block_dot<TT>(wbar, x + t0 * xs, xs, ntok, D, vec, red, out);
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (threadIdx.x == t && t < ntok) mu[t0 + t] = out[t];
        }
        return;
    }
    const int b = blockIdx.x - n_shared - 1;
    const int e = b / RB, rb = b % RB;
    // The expert's gates (the same value in every thread, so the exit below is block-uniform).
    bool any = false;
    for (int t0 = 0; t0 < T; t0 += TT) {
        const int ntok = min(TT, T - t0);
        if (gates_given) {
#pragma unroll
            for (int t = 0; t < TT; ++t) any |= t < ntok && g[(long long)(t0 + t) * N + e] > 0.0f;
        } else {
            block_dot<TT>(wr + (long long)e * D, x + t0 * xs, xs, ntok, D, vec, red, out);
            const float bias = bias_v ? bias_v[e] : bias_s;
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                const float gate = gate_knobs(out[t], bias, threshold);
                any |= t < ntok && gate > 0.0f;
                if (rb == 0 && threadIdx.x == t && t < ntok) g[(long long)(t0 + t) * N + e] = gate;
            }
        }
    }
    if (!any) return;
    const long long row = (long long)e * DE + rb * DECODE_WARPS + warp;
    for (int t0 = 0; t0 < T; t0 += TT) {
        const int ntok = min(TT, T - t0);
        warp_dot<TT>(w_up + row * D, x + t0 * xs, xs, ntok, D, vec, out);
#pragma unroll
        for (int t = 0; t < TT; ++t)
            if (lane == t && t < ntok) h[(t0 + t) * NDE + row] = out[t];
    }
}

// Shared memory of the down kernel: fp32 activations of SLOTS experts x TT tokens, rows padded by 4 floats.
#define DECODE_ACT_FLOATS 8192
#define DECODE_AST (DE + 4)

template <int TT>
__device__ void decode_down(const float* h, const float* hs, const float* mu, const float* g, const SCALE_T* scale,
                            const GAMMA_T* gamma, const ELEM_T* w_down, const ELEM_T* ws_down, int T, int N, int D,
                            int DS, int vec, float eps, ELEM_T* y, long long ys) {
    constexpr int SLOTS_FIT = DECODE_ACT_FLOATS / (TT * DECODE_AST);
    constexpr int SLOTS = SLOTS_FIT < 64 ? SLOTS_FIT : 64;
    static_assert(SLOTS >= 1, "decode_down: TT * DE too large for the activation buffer");
    constexpr int LPE = DE / 8;    // lanes per expert: 8 of its DE values each (a w_down row segment, or h)
    constexpr int EPP = 32 / LPE;  // experts per pass of a warp
    __shared__ __align__(16) float act[DECODE_ACT_FLOATS];
    __shared__ int ids[DECODE_THREADS];  // the active experts of one window of DECODE_THREADS experts
    __shared__ int warp_total[DECODE_WARPS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c = blockIdx.x * DECODE_WARPS + warp;
    const long long NDE = (long long)N * DE;
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
        for (int e0 = 0; e0 < N; e0 += DECODE_THREADS) {
            // Compact the window's experts some token of the pass activates into ids[0:cnt], in expert order.
            const int ee = e0 + threadIdx.x;
            bool on = false;
            if (ee < N)
                for (int t = 0; t < ntok; ++t) on |= g[(long long)(t0 + t) * N + ee] > 0.0f;
            const unsigned bits = __ballot_sync(0xffffffffu, on);
            __syncthreads();  // the previous window's ids and act are consumed
            if (lane == 0) warp_total[warp] = __popc(bits);
            __syncthreads();
            int pos = __popc(bits & ((1u << lane) - 1u)), cnt = 0;
#pragma unroll
            for (int w8 = 0; w8 < DECODE_WARPS; ++w8) {
                pos += w8 < warp ? warp_total[w8] : 0;
                cnt += warp_total[w8];
            }
            if (on) ids[pos] = ee;
            for (int s0 = 0; s0 < cnt; s0 += SLOTS) {
                const int ns = min(SLOTS, cnt - s0);
                __syncthreads();  // ids are written; the previous chunk is consumed
                // NormSiLU + scaled gate: LPE threads per (token, slot), 8 of its DE values each, so one round of
                // loads covers 256 / LPE pairs (all of them at T=1).
                for (int p0 = 0; p0 < ntok * ns; p0 += DECODE_THREADS / LPE) {
                    const int p = p0 + threadIdx.x / LPE, k = (threadIdx.x % LPE) * 8;
                    const bool live = p < ntok * ns;
                    // (t, s) = divmod(p, ns) without a division (ptxas calls a subroutine for one)
                    int t = 0, s = live ? p : 0;
#pragma unroll
                    for (int i = 1; i < TT; ++i)
                        if (s >= ns) {
                            s -= ns;
                            ++t;
                        }
                    const int e = live ? ids[s0 + s] : 0;
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
                        const float inv = rsqrtf(ss / DE + eps);
#pragma unroll
                        for (int j = 0; j < 8; ++j)
                            a[j] = gs == 0.0f ? 0.0f : silu(to_f(gamma[k + j]) * u[j] * inv) * gs;
                    }
                }
                __syncthreads();
                if (c < D) {
                    const ELEM_T* wrow = w_down + (long long)c * NDE;
                    const int sub = lane / LPE, kk = (lane % LPE) * 8;
#pragma unroll 4
                    for (int s = sub; s < ns; s += EPP) {
                        float wv[8];
                        load8(wrow + (long long)ids[s0 + s] * DE + kk, vec, wv);
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

// Minimum resident blocks per SM (register budgets): without one ptxas aims at the occupancy the shared memory
// allows and spills a few registers to local memory; these are the largest budgets-in-blocks that compile
// without spills for every dtype and DE (sm_87 / sm_90). The T=1 up kernel keeps ptxas' choice (40-46
// registers, no spill): it has the most blocks (~800 at 1.2b) and runs in one wave.
#define DECODE_BOUNDS_ROUTER __launch_bounds__(DECODE_THREADS, 1)
#define DECODE_BOUNDS_DOWN __launch_bounds__(DECODE_THREADS, 3)
#if DECODE_TT == 1
#define DECODE_BOUNDS_UP __launch_bounds__(DECODE_THREADS)
#else
#define DECODE_BOUNDS_UP __launch_bounds__(DECODE_THREADS, DECODE_TT == 4 ? 2 : 1)
#endif

#define DECODE_INSTANTIATE(TT)                                                                                    \
    extern "C" __global__ void DECODE_BOUNDS_ROUTER                                                              \
        deco_decode_router(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar,                 \
                           const float* bias_v, float bias_s, float threshold, int max_active, int T, int N,      \
                           int D, int vec, float* g, float* gt, float* mu, unsigned* arrivals) {                  \
        decode_router<TT>(x, xs, wr, wbar, bias_v, bias_s, threshold, max_active, T, N, D, vec, g, gt, mu,       \
                          arrivals);                                                                              \
    }                                                                                                             \
    extern "C" __global__ void DECODE_BOUNDS_UP                                                                  \
        deco_decode_up(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar, const ELEM_T* w_up, \
                       const ELEM_T* wsg, const ELEM_T* wsu, const float* bias_v, float bias_s, float threshold,  \
                       int gates_given, int T, int N, int D, int DS, int vec, float* g, float* mu, float* h,      \
                       float* hs) {                                                                               \
        decode_up<TT>(x, xs, wr, wbar, w_up, wsg, wsu, bias_v, bias_s, threshold, gates_given, T, N, D, DS, vec, \
                      g, mu, h, hs);                                                                              \
    }                                                                                                             \
    extern "C" __global__ void DECODE_BOUNDS_DOWN                                                                \
        deco_decode_down(const float* h, const float* hs, const float* mu, const float* g, const SCALE_T* scale, \
                         const GAMMA_T* gamma, const ELEM_T* w_down, const ELEM_T* ws_down, int T, int N, int D,  \
                         int DS, int vec, float eps, ELEM_T* y, long long ys) {                                   \
        decode_down<TT>(h, hs, mu, g, scale, gamma, w_down, ws_down, T, N, D, DS, vec, eps, y, ys);              \
    }

// One instantiation per compiled module (fast NVRTC compiles): DECODE_TT is set by geometry.compile_options.
#ifdef DECODE_TT
DECODE_INSTANTIATE(DECODE_TT)
#endif
