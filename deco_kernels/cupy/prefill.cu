// Prefill (T > DECODE_MAX_T): (token, expert) pairs grouped by expert on the device, tensor cores for the grouped
// GEMMs, no [T, N*DE] intermediate.
//
// 1. prefill_router: one block (one warp) per 16 tokens, all experts in chunks of 64: x tile @ w_router chunk^T on tensor
//    cores (16-bit x and router of one dtype: products exact in fp32, fp32 sums) or fp32 FMAs (fp32 x, or a router
//    of another dtype), then per token mu = x.wbar and the knobs; writes g [T, N] and its transpose gt [N, T].
// 2. group_tokens: one block per expert, compacts the tokens with gt[e, t] > 0 into tokens[e, :counts[e]] in
//    token order (ballot prefix sums).
// 3. prefill_expert: one block per (expert, tile of BM of its tokens); tiles past the expert's count exit at once.
//    Gathers the tokens' rows of x, multiplies by the expert's [DE, d] slab of w_up, applies NormSiLU (mu from
//    the router) and the scaled gate in registers, keeps the activation tile in shared memory and multiplies it
//    by the expert's block of w_down, BD output features at a time, adding into the fp32 accumulator yacc with
//    atomics (seeded with the shared expert by the launcher; red.global.add.v4.f32 on sm_90). Each output
//    element gets one add per active expert of its token in no fixed order, so results can differ between runs
//    in the last bits of fp32 (as on the Triton path).

#define PF_BK (64 / (int)sizeof(ELEM_T))     // K step: 64 bytes of x per row
#define PF_PAD (16 / (int)sizeof(ELEM_T))    // shared-tile row padding (keeps rows 16-byte aligned)
#define PF_MT (DE <= 64 ? 2 : 1)             // 16-row m-tiles per warp
#define PF_SMEM_LIMIT (48 * 1024 - 2560)     // static shared memory, less the per-row arrays

#define ROUTER_WARPS 1
#define ROUTER_MT 1
#define ROUTER_NT 8                           // 64 experts per chunk
#define ROUTER_BM (ROUTER_WARPS * ROUTER_MT * 16)
#define ROUTER_BK (128 / (int)sizeof(ELEM_T))  // K step: 128 bytes of x per row (few, long steps per block)
#define ROUTER_STAGES gemm_stages<ELEM_T, ROUTER_T, ROUTER_WARPS, ROUTER_MT, ROUTER_NT, ROUTER_BK>(PF_SMEM_LIMIT)

struct RowsOf {  // rows base + r*stride for r < n, else invalid
    long long stride;
    int n;
    __device__ long long operator()(int r) const { return r < n ? r * stride : -1; }
};
struct RowsAt {  // rows at offsets held in shared memory (-1: invalid)
    const long long* off;
    __device__ long long operator()(int r) const { return off[r]; }
};

#ifdef PREFILL_WARPS
extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
    deco_prefill_router(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar, const float* bias_v,
                        float bias_s, float threshold, int max_active, int T, int N, int D, int vec, float* g,
                        float* gt, float* mu) {
    constexpr int S = ROUTER_STAGES;
    constexpr int SMEM = S * gemm_stage_bytes<ELEM_T, ROUTER_T, ROUTER_WARPS, ROUTER_MT, ROUTER_NT, ROUTER_BK>();
    __shared__ __align__(16) unsigned char smem[SMEM];
    __shared__ long long a_off[ROUTER_BM];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t0 = blockIdx.x * ROUTER_BM;
    for (int i = threadIdx.x; i < ROUTER_BM; i += blockDim.x) a_off[i] = t0 + i < T ? (t0 + i) * xs : -1;
    __syncthreads();
    const int gq = lane >> 2, q = lane & 3;
    for (int n0 = 0; n0 < N; n0 += ROUTER_NT * 8) {
        float acc[ROUTER_MT][ROUTER_NT][4];
        gemm_global<ELEM_T, ROUTER_T, ROUTER_WARPS, ROUTER_MT, ROUTER_NT, ROUTER_BK, S>(
            acc, x, RowsAt{a_off}, wr + (long long)n0 * D, RowsOf{D, N - n0}, D, vec, smem);
#pragma unroll
        for (int mt = 0; mt < ROUTER_MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < ROUTER_NT; ++nt)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int t = t0 + warp * ROUTER_MT * 16 + mt * 16 + gq + (j >> 1) * 8;
                    const int n = n0 + nt * 8 + 2 * q + (j & 1);
                    if (t < T && n < N) g[(long long)t * N + n] = acc[mt][nt][j];
                }
    }
    __threadfence();  // the logits are read back through L2 (ld.cg) by other warps of the block
    __syncthreads();
    for (int i = warp; i < ROUTER_BM; i += ROUTER_WARPS) {
        const int t = t0 + i;
        if (t >= T) break;
        float m[1];
        warp_dot<1>(wbar, x + t * xs, xs, 1, D, vec, m);
        if (lane == 0) mu[t] = m[0];
        finish_token_gates(g + (long long)t * N, gt, t, T, N, bias_v, bias_s, threshold, max_active);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    deco_group_tokens(const float* gt, int T, int* tokens, int* counts) {
    __shared__ int warp_total[8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long e = blockIdx.x;
    int base = 0;
    for (int t0 = 0; t0 < T; t0 += 256) {
        const int t = t0 + threadIdx.x;
        const bool on = t < T && gt[e * T + t] > 0.0f;
        const unsigned bits = __ballot_sync(0xffffffffu, on);
        if (lane == 0) warp_total[warp] = __popc(bits);
        __syncthreads();
        int pos = base + __popc(bits & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) pos += warp_total[w];
        if (on) tokens[e * T + pos] = t;
        for (int w = 0; w < 8; ++w) base += warp_total[w];
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[e] = base;
}
#endif  // PREFILL_WARPS

// Output features per step of the down-projection: the widest of 64 / 32 / 16 whose tiles fit.
template <int WARPS>
__host__ __device__ constexpr int pf_bd() {
    constexpr int bm = WARPS * PF_MT * 16, es = sizeof(ELEM_T), row = (DE + PF_PAD) * es;
    return bm * row + 2 * 64 * row <= PF_SMEM_LIMIT ? 64 : bm * row + 2 * 32 * row <= PF_SMEM_LIMIT ? 32 : 16;
}

// Pipeline depth of the up-projection: as deep as fits (the down phase reuses the same buffers).
template <int WARPS>
__host__ __device__ constexpr int pf_stages() {
    return gemm_stages<ELEM_T, ELEM_T, WARPS, PF_MT, DE / 8, PF_BK>(PF_SMEM_LIMIT);
}

template <int WARPS>
__host__ __device__ constexpr int pf_smem_bytes() {
    constexpr int up = pf_stages<WARPS>() * gemm_stage_bytes<ELEM_T, ELEM_T, WARPS, PF_MT, DE / 8, PF_BK>();
    constexpr int down = (WARPS * PF_MT * 16 + 2 * pf_bd<WARPS>()) * (DE + PF_PAD) * (int)sizeof(ELEM_T);
    return up > down ? up : down;
}

// yacc[row, c..c+3] += v (one vector reduction on sm_90, else four).
__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d, bool vec4) {
#if __CUDA_ARCH__ >= 900
    if (vec4) {
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
                     : "memory");
        return;
    }
#endif
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
    atomicAdd(p + 2, c);
    atomicAdd(p + 3, d);
}

template <int WARPS>
__device__ void prefill_expert(const ELEM_T* x, long long xs, const ELEM_T* w_up, const ELEM_T* w_down,
                               const int* tokens, const int* counts, const float* g, const float* mu,
                               const SCALE_T* scale, const GAMMA_T* gamma, int T, int N, int D, int vec, int vec4,
                               float eps, float* yacc) {
    constexpr int MT = PF_MT, NT = DE / 8, BM = WARPS * MT * 16, NTH = WARPS * 32;
    constexpr int BD = pf_bd<WARPS>(), SE = DE + PF_PAD;
    static_assert(pf_smem_bytes<WARPS>() <= PF_SMEM_LIMIT, "prefill_expert: shared memory over 48 KB");
    __shared__ __align__(16) unsigned char smem[pf_smem_bytes<WARPS>()];
    __shared__ long long a_off[BM];
    __shared__ int tok_s[BM];
    __shared__ float mu_s[BM], gs_s[BM];
    const int e = blockIdx.x, m0 = blockIdx.y * BM;
    const int cnt = counts[e];
    if (m0 >= cnt) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, q = lane & 3;
    const long long NDE = (long long)N * DE;
    const float scale_e = to_f(scale[e]);
    for (int i = threadIdx.x; i < BM; i += NTH) {
        const bool valid = m0 + i < cnt;
        const int tok = valid ? tokens[(long long)e * T + m0 + i] : -1;
        tok_s[i] = tok;
        a_off[i] = valid ? tok * xs : -1;
        mu_s[i] = valid ? mu[tok] : 0.0f;
        gs_s[i] = valid ? g[(long long)tok * N + e] * scale_e : 0.0f;
    }
    __syncthreads();

    // Up-projection and NormSiLU: h [BM, DE] in registers, one warp per 16*MT rows.
    float acc[MT][NT][4];
    // (gemm_global ends with a barrier: its buffers become the activation tile and the w_down tiles)
    gemm_global<ELEM_T, ELEM_T, WARPS, MT, NT, PF_BK, pf_stages<WARPS>()>(
        acc, x, RowsAt{a_off}, w_up + (long long)e * DE * D, RowsOf{D, DE}, D, vec, smem);
    ELEM_T* sact = reinterpret_cast<ELEM_T*>(smem);
    ELEM_T* sw = sact + BM * SE;
    const int arow0 = warp * MT * 16;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = arow0 + mt * 16 + gq + half * 8;
            const float m = mu_s[r];
            float ss = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const float u = acc[mt][nt][half * 2 + j] - m;
                    acc[mt][nt][half * 2 + j] = u;
                    ss += u * u;
                }
            ss += __shfl_xor_sync(0xffffffffu, ss, 1);
            ss += __shfl_xor_sync(0xffffffffu, ss, 2);
            const float inv = 1.0f / sqrtf(ss / DE + eps), gs = gs_s[r];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int col = nt * 8 + 2 * q + j;
                    const float a = gs == 0.0f ? 0.0f : silu(to_f(gamma[col]) * acc[mt][nt][half * 2 + j] * inv) * gs;
                    sact[r * SE + col] = from_f<ELEM_T>(a);
                }
        }

    // Down-projection: yacc[tok, c0:c0+BD] += act [BM, DE] @ w_down[c0:c0+BD, e*DE:(e+1)*DE]^T.
    const ELEM_T* wd = w_down + (long long)e * DE;
    const int nch = (D + BD - 1) / BD;
    load_tile<ELEM_T, BD, DE, NTH>(sw, SE, wd, RowsOf{NDE, D}, 0, DE, vec);
    cp_async_commit();
    for (int ch = 0; ch < nch; ++ch) {
        const int c0 = ch * BD;
        if (ch + 1 < nch)
            load_tile<ELEM_T, BD, DE, NTH>(sw + ((ch + 1) & 1) * BD * SE, SE, wd + (long long)(c0 + BD) * NDE,
                                           RowsOf{NDE, D - c0 - BD}, 0, DE, vec);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        float out[MT][BD / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BD / 8; ++nt)
#pragma unroll
                for (int j = 0; j < 4; ++j) out[mt][nt][j] = 0.0f;
        mma_tile<ELEM_T, ELEM_T, MT, BD / 8>(out, sact, SE, arow0, sw + (ch & 1) * BD * SE, SE, DE / 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BD / 8; ++nt) {
                // Four consecutive columns per thread: even q takes row g from its odd neighbour, odd q takes
                // row g+8 from its even neighbour.
                float* o = out[mt][nt];
                const float s0 = __shfl_xor_sync(0xffffffffu, (q & 1) ? o[0] : o[2], 1);
                const float s1 = __shfl_xor_sync(0xffffffffu, (q & 1) ? o[1] : o[3], 1);
                const int r = arow0 + mt * 16 + gq + ((q & 1) ? 8 : 0);
                const int col = c0 + nt * 8 + 2 * (q & ~1);
                const int tok = tok_s[r];
                if (tok >= 0 && col < D) {
                    float* p = yacc + (long long)tok * D + col;
                    const float v0 = (q & 1) ? s0 : o[0], v1 = (q & 1) ? s1 : o[1];
                    const float v2 = (q & 1) ? o[2] : s0, v3 = (q & 1) ? o[3] : s1;
                    if (vec4) {
                        red_add4(p, v0, v1, v2, v3, true);
                    } else {
                        const float v[4] = {v0, v1, v2, v3};
#pragma unroll
                        for (int j = 0; j < 4; ++j)
                            if (col + j < D) atomicAdd(p + j, v[j]);
                    }
                }
            }
        __syncthreads();
    }
    cp_async_wait<0>();
}

#define PREFILL_INSTANTIATE(W)                                                                                   \
    extern "C" __global__ void __launch_bounds__(W * 32)                                                        \
        deco_prefill_expert(const ELEM_T* x, long long xs, const ELEM_T* w_up, const ELEM_T* w_down,       \
                                 const int* tokens, const int* counts, const float* g, const float* mu,         \
                                 const SCALE_T* scale, const GAMMA_T* gamma, int T, int N, int D, int vec,      \
                                 int vec4, float eps, float* yacc) {                                            \
        /* a tile that does not fit is never launched (geometry.prefill_warps) */                                \
        if constexpr (pf_smem_bytes<W>() <= PF_SMEM_LIMIT)                                                      \
            prefill_expert<W>(x, xs, w_up, w_down, tokens, counts, g, mu, scale, gamma, T, N, D, vec, vec4, eps, \
                              yacc);                                                                             \
    }

// One tile size per compiled module (fast NVRTC compiles): PREFILL_WARPS is set by geometry.compile_options.
#ifdef PREFILL_WARPS
PREFILL_INSTANTIATE(PREFILL_WARPS)
#endif
