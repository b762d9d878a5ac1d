"""Device helpers shared by the Triton kernels: the gate knobs, the NormSiLU + gate epilogue, the shared
expert's silu(gate) * up, the router's product and a fixed-order sum of partial rows.

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
def silu_mul(gate, up):
    """The shared SwiGLU expert's hidden activation silu(gate) * up (fp32 tiles)."""
    return gate * tl.sigmoid(gate) * up


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
def fixed_order_sum(ptr, first, rows, row_stride, cols, cmask, BLOCK_R: tl.constexpr):
    """Sum of rows first .. first+rows-1 of a fp32 buffer at the columns ``cols`` (masked by ``cmask``), BLOCK_R
    rows a step in row order: the result does not depend on which program wrote which row, or when. Loads
    bypass L1 (.cg): other programs wrote the rows (the last arriver of an arrival counter reads them)."""
    acc = tl.zeros([BLOCK_R, cols.shape[0]], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        rs = first + r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(ptr + rs.to(tl.int64)[:, None] * row_stride + cols[None, :],
                       mask=(r0 + tl.arange(0, BLOCK_R) < rows)[:, None] & cmask[None, :], other=0.0,
                       cache_modifier=".cg")
    return tl.sum(acc, axis=0)
