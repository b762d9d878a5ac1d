"""Device helpers shared by the Triton kernels: the gate knobs and the NormSiLU + gate epilogue.

Each is a @triton.jit function inlined into its callers, so the math exists once for every path.
"""
import triton
import triton.language as tl


@triton.jit
def gate_knobs(r, bias, threshold):
    """g = relu(r + bias), cut to 0 where g <= threshold (threshold 0 keeps relu)."""
    g = tl.maximum(r + bias, 0.0)
    return tl.where(g > threshold, g, 0.0)


@triton.jit
def norm_silu_gate(h, mu, gamma, gs, eps, DE: tl.constexpr):
    """silu(gamma * (h - mu) / rms(h - mu)) * gs for a tile h [M, DE] (fp32) of ONE expert per row.

    mu [M] the global mean x.wbar, gamma [DE], gs [M] the scaled gates of the rows."""
    u = h - mu[:, None]
    inv_rms = 1.0 / tl.sqrt(tl.sum(u * u, axis=1) / DE + eps)
    n = u * inv_rms[:, None] * gamma[None, :]
    return n * tl.sigmoid(n) * gs[:, None]


@triton.jit
def router_dot(x, wr):
    """x [M, K] @ wr[R, K]^T -> [M, R] fp32 router logits (SPEC §1: fp32(x) @ fp32(w_router)^T). Two 16-bit
    operands of one dtype go to tensor cores: their products are exact in fp32 and the sum is fp32. Anything
    else (fp32, or a 16-bit layer with an fp32 router) is multiplied in fp32 with TF32 off."""
    if x.dtype == wr.dtype and x.dtype != tl.float32:
        return tl.dot(x, tl.trans(wr))
    return tl.dot(x.to(tl.float32), tl.trans(wr.to(tl.float32)), input_precision="ieee")


@triton.jit
def scatter_add(ptrs, vals, mask, VECTOR: tl.constexpr):
    """*ptrs += vals (fp32, relaxed atomics) where mask. VECTOR (sm_90+, compiled only): a thread's elements
    go out four at a time as one 16-byte vector reduction when their addresses are consecutive, 16-byte
    aligned and all four unmasked, else as two 8-byte ones for each such aligned pair, else one by one: which
    elements share an asm instance is the compiler's choice, so the asm checks the addresses itself. Fewer, wider atomic operations
    are what the prefill down-projection is bound by."""
    if VECTOR:
        tl.inline_asm_elementwise(
            asm="""{
            .reg .pred m<4>, q4, q01, q23, s<4>, t;
            .reg .b64 a<4>;
            setp.ne.b32 m0, $12, 0;
            setp.ne.b32 m1, $13, 0;
            setp.ne.b32 m2, $14, 0;
            setp.ne.b32 m3, $15, 0;
            add.u64 a1, $4, 4;
            add.u64 a2, $4, 8;
            add.u64 a3, $6, 4;
            setp.eq.and.u64 q01, a1, $5, m0;
            and.pred q01, q01, m1;
            and.b64 a1, $4, 7;
            setp.eq.and.u64 q01, a1, 0, q01;
            setp.eq.and.u64 q23, a3, $7, m2;
            and.pred q23, q23, m3;
            and.b64 a3, $6, 7;
            setp.eq.and.u64 q23, a3, 0, q23;
            setp.eq.and.u64 q4, a2, $6, q01;
            and.pred q4, q4, q23;
            and.b64 a2, $4, 15;
            setp.eq.and.u64 q4, a2, 0, q4;
            @q4 red.relaxed.gpu.global.add.v4.f32 [$4], {$8, $9, $10, $11};
            not.pred t, q4;
            and.pred q01, q01, t;
            and.pred q23, q23, t;
            @q01 red.relaxed.gpu.global.add.v2.f32 [$4], {$8, $9};
            @q23 red.relaxed.gpu.global.add.v2.f32 [$6], {$10, $11};
            or.pred t, q4, q01;
            not.pred t, t;
            and.pred s0, m0, t;
            and.pred s1, m1, t;
            or.pred t, q4, q23;
            not.pred t, t;
            and.pred s2, m2, t;
            and.pred s3, m3, t;
            @s0 red.relaxed.gpu.global.add.f32 [$4], $8;
            @s1 red.relaxed.gpu.global.add.f32 [$5], $9;
            @s2 red.relaxed.gpu.global.add.f32 [$6], $10;
            @s3 red.relaxed.gpu.global.add.f32 [$7], $11;
            mov.u32 $0, 0;
            mov.u32 $1, 0;
            mov.u32 $2, 0;
            mov.u32 $3, 0;
            }""",
            constraints="=r,=r,=r,=r,l,l,l,l,f,f,f,f,r,r,r,r",
            args=[ptrs.to(tl.int64), vals, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=4)
    else:
        tl.atomic_add(ptrs, vals, mask=mask, sem="relaxed")
