"""The chunked output head of the GRPO update: log pi(target) (and the entropy) under softmax(h W^T / T) for
many hidden states without ever holding all their logits. grpo.sequence_logprobs' plain path takes
log_softmax over every completion token's logits at once, (B*T, V) floats: with Qwen3's 151,936-token
vocabulary that is 0.6 GB per 1,000 tokens in fp32, kept for backward. Here forward keeps only each token's
log-sum-exp, and backward recomputes one chunk's logits at a time, so one chunk's (chunk, V) fp32 logits exist
at once. tests/test_grpo.py holds it equal to the plain path."""
import torch


def _mm(a, b, dtype):
    """a @ b (2-D) in fp32 from inputs rounded to dtype (fp32: exact). On CUDA a bf16/fp16 product is one
    tensor-core GEMM with fp32 accumulation and output (torch.mm's out_dtype, torch >= 2.8); elsewhere the
    same numbers come from fp32 copies."""
    a, b = a.to(dtype), b.to(dtype)
    if dtype != torch.float32 and a.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _ChunkedHead(torch.autograd.Function):
    """log pi(target) (n,) [and entropy (n,), no gradient] under softmax((h W^T + b) / temperature) for hidden
    states h (n, H), `chunk` tokens at a time, the matmuls' inputs in `dtype`. Forward keeps only each token's
    log-sum-exp; backward recomputes a chunk's logits and uses d logp / d logits = (onehot(target) - softmax)
    / temperature, so one chunk's fp32 (chunk, V) logits exist at a time and none are kept between passes."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, chunk, dtype, with_entropy):
        logp, lse, ent = [], [], []
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)  # once, not per chunk
            for s in range(0, h.shape[0], chunk):
                z = _logits(h[s:s + chunk], w, bias, temperature, dtype)  # (c, V) fp32
                lse.append(torch.logsumexp(z, -1))
                logp.append(z.gather(1, targets[s:s + chunk, None])[:, 0] - lse[-1])
                if with_entropy:  # H = lse - sum(p z)
                    ent.append(lse[-1] - (torch.softmax(z, -1) * z).sum(-1))
        ctx.save_for_backward(h, weight, bias, targets, torch.cat(lse))
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        if not with_entropy:
            return torch.cat(logp)
        ent = torch.cat(ent)
        ctx.mark_non_differentiable(ent)
        return torch.cat(logp), ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        h, weight, bias, targets, lse = ctx.saved_tensors
        T, dtype = ctx.temperature, ctx.dtype
        grad_h = torch.empty(h.shape, device=h.device, dtype=torch.float32)  # (n, H)
        grad_w = torch.zeros(weight.shape, device=h.device, dtype=torch.float32)  # (V, H)
        grad_b = None if bias is None else torch.zeros(bias.shape, device=h.device, dtype=torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, h.shape[0], ctx.chunk):
                g = grad_logp[s:s + ctx.chunk, None].float() / T  # (c, 1)
                dz = _logits(h[s:s + ctx.chunk], w, bias, T, dtype).sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g)
                dz.scatter_add_(1, targets[s:s + ctx.chunk, None], g)  # (onehot - softmax) * grad / T, (c, V)
                grad_h[s:s + ctx.chunk] = _mm(dz, w, dtype)
                grad_w += _mm(dz.t(), h[s:s + ctx.chunk], dtype)
                if grad_b is not None:
                    grad_b += dz.sum(0)
        return (grad_h.to(h.dtype), grad_w.to(weight.dtype), None if bias is None else grad_b.to(bias.dtype),
                None, None, None, None, None)


def _logits(h, w, bias, temperature, dtype):
    """(h w^T + bias) / temperature (c, V) in fp32, the product's inputs in dtype."""
    z = _mm(h, w.t(), dtype)
    return (z if bias is None else z + bias.float()) / temperature


def logprobs(h, weight, bias, targets, temperature, chunk, dtype, with_entropy=False):
    """log pi(targets) (n,) for hidden states h (n, H) under softmax((h W^T + bias) / temperature), `chunk` tokens
    at a time with the matmuls' inputs in dtype; with_entropy also returns each token's entropy (n,), which
    carries no gradient."""
    return _ChunkedHead.apply(h, weight, bias, targets, temperature, chunk, dtype, with_entropy)
