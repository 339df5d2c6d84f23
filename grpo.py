"""GRPO with an entropy token mask for RPORec Stage II (paper Appendix A.1, eq. 8-11).

Pure tensor functions (advantages, KL, entropy mask, loss, chunked log-probs) plus `rollout`
(G completions per prompt through decode.generate) and `update` (mu micro-batched optimisation
passes over one rollout batch).

Choices the paper leaves open, made here:
- The ratio w = pi_theta / pi_old uses the policy that sampled (eq. 9 writes pi_ref, a typo:
  every GRPO implementation uses pi_old there and pi_ref only in the KL).
- By default (iterations mu = 1) every rollout batch gets one optimisation step, so pi_old is the
  policy being optimised and w = exp(logp - logp.detach()) = 1 in value (as TRL does with
  num_iterations=1); the clip is then inactive and the gradient is A * grad logp.
  old_logp="rollout" takes pi_old from the decoder's own log-probs instead, which lets
  decode-vs-train numerics into w: on SmolLM2-135M, bf16 decoding against a bf16-autocast
  training forward gave mean |dlogp| 0.037, |w - 1| > 0.05 on 29% of the tokens
  (tests/real_model_check.py; README, Choices).
- mu > 1 (TRL's num_iterations, PPO's update epochs) optimises the batch mu times: mu optimizer
  steps, each over all micro-batches with its own grad-norm clip. pi_old is then the policy that
  sampled, its log-probs those of pass 1's forward (same autocast, same micro-batches), so w = 1
  on pass 1 (the mu = 1 gradient) and moves away from 1 on the later passes, where the clip binds.
  With old_logp="rollout" the decoder's log-probs are pi_old on every pass. pi_ref's log-probs
  are taken once, the entropy mask is computed once per rollout batch, and update() returns the
  pass-averaged stats plus "passes", the per-pass loss, kl, clip_low, clip_high, clip_frac and
  grad_norm.
- The entropies of eq. 11 (m_t and r_ent) come from the rollout's own decoding pass
  (decode.generate(stats=True)), not a second forward.
- Logits are divided by the sampling temperature everywhere (rollout, policy, reference), so
  pi_old is the distribution that sampled; rollouts should use top_p = 1, top_k = 0.
- A_i = (r_i - mean_G) / (std_G + adv_eps) with torch's default (unbiased) std; a group whose
  rewards are all equal gets A = 0 exactly (counted by zero_spread_groups).
- KL to pi_ref by the k3 estimator exp(d) - d - 1, d = ref - logp clamped to
  +-KL_LOG_RATIO_MAX, over all completion tokens; the entropy mask m_t multiplies the
  policy-gradient term only.
- m_t = 1 for completion tokens with entropy >= the (1 - rho) quantile (linear interpolation) of
  all completion tokens of the rollout batch, gathered across processes when distributed.
- The 1/|o_i| denominators are the full completion lengths (masked tokens still count), then a
  mean over all sequences of the batch (= mean over prompts of the 1/G sum).
- A non-finite number never reaches the weights: update() checks the advantages and the
  completion tokens' entropies before the first pass (one NaN reward makes its whole group's
  advantages NaN; one NaN entropy makes the mask's quantile NaN, so it keeps nothing) and the loss
  and gradient norm of every pass after backward. On failure it drops the gradients, skips the
  optimizer step (weights and optimizer state untouched), stops the remaining passes and names the
  reason in stats["skipped"] ("" when every pass stepped). Processes take this decision together.
- Log-probs come from the decoder's hidden states and the output head applied in chunks of tokens,
  so a 150k vocabulary never materialises logits for the whole batch: forward and backward
  (_ChunkedHead, which recomputes each chunk's logits) hold one chunk's fp32 logits at a time. Under
  autocast the head's matmuls take the autocast dtype's inputs (bf16 on GPU, as the decoder body)
  with fp32 accumulation and fp32 logits; head_fp32 keeps them in fp32 (exact inputs, but fp32
  products run far below the bf16 tensor-core rate, and the head's are a large share of the update's).
- With mu > 1, pi_old's log-probs are pass 1's own (detached): pass 1 runs before any step, so
  it sees exactly the policy that sampled, and no extra forward is needed.
- Micro-batches are formed from the sequences sorted by completion length, so each pads to
  lengths close to its own; the loss and its gradient are sums over sequences and do not depend
  on how sequences are grouped.
- Gradients are averaged across processes by hand: the chunked head bypasses model.forward, so
  the model is not wrapped in DistributedDataParallel.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

QUANTILE_MAX = 2 ** 24  # torch.quantile refuses larger inputs; beyond it we sort ourselves
# k3 evaluates exp(ref - logp): fp32 overflows past a gap of ~88.7 (one token the policy has pushed
# far below the reference) and the loss becomes inf, its gradient NaN. verl and OpenRLHF clamp the
# gap to [-20, 20]; beyond it the KL term is constant (exp(20) ~ 4.9e8) and gives no gradient.
KL_LOG_RATIO_MAX = 20.0
STAT_KEYS = ("loss", "kl", "clip_low", "clip_high", "clip_frac", "grad_norm")  # per pass and averaged


@dataclass
class GRPOConfig:
    group_size: int = 4        # G completions per prompt (official)
    prompts_per_step: int = 8  # prompts per rollout batch (paper: LLM batch 8)
    temperature: float = 1.0   # sampling temperature; logits are divided by it in the loss too
    max_new_tokens: int = 768  # completion length cap (paper 768, official 1024)
    eps: float = 0.2           # PPO clip range of eq. 10
    old_logp: str = "policy"   # pi_old in w: "policy" = the policy before the batch's 1st step | "rollout" = decoder's
    iterations: int = 1        # mu: optimisation passes (optimizer steps) per rollout batch (TRL num_iterations)
    beta: float = 1e-3         # KL weight of eq. 10 (official); 0 skips the reference forward
    rho: float = 0.2           # entropy mask keeps the top-rho tokens of the batch (eq. 11, [31])
    lr: float = 1e-6           # AdamW learning rate
    max_grad_norm: float = 1.0  # gradient-norm clip
    weight_decay: float = 0.0  # AdamW weight decay
    epochs: int = 1            # Alg. 1 lines 13-21: at most this many epochs over the train set
    steps: int = 0             # optional cap on GRPO steps (= rollout batches) for quick runs; 0 = no cap
    eval_every: int = 50       # score a fixed valid subset with the current policy every this many steps (official 50)
    eval_samples: int = 512    # size of that fixed, seeded valid subset
    patience: int = 5          # stop after this many evaluations without a better valid NDCG@10
    max_skips: int = 3         # stop after this many steps in a row skipped for non-finite values
    micro_batch: int = 8       # sequences per forward/backward micro-batch
    logit_chunk: int = 1024    # tokens per output-head chunk in sequence_logprobs
    head_fp32: bool = False    # output head in fp32; else under autocast its matmuls take bf16 inputs (fp32 logits)
    grad_checkpointing: bool = False  # decoder activation checkpointing (rporec.py enables it)
    adv_eps: float = 1e-4      # added to the group std in eq. 8
    save_every: int = 50       # checkpoint every this many steps (0 = only at the end)
    sample_every: int = 10     # print one sampled completion every this many steps


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 8: A_i = (r_i - mean_G) / (std_G + eps) within contiguous groups of size G.
    rewards (N*G,) -> (N*G,); a group with zero spread gets exactly 0. A NaN or inf reward makes
    its whole group NaN: update() then skips the step."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need group_size >= 2 dividing the {rewards.numel()} rewards, got "
                         f"group_size={group_size}; sample G >= 2 completions per prompt")
    r = rewards.float().view(-1, group_size)  # (N, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    flat = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)  # (N, 1)
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Number of groups whose G rewards are all equal (they carry no learning signal)."""
    r = rewards.view(-1, group_size)
    return int((r.max(1).values == r.min(1).values).sum())


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL term of eq. 10: k3 estimator of KL(pi_theta || pi_ref) per token, exp(d) - d - 1 >= 0,
    d = ref - logp clamped to [-KL_LOG_RATIO_MAX, KL_LOG_RATIO_MAX] so it stays finite."""
    d = (ref_logp - logp).clamp(-KL_LOG_RATIO_MAX, KL_LOG_RATIO_MAX)
    return torch.exp(d) - d - 1


def _gather_1d(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a variable-length 1-D tensor from all processes (sizes, pad, gather, unpad)."""
    world = dist.get_world_size()
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros(max(sizes))
    padded[:x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) (linear interpolation) for 1-D x of any size."""
    if x.numel() <= QUANTILE_MAX:
        return torch.quantile(x, q)
    s = x.sort().values
    pos = q * (s.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.2) -> torch.Tensor:
    """Eq. 11 token selection [31]: (B, T) bool, True for valid tokens whose entropy is at or above
    the (1 - rho) quantile of all valid tokens of the batch (of all processes when distributed)."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}; 0.2 keeps the top 20% of tokens")
    vals = entropy[mask].float()  # (n_valid,)
    if dist.is_available() and dist.is_initialized():
        vals = _gather_1d(vals)
    if vals.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    tau = quantile(vals, 1 - rho)
    return mask.bool() & (entropy >= tau)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, ent_mask, eps=0.2, beta=1e-3):
    """Eq. 10 (with eq. 9's ratio w) as a loss to minimise. logp, old_logp, ref_logp (B, T);
    advantages (B,); mask and ent_mask (B, T) bool. Per token:
    -min(w A, clip(w, 1-eps, 1+eps) A) * m_t + beta * k3, w = exp(logp - old_logp); each sequence
    averaged over its valid tokens, then mean over sequences. ref_logp may be None only when
    beta == 0. Returns (loss, stats of floats)."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp; pass the reference model's log-probs "
                         "or set beta=0")
    m = mask.float()  # (B, T)
    adv = advantages.float()[:, None]  # (B, 1)
    w = torch.exp(logp - old_logp)  # (B, T)
    pg = -torch.min(w * adv, w.clamp(1 - eps, 1 + eps) * adv) * ent_mask.float()  # (B, T)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # (B, T)
    per_token = pg + beta * kl if beta > 0 else pg
    lengths = m.sum(1).clamp(min=1)  # (B,) full |o_i|
    loss = ((per_token * m).sum(1) / lengths).mean()
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        low = ((w < 1 - eps) & (adv < 0) & mask).sum() / n
        high = ((w > 1 + eps) & (adv > 0) & mask).sum() / n
        stats = {"kl": float((kl * m).sum() / n), "clip_low": float(low),
                 "clip_high": float(high), "clip_frac": float(low + high)}
    return loss, stats


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


def sequence_logprobs(model, input_ids, attention_mask, n_completion: int, temperature=1.0,
                      chunk=1024, with_entropy=False, head_fp32=False):
    """log pi(o_t | x, o_<t) under softmax(logits / temperature) for the last n_completion tokens
    of input_ids (B, L) (left-padded prompt + right-padded completion) -> (B, T) fp32
    [and entropy (B, T)]. The output head runs on chunks of `chunk` tokens (_ChunkedHead), its
    matmuls in the autocast dtype if autocast is on and not head_fp32."""
    if not 0 < n_completion < input_ids.shape[1]:
        raise ValueError(f"n_completion={n_completion} must be in 1..{input_ids.shape[1] - 1} "
                         "(at least one prompt token precedes the completion)")
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L) positions under left pad
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=pos, use_cache=False).last_hidden_state  # (B, L, H)
    B, T = input_ids.shape[0], n_completion
    h = hidden[:, -T - 1:-1].reshape(B * T, -1)  # (B*T, H) states that predict the completion
    targets = input_ids[:, -T:].reshape(B * T)  # (B*T,)
    head = model.get_output_embeddings()
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and not head_fp32 else torch.float32
    out = _ChunkedHead.apply(h, head.weight, getattr(head, "bias", None), targets, temperature, chunk, dtype,
                             with_entropy)
    if not with_entropy:
        return out.view(B, T)
    return out[0].view(B, T), out[1].view(B, T)


@torch.no_grad()
def rollout(model, prompt_ids, prompt_mask, group_size, decode_cfg, eos_ids, pad_id):
    """G completions per prompt, groups contiguous: prompt_ids (N, P) -> decode.Rollout with
    tokens, mask, logp, entropy of shape (N*G, T) from the sampling pass itself."""
    import decode  # lazy: only sampling needs decode.py
    if getattr(decode_cfg, "greedy", False):
        raise ValueError("GRPO rollouts must sample; set greedy=False in the rollout DecodeConfig")
    ids = prompt_ids.repeat_interleave(group_size, 0)  # (N*G, P)
    am = prompt_mask.repeat_interleave(group_size, 0)  # (N*G, P)
    return decode.generate(model, ids, am, decode_cfg, eos_ids, pad_id, stats=True)


def make_batch(prompt_ids, prompt_mask, ro, advantages, group_size) -> dict:
    """Bundle a rollout for update(): prompts repeated per group, completions and their stats."""
    return {"prompt_ids": prompt_ids.repeat_interleave(group_size, 0),  # (B, P)
            "prompt_mask": prompt_mask.repeat_interleave(group_size, 0),  # (B, P)
            "tokens": ro.tokens, "mask": ro.mask.bool(),  # (B, T)
            "old_logp": ro.logp.float(), "entropy": ro.entropy.float(),  # (B, T)
            "advantages": advantages.float().to(ro.tokens.device)}  # (B,)


def _micro(batch, idx):
    """Inputs of the sequences idx (b,) with all-pad prompt columns and completion tail trimmed."""
    pm, cm = batch["prompt_mask"][idx], batch["mask"][idx]
    p0 = int(pm.any(0).long().argmax())  # first prompt column used by any row (left pad)
    t = max(1, int(cm.sum(1).max()))  # longest completion in the micro-batch
    ids = torch.cat([batch["prompt_ids"][idx, p0:], batch["tokens"][idx, :t]], 1)  # (b, P'+t)
    am = torch.cat([pm[:, p0:].long(), cm[:, :t].long()], 1)  # (b, P'+t)
    return ids, am, t


def _autocast(device, dtype):
    """Autocast context for the policy and reference forwards (a no-op without a dtype)."""
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def _any_rank(flags, device) -> list:
    """Each boolean flag OR-ed over all processes, so every process takes the same skip decision."""
    t = torch.tensor([float(f) for f in flags], device=device)  # (n_flags,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _check_config(cfg: GRPOConfig):
    if cfg.old_logp not in ("policy", "rollout"):
        raise ValueError(f"old_logp={cfg.old_logp!r}; use 'policy' (pi_old = the policy before this batch's "
                         "first step) or 'rollout' (the decoder's log-probs)")
    if not isinstance(cfg.iterations, int) or cfg.iterations < 1:
        raise ValueError(f"iterations={cfg.iterations!r}; use an integer >= 1 (1 = one optimisation step per "
                         "rollout batch, the official setting)")


@torch.no_grad()
def _fixed_logprobs(ref_model, batch, micro, cfg, autocast_dtype):
    """Per micro-batch, the log-probs that stay fixed over the passes: pi_ref's (None when beta == 0)
    and, with old_logp="rollout", the decoder's as pi_old (else None: pass 1 fills in its own)."""
    device = batch["tokens"].device
    refs, olds = [], []
    for idx, ids, am, t in micro:
        with _autocast(device, autocast_dtype):
            refs.append(sequence_logprobs(ref_model, ids, am, t, cfg.temperature, cfg.logit_chunk,
                                          head_fp32=cfg.head_fp32) if cfg.beta > 0 else None)
        olds.append(batch["old_logp"][idx, :t] if cfg.old_logp == "rollout" else None)
    return refs, olds


def _pass(model, optimizer, batch, micro, ent_mask, refs, olds, cfg, autocast_dtype):
    """One optimisation pass of eq. 10 over all micro-batches (losses scaled so that their sum is
    the full-batch mean): backward, gradient average across processes, grad-norm clip, optimizer
    step. An empty olds[i] takes this pass's log-probs (w = 1), which are then pi_old for the later
    passes: pass 1 runs before any step, on the policy that sampled. Returns (stats, reason); a
    non-empty reason (non-finite loss or gradient norm) means the gradients were dropped and the
    optimizer did not step."""
    mask, device = batch["mask"], batch["tokens"].device
    B = mask.shape[0]
    n_tok = mask.sum().clamp(min=1).item()
    optimizer.zero_grad(set_to_none=True)
    st = dict.fromkeys(STAT_KEYS, 0.0)
    for i, ((idx, ids, am, t), ref) in enumerate(zip(micro, refs)):
        with _autocast(device, autocast_dtype):
            logp = sequence_logprobs(model, ids, am, t, cfg.temperature, cfg.logit_chunk, head_fp32=cfg.head_fp32)
        if olds[i] is None:
            olds[i] = logp.detach()  # (b, t)
        loss, parts = grpo_loss(logp, olds[i], ref, batch["advantages"][idx], mask[idx, :t], ent_mask[idx, :t],
                                cfg.eps, cfg.beta)
        (loss * len(idx) / B).backward()
        st["loss"] += loss.item() * len(idx) / B
        share = mask[idx].sum().item() / n_tok  # token-level stats: weight by valid tokens
        for k in ("kl", "clip_low", "clip_high", "clip_frac"):
            st[k] += parts[k] * share
    params = [p for p in model.parameters() if p.grad is not None]
    if dist.is_available() and dist.is_initialized():
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    bad_loss, bad_grad = _any_rank([not math.isfinite(st["loss"]), not math.isfinite(st["grad_norm"])], device)
    reason = "non-finite loss" if bad_loss else "non-finite gradient norm" if bad_grad else ""  # on any process
    if not reason:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)  # also parameters the optimizer does not hold: no stale NaN grads
    return st, reason


@torch.no_grad()
def finite_outputs(model, ids, mask, autocast_dtype=None) -> bool:
    """Whether the policy's next-token logits on prompts ids, mask (b, P) are finite on every process. A finite
    but far too large update (a far too high lr) can break the weights with every gradient finite; the next
    rollout would then sample from NaN probabilities."""
    with _autocast(ids.device, autocast_dtype):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits  # (b, 1, V)
    return not _any_rank([not bool(torch.isfinite(logits).all())], ids.device)[0]


def update(model, ref_model, optimizer, batch: dict, cfg: GRPOConfig, autocast_dtype=None) -> dict:
    """Eq. 10 (ratio of eq. 9, entropy mask of eq. 11) optimised on a rollout batch (make_batch):
    cfg.iterations passes of micro-batches of cfg.micro_batch sequences, one grad-norm clip and
    optimizer step each. autocast_dtype: e.g. torch.bfloat16 on GPU. Returns the pass-averaged
    STAT_KEYS, "kept" (share of tokens in the mask), "passes" (per-pass STAT_KEYS of the passes that
    stepped) and "skipped" ("" or why the step was skipped; the weights never see a NaN)."""
    _check_config(cfg)
    mask, device = batch["mask"], batch["tokens"].device
    bad_adv, bad_ent = _any_rank([not bool(torch.isfinite(batch["advantages"]).all()),
                                  not bool(torch.isfinite(batch["entropy"][mask]).all())], device)
    if bad_adv or bad_ent:
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        why = ("non-finite advantage (a NaN or inf reward poisons its group: check the rewards)" if bad_adv
               else "non-finite entropy on a completion token (check the rollout's logits)")
        return {**dict.fromkeys(STAT_KEYS, math.nan), "kept": math.nan, "passes": [], "skipped": why}
    ent_mask = entropy_mask(batch["entropy"], mask, cfg.rho)  # (B, T), once per rollout batch
    # (idx, ids, am, t) per micro-batch, the same for every pass; similar completion lengths pad together
    order = torch.argsort(mask.sum(1), descending=True, stable=True)  # (B,)
    micro = [(idx, *_micro(batch, idx)) for idx in order.split(cfg.micro_batch)]
    refs, olds = _fixed_logprobs(ref_model, batch, micro, cfg, autocast_dtype)
    passes, skipped = [], ""
    for k in range(cfg.iterations):
        st, reason = _pass(model, optimizer, batch, micro, ent_mask, refs, olds, cfg, autocast_dtype)
        if reason:
            skipped = (f"pass {k + 1} of {cfg.iterations}: {reason} (this process: loss {st['loss']:.4g}, "
                       f"grad norm {st['grad_norm']:.4g})")
            break
        passes.append(st)
    avg = {k: sum(p[k] for p in passes) / len(passes) if passes else math.nan for k in STAT_KEYS}
    kept = ent_mask.sum().item() / mask.sum().clamp(min=1).item()
    return {**avg, "kept": kept, "passes": passes, "skipped": skipped}
