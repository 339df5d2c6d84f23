"""Triton kernels for fastdecode's decode step (one new token per row, DecodeConfig.kernels = "triton"). Each
replaces a run of small torch ops that fastdecode keeps as the reference ("torch"); tests/test_tritondecode.py
compares the two on random inputs.

- decode_attention: split-KV ("flash-decoding") attention over the static KV cache with GQA. A row attends
  cache columns [start_b, col]; the kernel reads start and col from device memory and skips every other
  column, so a graph captured for a kv bucket reads only what the row uses. Stage 1 gives each (row, KV
  head, split of the bucket) one program that streams its K/V tiles once for all G query heads of the group
  (one (G, BLOCK_N) dot per tile) and keeps an unnormalised partial (acc, max, sum); stage 2 merges the
  splits. Many splits keep the card busy at batch 1, where B * Hkv programs alone would leave it idle.
- rope_qk_cache: per-head q/k RMSNorm (Qwen3), RoPE at each row's position, the new K/V written to the
  cache at column col, all heads in one launch (about ten kernels per layer on the torch path).
- silu_mul: SwiGLU's silu(gate) * up in one pass.

The pointwise kernels round to the decode dtype after each step where the torch ops do, so in bf16 they
follow HF's roundings, not only its maths. Everything runs inside the CUDA graph: launch grids depend
on shapes only, never on values. Each kernel is wrapped as a torch custom op, so the CUDA-graph emulator of
tests/test_graph_replay.py (a dispatch mode) records and replays it like any aten op.

Triton ships with CUDA builds of torch. On a CPU the kernels run only under TRITON_INTERPRET=1 (set before
this module is imported), which the tests use.
"""
import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # cache columns per attention tile
MIN_DOT = 16  # tl.dot needs every block dimension >= 16: the G query heads of a group are padded to it


def supports(head_dim, group):
    """Why the attention kernel cannot run this head layout, or None if it can."""
    if head_dim < MIN_DOT or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} (the Triton kernels need a power of two from {MIN_DOT} to 256)"
    if group > 64:
        return f"{group} query heads per KV head (the Triton attention handles at most 64)"
    return None


@triton.jit
def _attn_split(q_ptr, k_ptr, v_ptr, start_ptr, col_ptr, out_ptr, part_ptr, stat_ptr, stride_b, stride_h, stride_n,
                scale, split, n_splits, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                SINGLE: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)  # row * HKV + kv head
    s = tl.program_id(1)  # split of the bucket
    b = bh // HKV
    kvh = bh % HKV
    lo = tl.maximum(tl.load(start_ptr + b), s * split)  # this split's share of [start_b, col]
    hi = tl.minimum(tl.load(col_ptr) + 1, (s + 1) * split)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * G + g)[:, None] * D + d[None, :], mask=g[:, None] < G, other=0.0)  # (G_PAD, D)
    dt = q_ptr.dtype.element_ty
    if UPCAST:  # the interpreter's dot reads bf16 as raw integers; bf16 products are exact in fp32 anyway
        q = q.to(tl.float32)
    base = b.to(tl.int64) * stride_b + kvh * stride_h
    m = tl.full([G_PAD], float("-inf"), tl.float32)  # running max of the scores
    den = tl.zeros([G_PAD], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([G_PAD, D], tl.float32)  # running sum of exp(score - m) * v
    for n0 in range(lo, hi, BLOCK):  # no iteration at all for a split outside [start_b, col]
        n = n0 + tl.arange(0, BLOCK)
        valid = n < hi
        offs = base + n[:, None].to(tl.int64) * stride_n + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)  # (BLOCK, D)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        score = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G_PAD, BLOCK) fp32
        score = tl.where(valid[None, :], score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, 1))  # finite: every tile holds a valid column
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt).to(v.dtype), v, input_precision=PRECISION)  # p rounded to dt
        m = m_new
    if SINGLE:  # one split holds the whole answer: normalise and store, no merge
        out = (acc / den[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + (bh * G + g)[:, None] * D + d[None, :], out, mask=g[:, None] < G)
    else:
        row = (bh * G + g) * n_splits + s  # (G_PAD,) partial index: ((b * H + h) * n_splits + s)
        tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
        tl.store(stat_ptr + row * 2, m, mask=g < G)
        tl.store(stat_ptr + row * 2 + 1, den, mask=g < G)


@triton.jit
def _attn_merge(part_ptr, stat_ptr, out_ptr, n_splits, D: tl.constexpr, S_PAD: tl.constexpr):
    bh = tl.program_id(0)  # row * H + query head
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    row = bh * n_splits + s
    m = tl.load(stat_ptr + row * 2, mask=s < n_splits, other=float("-inf"))  # (S_PAD,), -inf: an empty split
    den = tl.load(stat_ptr + row * 2 + 1, mask=s < n_splits, other=0.0)
    acc = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=(s < n_splits)[:, None], other=0.0)  # (S_PAD, D)
    w = tl.exp(m - tl.max(m, 0))  # column col is always attended, so the max is finite; empty splits weigh 0
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * den, 0)
    tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty))


INTERPRETED = not isinstance(_attn_split, triton.runtime.JITFunction)  # TRITON_INTERPRET=1: numpy on the CPU


def n_splits(rows, kv_len, programs):
    """Splits of a kv_len bucket so that rows * splits reaches `programs` (a few per multiprocessor), each
    at least one BLOCK_N tile."""
    return max(1, min(triton.cdiv(kv_len, BLOCK_N), triton.cdiv(programs, rows)))


@torch.library.custom_op("rporec::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, cache: torch.Tensor, layer: int, start: torch.Tensor, col: torch.Tensor,
                     kv_len: int, splits: int, block: int = BLOCK_N) -> torch.Tensor:
    """q (B, H, D) attends cache[layer, 0|1] (B, Hkv, max_len, D) at columns [start_b, col] (col (1,) the
    column just written, < kv_len) -> (B, H, D) in q's dtype. The kv_len columns are cut into about `splits`
    splits of whole `block`-column tiles."""
    B, H, D = q.shape
    Hkv = cache.shape[3]
    G = H // Hkv
    k, v = cache[layer, 0], cache[layer, 1]  # (B, Hkv, max_len, D), last dim contiguous
    split = triton.cdiv(triton.cdiv(kv_len, splits), block) * block  # columns per split, whole tiles
    n = triton.cdiv(kv_len, split)
    out = torch.empty_like(q)
    part = torch.empty(B * H * n, D, device=q.device, dtype=torch.float32) if n > 1 else out  # (B*H*n, D)
    stat = torch.empty(B * H * n, 2, device=q.device, dtype=torch.float32) if n > 1 else out  # max, sum
    exact = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 decoding stays fp32 (tf32 is Triton's default)
    stages = 3 if q.element_size() == 2 else 2  # K/V tiles in flight; fp32 tiles take twice the shared memory
    _attn_split[(B * Hkv, n)](q.contiguous(), k, v, start, col, out, part, stat, k.stride(0), k.stride(1), k.stride(2),
                              1.0 / math.sqrt(D), split, n, HKV=Hkv, G=G, G_PAD=max(MIN_DOT, triton.next_power_of_2(G)),
                              D=D, SINGLE=n == 1, BLOCK=block, PRECISION=exact, UPCAST=INTERPRETED, num_stages=stages)
    if n > 1:
        _attn_merge[(B * H,)](part, stat, out, n, D=D, S_PAD=triton.next_power_of_2(n))
    return out


@decode_attention.register_fake
def _(q, cache, layer, start, col, kv_len, splits, block=BLOCK_N):
    return torch.empty_like(q)


@triton.jit
def _rope_qk_cache(qkv_ptr, norm_ptr, cos_ptr, sin_ptr, start_ptr, col_ptr, q_ptr, k_ptr, v_ptr,
                   stride_b, stride_h, stride_n, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                   NH_PAD: tl.constexpr, HAS_NORM: tl.constexpr):
    b = tl.program_id(0)  # one row: its H query heads, then HKV key heads, then HKV value heads
    col = tl.load(col_ptr)
    h = tl.arange(0, NH_PAD)[:, None]  # (NH_PAD, 1)
    d = tl.arange(0, D)[None, :]  # (1, D)
    half = (d + D // 2) % D  # RoPE's partner lane: rotate_half(x) = roll(x, D/2) with the sign folded into sin
    is_q = h < H
    is_k = (h >= H) & (h < H + HKV)
    is_v = (h >= H + HKV) & (h < H + 2 * HKV)
    src = qkv_ptr + (b * (H + 2 * HKV) + h) * D
    dt = qkv_ptr.dtype.element_ty
    x = tl.load(src + d, mask=h < H + 2 * HKV, other=0.0)  # (NH_PAD, D)
    y = x.to(tl.float32)
    yr = tl.load(src + half, mask=h < H + 2 * HKV, other=0.0).to(tl.float32)
    if HAS_NORM:  # torch: rms_norm in fp32 rounded to dt, then times the weight, rounded to dt
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, 1) / D + eps)[:, None]  # (NH_PAD, 1)
        w = tl.load(norm_ptr + h * D + d, mask=is_q | is_k, other=0.0).to(tl.float32)
        wr = tl.load(norm_ptr + h * D + half, mask=is_q | is_k, other=0.0).to(tl.float32)
        y = ((y * rstd).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
        yr = ((yr * rstd).to(dt).to(tl.float32) * wr).to(dt).to(tl.float32)
    pos = (col - tl.load(start_ptr + b)) * D  # RoPE position = real tokens before this one
    cos = tl.load(cos_ptr + pos + d).to(tl.float32)  # (1, D)
    sin = tl.load(sin_ptr + pos + d).to(tl.float32)
    y = ((y * cos).to(dt).to(tl.float32) + (yr * sin).to(dt).to(tl.float32)).to(dt)  # torch rounds each op
    tl.store(q_ptr + (b * H + h) * D + d, y, mask=is_q)
    cache = b.to(tl.int64) * stride_b + (h - H) % HKV * stride_h + col.to(tl.int64) * stride_n + d
    tl.store(k_ptr + cache, y, mask=is_k)
    tl.store(v_ptr + cache, x, mask=is_v)


@torch.library.custom_op("rporec::rope_qk_cache", mutates_args={"cache"})
def rope_qk_cache(qkv: torch.Tensor, norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  start: torch.Tensor, col: torch.Tensor, cache: torch.Tensor, layer: int, eps: float) -> torch.Tensor:
    """qkv (B, (H + 2 Hkv) D) of one token per row -> q (B, H, D), rotated (and RMS-normed with `norm`
    (H + Hkv, D) if given); rotated k and v go to cache[layer, 0|1, :, :, col]. cos/sin: (max_len, D) tables,
    sin sign-folded (fastdecode._rope_tables)."""
    Hkv, D = cache.shape[3], cache.shape[5]
    B = qkv.shape[0]
    H = qkv.shape[1] // D - 2 * Hkv
    q = torch.empty(B, H, D, device=qkv.device, dtype=qkv.dtype)
    k, v = cache[layer, 0], cache[layer, 1]
    _rope_qk_cache[(B,)](qkv.contiguous(), norm if norm is not None else qkv, cos, sin, start, col, q, k, v,
                         k.stride(0), k.stride(1), k.stride(2), eps, H=H, HKV=Hkv, D=D,
                         NH_PAD=triton.next_power_of_2(H + 2 * Hkv), HAS_NORM=norm is not None)
    return q


@rope_qk_cache.register_fake
def _(qkv, norm, cos, sin, start, col, cache, layer, eps):
    D = cache.shape[5]
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // D - 2 * cache.shape[3], D)


@triton.jit
def _silu_mul(gu_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dt = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + b * 2 * N + i, mask=i < N).to(tl.float32)
    u = tl.load(gu_ptr + b * 2 * N + N + i, mask=i < N).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # torch: silu in fp32, rounded to dt
    tl.store(out_ptr + b * N + i, (act * u).to(dt), mask=i < N)


@torch.library.custom_op("rporec::silu_mul", mutates_args=())
def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu (B, 2N) = [gate | up] -> silu(gate) * up (B, N)."""
    B, N = gu.shape[0], gu.shape[1] // 2
    out = gu.new_empty(B, N)
    block = min(1024, triton.next_power_of_2(N))
    _silu_mul[(B, triton.cdiv(N, block))](gu.contiguous(), out, N=N, BLOCK=block)
    return out


@silu_mul.register_fake
def _(gu):
    return gu.new_empty(gu.shape[0], gu.shape[1] // 2)
