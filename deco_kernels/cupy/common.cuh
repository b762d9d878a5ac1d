// Device helpers shared by the CuPy backend's kernels (decode.cu, prefill.cu).
//
// No #include at all: NVRTC on a pip or JetPack install may not find the CUDA headers, so the 16-bit types are
// plain 16-bit storage converted with bit operations / PTX cvt, and tensor cores are reached through inline PTX
// (ldmatrix + mma.sync m16n8k16, sm_80 and newer: Orin sm_87, H100 sm_90).
//
// Compile-time constants (set by deco_kernels/cupy/geometry.py as -D options):
//   ELEM_T    storage type of x, w_up, w_down, ws_* and y (bf16_t, f16_t or float)
//   ROUTER_T  storage type of w_router (bf16_t, f16_t or float)
//   SCALE_T, GAMMA_T  storage types of router_scale and gamma (any of bf16_t, f16_t, float, double)
//   DE        expert width (16, 32, 64 or 128)
//   USE_LDMATRIX  1: tensor-core fragments through ldmatrix; 0: 32-bit shared loads (a debugging fallback)

struct bf16_t { unsigned short v; };
struct f16_t { unsigned short v; };

#ifndef USE_LDMATRIX
#define USE_LDMATRIX 1
#endif

template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };
template <typename T> struct is_16bit { static constexpr bool value = sizeof(T) == 2; };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(double v) { return (float)v; }
__device__ __forceinline__ float to_f(bf16_t v) { return __uint_as_float(((unsigned)v.v) << 16); }
__device__ __forceinline__ float to_f(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.v));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f(float f);
template <> __device__ __forceinline__ float from_f<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16_t from_f<bf16_t>(float f) {
    // Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN.
    unsigned u = __float_as_uint(f);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.v = (unsigned short)((u >> 16) | 0x40u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.v = (unsigned short)(u >> 16);
    return r;
}
template <> __device__ __forceinline__ f16_t from_f<f16_t>(float f) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.v) : "f"(f));
    return r;
}

template <typename T> __device__ __forceinline__ T zero_of() { return from_f<T>(0.0f); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// a / b within 2 ulp over the whole range, without the IEEE division's slow-path subroutine (whose call frame
// ptxas reports as local-memory spills); Triton divides the same way.
__device__ __forceinline__ float div_full(float a, float b) {
    float r;
    asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float silu(float v) { return div_full(v, 1.0f + expf(-v)); }

// A load that bypasses L1: values written by other blocks of the same launch (last-arriver patterns).
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// 8 consecutive elements as fp32; vec: p is 16-byte aligned (one or more 16-byte loads).
__device__ __forceinline__ void unpack_bf16x2(unsigned w, float* o) {
    o[0] = __uint_as_float(w << 16);
    o[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void load8(const bf16_t* p, bool vec, float o[8]) {
    if (vec) {
        uint4 q = *reinterpret_cast<const uint4*>(p);
        unpack_bf16x2(q.x, o); unpack_bf16x2(q.y, o + 2); unpack_bf16x2(q.z, o + 4); unpack_bf16x2(q.w, o + 6);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = to_f(p[j]);
    }
}
__device__ __forceinline__ void load8(const f16_t* p, bool vec, float o[8]) {
    if (vec) {
        uint4 q = *reinterpret_cast<const uint4*>(p);
        unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            f16_t lo, hi;
            lo.v = (unsigned short)(w[j] & 0xffffu);
            hi.v = (unsigned short)(w[j] >> 16);
            o[2 * j] = to_f(lo);
            o[2 * j + 1] = to_f(hi);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = to_f(p[j]);
    }
}
__device__ __forceinline__ void load8(const float* p, bool vec, float o[8]) {
    if (vec) {
        float4 a = *reinterpret_cast<const float4*>(p);
        float4 b = *reinterpret_cast<const float4*>(p + 4);
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = p[j];
    }
}

// acc[t] += this thread's share of x[t, :D] . w[:D] in fp32 for t < ntok: thread i of n reads the 8-element
// chunks i, i + n, ... (vec: D % 8 == 0 and every row 16-byte aligned) or the elements i, i + n, ...
template <int TT, typename W>
__device__ __forceinline__ void thread_dot(const W* w, const ELEM_T* x, long long xs, int ntok, int D, bool vec,
                                           int i, int n, float acc[TT]) {
    if (vec) {
#pragma unroll(TT <= 2 ? 4 : 2)  // loads in flight without spilling registers at 4-8 tokens
        for (int k = i * 8; k < D; k += n * 8) {
            float wv[8];
            load8(w + k, true, wv);
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                if (t < ntok) {
                    float xv[8];
                    load8(x + t * xs + k, true, xv);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[t] += wv[j] * xv[j];
                }
            }
        }
    } else {
        for (int k = i; k < D; k += n) {
            const float wv = to_f(w[k]);
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (t < ntok) acc[t] += wv * to_f(x[t * xs + k]);
        }
    }
}

// out[t] = x[t, :D] . w[:D] in fp32 for t < ntok (0 for t >= ntok), summed over the warp: every lane gets it.
template <int TT, typename W>
__device__ __forceinline__ void warp_dot(const W* w, const ELEM_T* x, long long xs, int ntok, int D, bool vec,
                                         float out[TT]) {
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = 0.0f;
    thread_dot<TT>(w, x, xs, ntok, D, vec, threadIdx.x & 31, 32, acc);
#pragma unroll
    for (int t = 0; t < TT; ++t) out[t] = warp_sum(acc[t]);
}

// A gate from its router logit r and the expert's bias b (SPEC §4): relu(r + b), cut to 0 unless > threshold.
__device__ __forceinline__ float gate_knobs(float r, float b, float threshold) {
    const float gate = fmaxf(r + b, 0.0f);
    return gate > threshold ? gate : 0.0f;
}

// True in every thread of the block that arrives last of `expected` blocks at *counter, after which it sees the
// global writes every arriving block made before its arrival (read them with ld_cg); the last one leaves the
// counter at zero again for the next launch (and CUDA-graph replays). Call from every thread of the block.
__device__ __forceinline__ bool last_to_arrive(unsigned* counter, unsigned expected) {
    __threadfence();  // this block's writes, before its arrival
    __syncthreads();
    bool last = false;
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1u) == expected - 1;
        if (last) *counter = 0u;  // every other block has arrived: nothing adds to it any more in this launch
    }
    last = __syncthreads_or(last);
    if (last) __threadfence();
    return last;
}

// Final gates of token t (SPEC §4), by one warp: g_row holds the raw router logits of the token (written by any
// block of this launch); afterwards g_row and the column gt[:, t] hold relu(r + bias) cut at threshold, with
// only the max_active largest kept (ties: lower expert index) when max_active > 0.
__device__ void finish_token_gates(float* g_row, float* gt, int t, int T, int N, const float* bias_v,
                                   float bias_s, float threshold, int max_active) {
    const int lane = threadIdx.x & 31;
    for (int e = lane; e < N; e += 32) {
        const float gate = gate_knobs(ld_cg(g_row + e), bias_v ? bias_v[e] : bias_s, threshold);
        g_row[e] = gate;
        if (max_active <= 0) gt[(long long)e * T + t] = gate;
    }
    if (max_active <= 0) return;
    __syncwarp();
    // Rank of each gate among the token's gates (ties: lower index first); keep ranks < max_active.
    for (int e = lane; e < N; e += 32) {
        const float ge = g_row[e];
        int rank = 0;
        if (ge > 0.0f)
            for (int j = 0; j < N && rank < max_active; ++j) {
                const float gj = g_row[j];
                rank += (gj > ge) || (gj == ge && j < e);
            }
        gt[(long long)e * T + t] = (ge > 0.0f && rank < max_active) ? ge : 0.0f;
    }
    __syncwarp();
    for (int e = lane; e < N; e += 32) g_row[e] = gt[(long long)e * T + t];
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core tiles (prefill): C[rows, NT*8] += A[rows, K] * B[NT*8, K]^T with both operands K-contiguous in
// shared memory. 16-bit operands of one type: mma.sync m16n8k16 with fp32 accumulation; anything else (fp32,
// or a router of another dtype) runs the same fragment layout with fp32 FMAs. Thread (g = lane/4, q = lane%4)
// holds c[0..1] at (row g, cols 2q, 2q+1) and c[2..3] at (row g+8, same cols) of each 16x8 tile.
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    cp_async16(smem_u32(dst), src, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    if constexpr (same_type<T, bf16_t>::value) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ unsigned lds32(const void* p) { return *reinterpret_cast<const unsigned*>(p); }

// acc += A[arow0 : arow0 + 16*MT, 0 : 16*ksteps] * B[0 : 8*NT, same]^T; sa / sb row strides sas / sbs elements.
template <typename AT, typename BT, int MT, int NT>
__device__ __forceinline__ void mma_tile(float (&acc)[MT][NT][4], const AT* sa, int sas, int arow0, const BT* sb,
                                         int sbs, int ksteps) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    if constexpr (same_type<AT, BT>::value && is_16bit<AT>::value) {
        static_assert(NT % 2 == 0, "NT must be even (B fragments come in pairs of n-tiles)");
#if USE_LDMATRIX
        // Each lane's ldmatrix row addresses, as 32-bit shared addresses resolved once: the unrolled loops below
        // then add only compile-time byte offsets (ks, mt, np).
        const unsigned a_lane = smem_u32(sa + (arow0 + (lane & 15)) * sas + (lane >> 4) * 8);
        const unsigned b_lane = smem_u32(sb + ((lane >> 4) * 8 + (lane & 7)) * sbs + ((lane >> 3) & 1) * 8);
#endif
#pragma unroll
        for (int ks = 0; ks < ksteps; ++ks) {
            const int k0 = ks * 16;
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#if USE_LDMATRIX
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(a[mt][0]), "=r"(a[mt][1]), "=r"(a[mt][2]), "=r"(a[mt][3])
                             : "r"(a_lane + (unsigned)((mt * 16 * sas + k0) * (int)sizeof(AT))));
#else
                const int r = arow0 + mt * 16;
                a[mt][0] = lds32(sa + (r + g) * sas + k0 + 2 * q);
                a[mt][1] = lds32(sa + (r + g + 8) * sas + k0 + 2 * q);
                a[mt][2] = lds32(sa + (r + g) * sas + k0 + 8 + 2 * q);
                a[mt][3] = lds32(sa + (r + g + 8) * sas + k0 + 8 + 2 * q);
#endif
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned b[4];
#if USE_LDMATRIX
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                             : "r"(b_lane + (unsigned)((np * 16 * sbs + k0) * (int)sizeof(BT))));
#else
                b[0] = lds32(sb + (np * 16 + g) * sbs + k0 + 2 * q);
                b[1] = lds32(sb + (np * 16 + g) * sbs + k0 + 8 + 2 * q);
                b[2] = lds32(sb + (np * 16 + 8 + g) * sbs + k0 + 2 * q);
                b[3] = lds32(sb + (np * 16 + 8 + g) * sbs + k0 + 8 + 2 * q);
#endif
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<AT>(acc[mt][2 * np], a[mt], b[0], b[1]);
                    mma16816<AT>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
                }
            }
        }
    } else {
        for (int k = 0; k < ksteps * 16; ++k) {
            float a[MT][2], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = to_f(sa[(arow0 + mt * 16 + g) * sas + k]);
                a[mt][1] = to_f(sa[(arow0 + mt * 16 + g + 8) * sas + k]);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                b[nt][0] = to_f(sb[(nt * 8 + 2 * q) * sbs + k]);
                b[nt][1] = to_f(sb[(nt * 8 + 2 * q + 1) * sbs + k]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    acc[mt][nt][0] += a[mt][0] * b[nt][0];
                    acc[mt][nt][1] += a[mt][0] * b[nt][1];
                    acc[mt][nt][2] += a[mt][1] * b[nt][0];
                    acc[mt][nt][3] += a[mt][1] * b[nt][1];
                }
        }
    }
}

// Copy rows [*, k0 : k0 + KC) of R rows into a shared tile (row stride ss elements), zeros where a row is
// invalid (off < 0) or k >= K. Row r starts at base + off(r). Each thread copies one fixed 16-byte column chunk
// of every STEP-th row (no division; unrolled by 8: wider unrolls of the one-warp tiles hoisted every row's
// address into registers, up to 255): vec: cp.async (K a multiple of the chunk, rows aligned); else element by
// element.
template <typename T, int R, int KC, int NTH, typename RowOff>
__device__ __forceinline__ void load_tile(T* dst, int ss, const T* base, RowOff off, int k0, int K, bool vec) {
    constexpr int E = 16 / sizeof(T), CPR = KC / E, STEP = NTH / CPR;
    static_assert(KC % E == 0 && NTH % CPR == 0 && R % STEP == 0, "load_tile: the threads do not tile the rows");
    const int r0 = threadIdx.x / CPR, c = threadIdx.x % CPR * E, k = k0 + c;
    const int n = K - k;  // valid elements of this thread's chunk in every row (the whole chunk: >= E)
    dst += r0 * ss + c;
    if (vec) {
#pragma unroll 8
        for (int j = 0; j < R / STEP; ++j) {
            const long long o = off(r0 + j * STEP);
            const bool valid = o >= 0 && n > 0;
            cp_async16(dst + j * STEP * ss, valid ? base + o + k : base, valid);
        }
    } else {
#pragma unroll 8
        for (int j = 0; j < R / STEP; ++j) {
            const long long o = off(r0 + j * STEP);
#pragma unroll
            for (int i = 0; i < E; ++i) dst[j * STEP * ss + i] = o >= 0 && i < n ? base[o + k + i] : zero_of<T>();
        }
    }
}

// load_tile's vector path for the K loop of a gathered operand (rows at offsets held in shared memory): the
// thread's rows are resolved once (a global pointer per row, null for an invalid one, and the shared address of
// its chunk in the first row), so each K step adds only k0 and a stage offset instead of reloading and
// re-checking every row's 64-bit offset. Same thread-to-chunk map as load_tile; a pointer per row costs two
// registers, hence at most 8 rows per thread. SS: the shared tile's row stride in elements.
template <typename T, int R, int KC, int NTH, int SS>
struct TileCopy {
    static constexpr int E = 16 / sizeof(T), CPR = KC / E, STEP = NTH / CPR, ROWS = R / STEP;
    static_assert(KC % E == 0 && NTH % CPR == 0 && R % STEP == 0, "TileCopy: the threads do not tile the rows");
    static_assert(ROWS <= 8, "TileCopy: more than 8 rows per thread (16 registers of pointers)");
    const T* src[ROWS];
    const T* base;
    unsigned dst;  // shared address of row r0, chunk c, in a tile that starts at shared address 0
    int col;
    template <typename RowOff>
    __device__ __forceinline__ TileCopy(const T* base_, RowOff off) : base(base_) {
        const int r0 = threadIdx.x / CPR;
        col = threadIdx.x % CPR * E;
        dst = (unsigned)((r0 * SS + col) * (int)sizeof(T));
#pragma unroll
        for (int j = 0; j < ROWS; ++j) {
            const long long o = off(r0 + j * STEP);
            src[j] = o >= 0 ? base + o + col : nullptr;
        }
    }
    // Copies columns [k0, k0 + KC) of every row into the tile at shared address `tile`; zeros for invalid rows
    // and columns >= K (K a multiple of E).
    __device__ __forceinline__ void issue(unsigned tile, int k0, int K) const {
        const bool k_in = k0 + col < K;
#pragma unroll
        for (int j = 0; j < ROWS; ++j) {
            const bool valid = k_in && src[j] != nullptr;
            cp_async16(tile + dst + (unsigned)(j * STEP * SS * (int)sizeof(T)), valid ? src[j] + k0 : base, valid);
        }
    }
};

template <typename AT, typename BT, int WARPS, int MT, int NT, int BK>
__host__ __device__ constexpr int gemm_stage_bytes() {
    return WARPS * MT * 16 * (BK + 16 / (int)sizeof(AT)) * (int)sizeof(AT) +
           NT * 8 * (BK + 16 / (int)sizeof(BT)) * (int)sizeof(BT);
}

// Pipeline depth: the most stages (4, 3, 2) whose buffers fit in `budget` bytes of shared memory.
template <typename AT, typename BT, int WARPS, int MT, int NT, int BK>
__host__ __device__ constexpr int gemm_stages(int budget) {
    return 4 * gemm_stage_bytes<AT, BT, WARPS, MT, NT, BK>() <= budget   ? 4
           : 3 * gemm_stage_bytes<AT, BT, WARPS, MT, NT, BK>() <= budget ? 3
                                                                         : 2;
}

// acc[BM, NT*8] = A[rows, :K] * B[:NT*8, :K]^T, both from global memory through an S-stage cp.async pipeline
// (S - 1 K steps in flight while one is multiplied). Warp w owns rows [w*16*MT, (w+1)*16*MT). smem holds S
// stages, each A [BM][BK + pad] then B [NT*8][BK + pad].
template <typename AT, typename BT, int WARPS, int MT, int NT, int BK, int S, typename AOff, typename BOff>
__device__ void gemm_global(float (&acc)[MT][NT][4], const AT* A, AOff a_off, const BT* B, BOff b_off, int K,
                            bool vec, unsigned char* smem) {
    constexpr int BM = WARPS * MT * 16, NTH = WARPS * 32;
    constexpr int SA = BK + 16 / sizeof(AT), SB = BK + 16 / sizeof(BT);
    constexpr int STAGE = gemm_stage_bytes<AT, BT, WARPS, MT, NT, BK>();
    static_assert(S >= 2, "at least two stages");
    const int arow0 = (threadIdx.x >> 5) * MT * 16;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[mt][nt][j] = 0.0f;
    const int nk = (K + BK - 1) / BK;
    const TileCopy<AT, BM, BK, NTH, SA> copy_a(A, a_off);  // the gathered rows, resolved once
    const unsigned smem0 = smem_u32(smem);
    auto load = [&](int kt, int stage) {
        unsigned char* st = smem + stage * STAGE;
        if (vec)
            copy_a.issue(smem0 + (unsigned)(stage * STAGE), kt * BK, K);
        else
            load_tile<AT, BM, BK, NTH>(reinterpret_cast<AT*>(st), SA, A, a_off, kt * BK, K, false);
        load_tile<BT, NT * 8, BK, NTH>(reinterpret_cast<BT*>(st + BM * SA * sizeof(AT)), SB, B, b_off, kt * BK, K,
                                       vec);
    };
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < nk) load(s, s);
        cp_async_commit();
    }
    int use = 0;  // kt % S, counted without a division; step kt + S - 1 loads into stage (kt - 1) % S
    for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<S - 2>();  // step kt has landed (one commit group per step, empty ones included)
        __syncthreads();         // ... for every thread; and step kt-1's buffer is free
        if (kt + S - 1 < nk) load(kt + S - 1, use == 0 ? S - 1 : use - 1);
        cp_async_commit();
        const unsigned char* st = smem + use * STAGE;
        mma_tile<AT, BT, MT, NT>(acc, reinterpret_cast<const AT*>(st), SA, arow0,
                                 reinterpret_cast<const BT*>(st + BM * SA * sizeof(AT)), SB, BK / 16);
        use = use + 1 == S ? 0 : use + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // the caller may reuse the buffers
}
