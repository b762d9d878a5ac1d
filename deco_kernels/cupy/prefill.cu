// Prefill (T > DECODE_MAX_T): (token, expert) pairs grouped by expert on the device, tensor cores for the grouped
// GEMMs, no [T, N*DE] intermediate beyond the activations of the active pairs. Four launches, fixed grids whose
// surplus blocks exit at once (no host synchronisation: CUDA-graph capturable):
//
// 1. prefill_router: grid (expert chunks + 1, token blocks). Block (c, b) multiplies the x tile of ROUTER_BM
//    tokens by chunk c (ROUTER_EXPERTS experts) of w_router on tensor cores (16-bit x and router of one dtype:
//    products exact in fp32, fp32 sums) or with fp32 FMAs (fp32 x, or a router of another dtype) and writes the
//    gates relu(r + bias) cut at threshold to g [T, N] and its transpose gt [N, T]. The block after the last
//    chunk computes mu = x.wbar [T] in fp32 for the token block. With max_active the chunks write the raw
//    logits instead, and the last chunk block of a token block to finish (an arrival counter per token block)
//    applies the knobs and the top-k to all of its tokens, one warp per token.
// 2. group_tokens: one block per expert, compacts the tokens with gt[e, t] > 0 into tokens[e, :counts[e]] in
//    token order (ballot prefix sums).
// 3. prefill_up: one block per (expert, tile of BM of its tokens). Gathers the tokens' rows of x, multiplies by
//    the expert's [DE, d] slab of w_up through a PF_UP_STAGES-deep pipeline of 128-byte K steps in dynamic shared
//    memory, applies NormSiLU (mu from the router) and the scaled gate in registers and stores the activations,
//    in x's dtype, to act [N, T, DE] (rows < counts[e] of expert e, as the Triton path's act buffer).
// 4. prefill_down: one block per (expert, tile of BM of its tokens, block of fb output features): the act tile
//    stays in shared memory while w_down streams through in BD-feature chunks (cp.async pipeline); each warp
//    stages its [16, BD] fp32 result in shared memory and adds whole row segments (BD * 4 contiguous bytes) into
//    the fp32 accumulator yacc (seeded with the shared expert by the launcher) with red.global.add.v4.f32 on
//    sm_90 (scalar atomics elsewhere, or when d % 4 != 0). Each output element gets one add per active expert of
//    its token in no fixed order, so results can differ between runs in the last bits of fp32 (as on Triton).
//
// Set by geometry.compile_options with PREFILL_WARPS: PF_MT (16-row m-tiles per warp of prefill_up / down),
// ROUTER_EXPERTS (a multiple of 16) and PF_UP_STAGES.

#define PF_UP_BK (128 / (int)sizeof(ELEM_T))  // K step of prefill_up: 128 bytes of x per row
#define PF_PAD (16 / (int)sizeof(ELEM_T))     // shared-tile row padding (keeps rows 16-byte aligned)
#define PF_DYN_SMEM_LIMIT (96 * 1024)         // dynamic shared memory of prefill_up / prefill_down (Orin: 163 KB)

#define PF_BD 64                              // output features per step of the down-projection
#define PF_OUT_PAD 8                          // fp32 staging row padding (conflict-free float2 writes)

#define ROUTER_WARPS 4
#define ROUTER_BM (ROUTER_WARPS * 16)         // tokens per block, 16 per warp
#define ROUTER_BK (128 / (int)sizeof(ELEM_T))  // K step: 128 bytes of x per row
#define ROUTER_SMEM_LIMIT (48 * 1024 - 8 * ROUTER_BM)  // static shared memory less a_off
#define ROUTER_STAGES \
    gemm_stages<ELEM_T, ROUTER_T, ROUTER_WARPS, 1, ROUTER_EXPERTS / 8, ROUTER_BK>(ROUTER_SMEM_LIMIT)
#if defined(PREFILL_WARPS) && !(defined(PF_MT) && defined(ROUTER_EXPERTS) && defined(PF_UP_STAGES))
#error "geometry.compile_options sets PF_MT, ROUTER_EXPERTS and PF_UP_STAGES with PREFILL_WARPS"
#endif

struct RowsOf {  // rows base + r*stride for r < n, else invalid
    long long stride;
    int n;
    __device__ long long operator()(int r) const { return r < n ? r * stride : -1; }
};
struct RowsAt {  // rows at offsets held in shared memory (-1: invalid)
    const long long* off;
    __device__ long long operator()(int r) const { return off[r]; }
};

// Traps unless the launch gave the kernel at least `bytes` of dynamic shared memory (geometry's up_smem /
// down_smem for the tile).
__device__ __forceinline__ void require_dynamic_smem(unsigned bytes) {
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < bytes) __trap();
}

// Everything below is compiled only into prefill modules (PREFILL_WARPS set).
#ifdef PREFILL_WARPS
extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
    deco_prefill_router(const ELEM_T* x, long long xs, const ROUTER_T* wr, const float* wbar, const float* bias_v,
                        float bias_s, float threshold, int max_active, int T, int N, int D, int vec, float* g,
                        float* gt, float* mu, unsigned* arrivals) {
    constexpr int S = ROUTER_STAGES, NT = ROUTER_EXPERTS / 8;
    constexpr int SMEM = S * gemm_stage_bytes<ELEM_T, ROUTER_T, ROUTER_WARPS, 1, NT, ROUTER_BK>();
    static_assert(SMEM <= ROUTER_SMEM_LIMIT, "prefill_router: shared memory over 48 KB");
    __shared__ __align__(16) unsigned char smem[SMEM];
    __shared__ long long a_off[ROUTER_BM];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t0 = blockIdx.y * ROUTER_BM, n0 = blockIdx.x * ROUTER_EXPERTS;
    if (n0 >= N) {  // the block after the last chunk: mu, 8 tokens per warp_dot
        for (int t = t0 + warp * 8; t < min(T, t0 + ROUTER_BM); t += ROUTER_WARPS * 8) {
            float out[8];
            warp_dot<8>(wbar, x + t * xs, xs, min(8, T - t), D, vec, out);
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (lane == i && t + i < T) mu[t + i] = out[i];
        }
        return;
    }
    for (int i = threadIdx.x; i < ROUTER_BM; i += blockDim.x) a_off[i] = t0 + i < T ? (t0 + i) * xs : -1;
    __syncthreads();
    float acc[1][NT][4];
    gemm_global<ELEM_T, ROUTER_T, ROUTER_WARPS, 1, NT, ROUTER_BK, S>(acc, x, RowsAt{a_off}, wr + (long long)n0 * D,
                                                                   RowsOf{D, N - n0}, D, vec, smem);
    const int gq = lane >> 2, q = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int t = t0 + warp * 16 + gq + (j >> 1) * 8, n = n0 + nt * 8 + 2 * q + (j & 1);
            if (t >= T || n >= N) continue;
            if (max_active > 0) {  // raw logits: the top-k below needs the whole row
                g[(long long)t * N + n] = acc[0][nt][j];
            } else {
                const float gate = gate_knobs(acc[0][nt][j], bias_v ? bias_v[n] : bias_s, threshold);
                g[(long long)t * N + n] = gate;
                gt[(long long)n * T + t] = gate;
            }
        }
    // max_active: the token block's last chunk block to finish (the mu block does not count) finishes its rows.
    if (max_active <= 0 || !last_to_arrive(arrivals + blockIdx.y, gridDim.x - 1)) return;
    for (int i = warp; i < ROUTER_BM && t0 + i < T; i += ROUTER_WARPS)
        finish_token_gates(g + (long long)(t0 + i) * N, gt, t0 + i, T, N, bias_v, bias_s, threshold, max_active);
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

// Dynamic shared memory of prefill_up: PF_UP_STAGES pipeline stages of x rows and the expert's w_up slab.
template <int WARPS>
__host__ __device__ constexpr int pf_up_smem_bytes() {
    return PF_UP_STAGES * gemm_stage_bytes<ELEM_T, ELEM_T, WARPS, PF_MT, DE / 8, PF_UP_BK>();
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
    return pf_down_smem_bytes<WARPS>(3) <= PF_DYN_SMEM_LIMIT ? 3 : 2;
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
    static_assert(pf_up_smem_bytes<WARPS>() <= PF_DYN_SMEM_LIMIT, "prefill_up: shared memory over budget");
    extern __shared__ __align__(16) unsigned char dsmem[];
    __shared__ long long a_off[BM];
    __shared__ float mu_s[BM], gs_s[BM];
    require_dynamic_smem(pf_up_smem_bytes<WARPS>());
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
    gemm_global<ELEM_T, ELEM_T, WARPS, MT, NT, PF_UP_BK, PF_UP_STAGES>(
        acc, x, RowsAt{a_off}, w_up + (long long)e * DE * D, RowsOf{D, DE}, D, vec, dsmem);
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
    static_assert(pf_down_smem_bytes<WARPS>(S) <= PF_DYN_SMEM_LIMIT, "prefill_down: shared memory over budget");
    extern __shared__ __align__(16) unsigned char dsmem[];
    __shared__ int tok_s[BM];
    require_dynamic_smem(pf_down_smem_bytes<WARPS>(S));
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
// (min blocks 2: at most 255 registers either way, but without it ptxas caps the two-warp fp32 de=16 tile at 48
// registers and spills)
extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32, 2)
    deco_prefill_up(const ELEM_T* x, long long xs, const ELEM_T* w_up, const int* tokens, const int* counts,
                    const float* g, const float* mu, const SCALE_T* scale, const GAMMA_T* gamma, int T, int N, int D,
                    int vec, float eps, ELEM_T* act) {
    if constexpr (pf_up_smem_bytes<PREFILL_WARPS>() <= PF_DYN_SMEM_LIMIT)
        prefill_up<PREFILL_WARPS>(x, xs, w_up, tokens, counts, g, mu, scale, gamma, T, N, D, vec, eps, act);
}

// (min blocks 2: at most 255 registers either way, but ptxas -O3 spills the 16-bit de=32 tile on sm_90 without it)
extern "C" __global__ void __launch_bounds__(PREFILL_WARPS * 32, 2)
    deco_prefill_down(const ELEM_T* act, const ELEM_T* w_down, const int* tokens, const int* counts, int T, int N,
                      int D, int fb, int vec, int vec4, float* yacc) {
    if constexpr (pf_down_smem_bytes<PREFILL_WARPS>(pf_down_stages<PREFILL_WARPS>()) <= PF_DYN_SMEM_LIMIT)
        prefill_down<PREFILL_WARPS>(act, w_down, tokens, counts, T, N, D, fb, vec, vec4, yacc);
}
#endif  // PREFILL_WARPS
