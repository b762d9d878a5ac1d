// Prefill (T > DECODE_MAX_T): (token, expert) pairs grouped by expert on the device, tensor cores for the grouped
// GEMMs, no [T, N*DE] intermediate beyond the activations of the active pairs. Four launches, fixed grids whose
// surplus blocks exit at once (no host synchronisation: CUDA-graph capturable):
//
// 1. prefill_router: one block of ROUTER_WARPS warps per ROUTER_BM tokens (a warp per 16 of them), all experts
//    in chunks of 128: x tile @ w_router chunk^T on tensor cores (16-bit x and router of one dtype: products exact
//    in fp32, fp32 sums) or fp32 FMAs (fp32 x, or a router of another dtype). mu = x.wbar is summed in fp32 from
//    the same x tiles while the first chunk streams through shared memory. Then per token the knobs (one warp per
//    token); writes g [T, N], its transpose gt [N, T] and mu [T].
// 2. group_tokens: one block per expert, compacts the tokens with gt[e, t] > 0 into tokens[e, :counts[e]] in
//    token order (ballot prefix sums).
// 3. prefill_up: one block per (expert, tile of BM of its tokens). Gathers the tokens' rows of x, multiplies by
//    the expert's [DE, d] slab of w_up, applies NormSiLU (mu from the router) and the scaled gate in registers
//    and stores the activations, in x's dtype, to act [N, T, DE] (rows < counts[e] of expert e, as the Triton
//    path's act buffer).
// 4. prefill_down: one block per (expert, tile of BM of its tokens, block of fb output features): the act tile
//    stays in shared memory while w_down streams through in BD-feature chunks (cp.async pipeline); each warp
//    stages its [16, BD] fp32 result in shared memory and adds whole row segments (BD * 4 contiguous bytes) into
//    the fp32 accumulator yacc (seeded with the shared expert by the launcher) with red.global.add.v4.f32 on
//    sm_90 (scalar atomics elsewhere, or when d % 4 != 0). Each output element gets one add per active expert of
//    its token in no fixed order, so results can differ between runs in the last bits of fp32 (as on Triton).

#define PF_BK (64 / (int)sizeof(ELEM_T))     // K step: 64 bytes of x per row
#define PF_PAD (16 / (int)sizeof(ELEM_T))    // shared-tile row padding (keeps rows 16-byte aligned)
#define PF_MT (DE <= 64 ? 2 : 1)             // 16-row m-tiles per warp
#define PF_SMEM_LIMIT (48 * 1024 - 2560)     // static shared memory, less the per-row arrays

#define PF_BD 64                             // output features per step of the down-projection
#define PF_OUT_PAD 8                         // fp32 staging row padding (conflict-free float2 writes)
#define PF_DOWN_SMEM_LIMIT (96 * 1024)       // dynamic shared memory of prefill_down (two blocks per SM on Orin)

#define ROUTER_WARPS 4
#define ROUTER_MT 1
#define ROUTER_NT 16                          // 128 experts per chunk (one pass over x up to N = 128)
#define ROUTER_BM (ROUTER_WARPS * ROUTER_MT * 16)
#define ROUTER_BK (64 / (int)sizeof(ELEM_T))  // K step: 64 bytes of x per row (four stages fit)
#define ROUTER_SMEM_LIMIT (48 * 1024 - 8 * ROUTER_BM)  // static shared memory less a_off
#define ROUTER_STAGES gemm_stages<ELEM_T, ROUTER_T, ROUTER_WARPS, ROUTER_MT, ROUTER_NT, ROUTER_BK>(ROUTER_SMEM_LIMIT)

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
// mu += x[row, k0 : k0 + ROUTER_BK] . wbar[same] for this thread's half row of the A tile (two threads per row).
struct RouterMu {
    const float* wbar;
    int D;
    bool vec;
    float* sum;
    __device__ void operator()(const ELEM_T* sa, int sas, int k0) const {
        constexpr int HALF = ROUTER_BK / 2;
        const ELEM_T* a = sa + (threadIdx.x >> 1) * sas + (threadIdx.x & 1) * HALF;
        const int k = k0 + (threadIdx.x & 1) * HALF;
        float s = *sum;
        if (vec) {  // D % 8 == 0: a chunk of 8 is all in or all out
#pragma unroll
            for (int j = 0; j < HALF; j += 8)
                if (k + j < D) {
                    float av[8], wv[8];
                    load8(a + j, true, av);
                    load8(wbar + k + j, true, wv);
#pragma unroll
                    for (int i = 0; i < 8; ++i) s += av[i] * wv[i];
                }
        } else {
            for (int j = 0; j < HALF && k + j < D; ++j) s += to_f(a[j]) * wbar[k + j];
        }
        *sum = s;
    }
};

extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
    deco_prefill_router(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar, const float* bias_v,
                        float bias_s, float threshold, int max_active, int T, int N, int D, int vec, float* g,
                        float* gt, float* mu) {
    constexpr int S = ROUTER_STAGES;
    constexpr int SMEM = S * gemm_stage_bytes<ELEM_T, ROUTER_T, ROUTER_WARPS, ROUTER_MT, ROUTER_NT, ROUTER_BK>();
    static_assert(SMEM <= ROUTER_SMEM_LIMIT, "prefill_router: shared memory over 48 KB");
    static_assert(ROUTER_BM * 2 == ROUTER_WARPS * 32 && ROUTER_BK % 16 == 0, "RouterMu: two threads per row");
    __shared__ __align__(16) unsigned char smem[SMEM];
    __shared__ long long a_off[ROUTER_BM];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t0 = blockIdx.x * ROUTER_BM;
    for (int i = threadIdx.x; i < ROUTER_BM; i += blockDim.x) a_off[i] = t0 + i < T ? (t0 + i) * xs : -1;
    __syncthreads();
    const int gq = lane >> 2, q = lane & 3;
    float mu_sum = 0.0f;
    for (int n0 = 0; n0 < N; n0 += ROUTER_NT * 8) {
        float acc[ROUTER_MT][ROUTER_NT][4];
        const ROUTER_T* wc = wr + (long long)n0 * D;
        if (n0 == 0)  // mu from the first chunk's x tiles
            gemm_global<ELEM_T, ROUTER_T, ROUTER_WARPS, ROUTER_MT, ROUTER_NT, ROUTER_BK, S>(
                acc, x, RowsAt{a_off}, wc, RowsOf{D, N - n0}, D, vec, smem, RouterMu{wbar, D, vec != 0, &mu_sum});
        else
            gemm_global<ELEM_T, ROUTER_T, ROUTER_WARPS, ROUTER_MT, ROUTER_NT, ROUTER_BK, S>(
                acc, x, RowsAt{a_off}, wc, RowsOf{D, N - n0}, D, vec, smem);
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
    mu_sum += __shfl_xor_sync(0xffffffffu, mu_sum, 1);
    if (!(threadIdx.x & 1) && t0 + (threadIdx.x >> 1) < T) mu[t0 + (threadIdx.x >> 1)] = mu_sum;
    __threadfence();  // the logits are read back through L2 (ld.cg) by other warps of the block
    __syncthreads();
    for (int i = warp; i < ROUTER_BM; i += ROUTER_WARPS) {
        const int t = t0 + i;
        if (t >= T) break;
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

// Pipeline depth of prefill_up: as deep as fits in static shared memory.
template <int WARPS>
__host__ __device__ constexpr int pf_up_stages() {
    return gemm_stages<ELEM_T, ELEM_T, WARPS, PF_MT, DE / 8, PF_BK>(PF_SMEM_LIMIT);
}

template <int WARPS>
__host__ __device__ constexpr int pf_up_smem_bytes() {
    return pf_up_stages<WARPS>() * gemm_stage_bytes<ELEM_T, ELEM_T, WARPS, PF_MT, DE / 8, PF_BK>();
}

// Dynamic shared memory of prefill_down with S w_down stages: the act tile, S chunks of w_down, and each warp's
// [16, BD] fp32 staging tile.
template <int WARPS>
__host__ __device__ constexpr int pf_down_smem_bytes(int S) {
    constexpr int bm = WARPS * PF_MT * 16, row = (DE + PF_PAD) * (int)sizeof(ELEM_T);
    return (bm + S * PF_BD) * row + WARPS * 16 * (PF_BD + PF_OUT_PAD) * 4;
}

template <int WARPS>
__host__ __device__ constexpr int pf_down_stages() {
    return pf_down_smem_bytes<WARPS>(3) <= PF_DOWN_SMEM_LIMIT ? 3 : 2;
}

// p[0..3] += v, p 16-byte aligned (one vector reduction on sm_90, else four).
__device__ __forceinline__ void red_add4(float* p, float4 v) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                 : "memory");
#else
    atomicAdd(p, v.x);
    atomicAdd(p + 1, v.y);
    atomicAdd(p + 2, v.z);
    atomicAdd(p + 3, v.w);
#endif
}

// p[0..1] = (a, b) in one store (p is 4-byte aligned for 16-bit types, 8-byte for fp32).
__device__ __forceinline__ void store2(bf16_t* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = (unsigned)from_f<bf16_t>(a).v | ((unsigned)from_f<bf16_t>(b).v << 16);
}
__device__ __forceinline__ void store2(f16_t* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = (unsigned)from_f<f16_t>(a).v | ((unsigned)from_f<f16_t>(b).v << 16);
}
__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }

template <int WARPS>
__device__ void prefill_up(const ELEM_T* x, long long xs, const ELEM_T* w_up, const int* tokens, const int* counts,
                           const float* g, const float* mu, const SCALE_T* scale, const GAMMA_T* gamma, int T, int N,
                           int D, int vec, float eps, ELEM_T* act) {
    constexpr int MT = PF_MT, NT = DE / 8, BM = WARPS * MT * 16, NTH = WARPS * 32;
    static_assert(pf_up_smem_bytes<WARPS>() <= PF_SMEM_LIMIT, "prefill_up: shared memory over 48 KB");
    __shared__ __align__(16) unsigned char smem[pf_up_smem_bytes<WARPS>()];
    __shared__ long long a_off[BM];
    __shared__ float mu_s[BM], gs_s[BM];
    const int e = blockIdx.x, m0 = blockIdx.y * BM;
    const int cnt = counts[e];
    if (m0 >= cnt) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, q = lane & 3;
    const float scale_e = to_f(scale[e]);
    for (int i = threadIdx.x; i < BM; i += NTH) {
        const bool valid = m0 + i < cnt;
        const int tok = valid ? tokens[(long long)e * T + m0 + i] : -1;
        a_off[i] = valid ? tok * xs : -1;
        mu_s[i] = valid ? mu[tok] : 0.0f;
        gs_s[i] = valid ? g[(long long)tok * N + e] * scale_e : 0.0f;
    }
    __syncthreads();

    // h [BM, DE] in registers, one warp per 16*MT rows; NormSiLU and the gate per row, stored pairwise.
    float acc[MT][NT][4];
    gemm_global<ELEM_T, ELEM_T, WARPS, MT, NT, PF_BK, pf_up_stages<WARPS>()>(
        acc, x, RowsAt{a_off}, w_up + (long long)e * DE * D, RowsOf{D, DE}, D, vec, smem);
    const int arow0 = warp * MT * 16;
    ELEM_T* act_e = act + ((long long)e * T + m0) * DE;
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
            if (m0 + r >= cnt) continue;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * q;
                float a[2];
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    a[j] = gs == 0.0f ? 0.0f : silu(to_f(gamma[col + j]) * acc[mt][nt][half * 2 + j] * inv) * gs;
                store2(act_e + (long long)r * DE + col, a[0], a[1]);
            }
        }
}

template <int WARPS>
__device__ void prefill_down(const ELEM_T* act, const ELEM_T* w_down, const int* tokens, const int* counts, int T,
                             int N, int D, int fb, int vec, int vec4, float* yacc) {
    constexpr int MT = PF_MT, BM = WARPS * MT * 16, NTH = WARPS * 32, BD = PF_BD, SE = DE + PF_PAD;
    constexpr int SO = BD + PF_OUT_PAD, S = pf_down_stages<WARPS>();
    constexpr int LPR = BD / 4, RPI = 32 / LPR;  // lanes per staged row (4 floats each), rows per pass
    static_assert(pf_down_smem_bytes<WARPS>(S) <= PF_DOWN_SMEM_LIMIT, "prefill_down: shared memory over budget");
    extern __shared__ __align__(16) unsigned char dsmem[];
    __shared__ int tok_s[BM];
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < pf_down_smem_bytes<WARPS>(S)) __trap();  // launched with less than geometry.expert_tile's down_smem
    const int e = blockIdx.x, m0 = blockIdx.y * BM, c_lo = blockIdx.z * fb;
    const int cnt = counts[e];
    if (m0 >= cnt || c_lo >= D) return;
    const int c_hi = min(D, c_lo + fb), nch = (c_hi - c_lo + BD - 1) / BD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, q = lane & 3;
    const long long NDE = (long long)N * DE;
    ELEM_T* sact = reinterpret_cast<ELEM_T*>(dsmem);
    ELEM_T* sw = sact + BM * SE;
    float* sout = reinterpret_cast<float*>(sw + S * BD * SE) + warp * 16 * SO;
    for (int i = threadIdx.x; i < BM; i += NTH) tok_s[i] = m0 + i < cnt ? tokens[(long long)e * T + m0 + i] : -1;

    // act rows of the tile (rows past the count are zeros) with the first chunks of w_down[c, e*DE : (e+1)*DE].
    const ELEM_T* wd = w_down + (long long)e * DE;
    auto load_w = [&](int ch) {
        const int c0 = c_lo + ch * BD;
        load_tile<ELEM_T, BD, DE, NTH>(sw + (ch % S) * BD * SE, SE, wd + c0 * NDE, RowsOf{NDE, c_hi - c0}, 0, DE,
                                       vec);
    };
    load_tile<ELEM_T, BM, DE, NTH>(sact, SE, act + ((long long)e * T + m0) * DE, RowsOf{DE, cnt - m0}, 0, DE, true);
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < nch) load_w(s);
        cp_async_commit();
    }
    const int arow0 = warp * MT * 16;
    for (int ch = 0; ch < nch; ++ch) {
        cp_async_wait<S - 2>();  // chunk ch (and the act tile) landed
        __syncthreads();         // ... for every thread; chunk ch-1's buffer is free
        if (ch + S - 1 < nch) load_w(ch + S - 1);
        cp_async_commit();
        const int c0 = c_lo + ch * BD;
        float out[MT][BD / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BD / 8; ++nt)
#pragma unroll
                for (int j = 0; j < 4; ++j) out[mt][nt][j] = 0.0f;
        mma_tile<ELEM_T, ELEM_T, MT, BD / 8>(out, sact, SE, arow0, sw + (ch % S) * BD * SE, SE, DE / 16);
        // Through the warp's staging tile, so that each reduction covers 16 contiguous bytes and a pass of the
        // warp RPI whole row segments of BD features (full 128-byte lines) instead of 16 rows x 32 bytes.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int nt = 0; nt < BD / 8; ++nt) {
                *reinterpret_cast<float2*>(sout + gq * SO + nt * 8 + 2 * q) = make_float2(out[mt][nt][0], out[mt][nt][1]);
                *reinterpret_cast<float2*>(sout + (gq + 8) * SO + nt * 8 + 2 * q) =
                    make_float2(out[mt][nt][2], out[mt][nt][3]);
            }
            __syncwarp();
            const int cl = (lane % LPR) * 4, col = c0 + cl;
#pragma unroll
            for (int i = 0; i < 16 / RPI; ++i) {
                const int r = lane / LPR + i * RPI;
                const int tok = tok_s[arow0 + mt * 16 + r];
                if (tok < 0 || col >= c_hi) continue;
                const float4 v = *reinterpret_cast<const float4*>(sout + r * SO + cl);
                float* p = yacc + (long long)tok * D + col;
                if (vec4) {
                    red_add4(p, v);
                } else {  // d % 4 != 0: the row segment may end inside the four
                    atomicAdd(p, v.x);
                    if (col + 1 < c_hi) atomicAdd(p + 1, v.y);
                    if (col + 2 < c_hi) atomicAdd(p + 2, v.z);
                    if (col + 3 < c_hi) atomicAdd(p + 3, v.w);
                }
            }
            __syncwarp();
        }
    }
    cp_async_wait<0>();
}

// One tile size per compiled module (fast NVRTC compiles): PREFILL_WARPS is set by geometry.compile_options. A
// tile that does not fit is never launched (geometry.prefill_warps), so its kernels compile empty.
#ifdef PREFILL_WARPS
extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32)
    deco_prefill_up(const ELEM_T* x, long long xs, const ELEM_T* w_up, const int* tokens, const int* counts,
                    const float* g, const float* mu, const SCALE_T* scale, const GAMMA_T* gamma, int T, int N, int D,
                    int vec, float eps, ELEM_T* act) {
    if constexpr (pf_up_smem_bytes<PREFILL_WARPS>() <= PF_SMEM_LIMIT)
        prefill_up<PREFILL_WARPS>(x, xs, w_up, tokens, counts, g, mu, scale, gamma, T, N, D, vec, eps, act);
}

// (min blocks 2: at most 255 registers either way, but ptxas -O3 spills the 16-bit de=32 tile on sm_90 without it)
extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32, 2)
    deco_prefill_down(const ELEM_T* act, const ELEM_T* w_down, const int* tokens, const int* counts, int T, int N,
                      int D, int fb, int vec, int vec4, float* yacc) {
    if constexpr (pf_down_smem_bytes<PREFILL_WARPS>(pf_down_stages<PREFILL_WARPS>()) <= PF_DOWN_SMEM_LIMIT)
        prefill_down<PREFILL_WARPS>(act, w_down, tokens, counts, T, N, D, fb, vec, vec4, yacc);
}
#endif
