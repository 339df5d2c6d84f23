"""GRPO with an entropy token mask, Stage II of RPORec (paper Appendix A.1, eq. 8-11): pure tensor
functions for the advantages (eq. 8), the ratio and clipped loss (eq. 9-10), the k3 KL and the
entropy mask (eq. 11); `rollout` samples G completions per prompt and `update` optimises eq. 10 on
them in micro-batches, `iterations` passes per rollout batch. Each choice the paper leaves open is a
comment where it is made.
"""
import copy
import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plumbing import decode
from plumbing.flags import POSITIVE, RATE, OneOf, Range, setting
from speed import chunked_head

QUANTILE_MAX = 2 ** 24  # torch.quantile refuses larger inputs; beyond it we sort ourselves
# k3 evaluates exp(ref - logp): fp32 overflows past a gap of ~88.7 (a token the policy pushed far
# below the reference), the loss becomes inf and its gradient NaN. verl and OpenRLHF clamp the gap
# to [-20, 20]; beyond it the KL term is constant (exp(20) ~ 4.9e8) and gives no gradient.
KL_LOG_RATIO_MAX = 20.0
STAT_KEYS = ("loss", "kl", "clip_low", "clip_high", "clip_frac", "grad_norm")  # per pass, and mean


@dataclass
class GRPOConfig:
    group_size: int = setting(4, Range(2))  # G completions per prompt (official)
    prompts_per_step: int = setting(8, Range(1))  # prompts per rollout batch (paper: LLM batch 8)
    temperature: float = setting(1.0, Range(0.01, 100))  # sampling temperature; the loss divides by
    # it too (below 0.01, logits / T overflow fp32)
    max_new_tokens: int = setting(768, Range(1))  # completion length cap (paper 768, official 1024)
    eps: float = setting(0.2, Range(0, 1, open="both"))  # PPO clip range of eq. 10
    old_logp: str = setting("policy", OneOf("policy", "rollout"))  # pi_old in w: "policy" = the
    # policy before the batch's first step | "rollout" = the decoder's own log-probs
    iterations: int = setting(1, Range(1))  # mu: optimizer steps per rollout batch (TRL's
    # num_iterations)
    beta: float = setting(1e-3, Range(0))  # KL weight of eq. 10 (official); 0 skips the reference
    rho: float = setting(0.2, RATE)  # the entropy mask keeps the top-rho tokens (eq. 11, [31])
    lr: float = setting(1e-6, POSITIVE)  # AdamW learning rate
    max_grad_norm: float = setting(1.0, POSITIVE)  # gradient-norm clip
    weight_decay: float = setting(0.0, Range(0))  # AdamW weight decay
    epochs: int = setting(1, Range(1), rerun=True)  # Alg. 1 lines 13-21: at most this many epochs
    steps: int = setting(0, Range(0), rerun=True)  # cap on GRPO steps (rollout batches); 0 = none
    eval_every: int = setting(50, Range(1))  # score the valid subset every this many steps
    # (official 50)
    eval_samples: int = setting(512, Range(1))  # size of that fixed, seeded valid subset
    patience: int = setting(5, Range(1))  # stop after this many evaluations without a better one
    max_skips: int = setting(3, Range(1))  # stop after this many non-finite steps in a row
    micro_batch: int = setting(8, Range(1), rerun=True)  # sequences per forward/backward
    logit_chunk: int = setting(1024, Range(0), rerun=True)  # tokens per output-head chunk
    # (speed/chunked_head.py); 0 = the plain path, all logits at once
    head_fp32: bool = setting(False)  # output head in fp32; else under autocast its matmuls take
    # the autocast dtype's inputs (fp32 logits)
    grad_checkpointing: bool = setting(False)  # decoder activation checkpointing
    adv_eps: float = setting(1e-4, POSITIVE)  # added to the group std in eq. 8
    save_every: int = setting(50, Range(0), rerun=True)  # checkpoint every this many steps (0: end)
    sample_every: int = setting(10, Range(0), rerun=True)  # print a sampled completion this often


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 8: A_i = (r_i - mean_G) / (std_G + eps) within contiguous groups of size G.
    rewards (N*G,) -> (N*G,). A NaN or inf reward makes its whole group NaN: update() then skips."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need group_size >= 2 dividing the {rewards.numel()} rewards, got "
                         f"group_size={group_size}; sample G >= 2 completions per prompt")
    r = rewards.float().view(-1, group_size)  # (N, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)  # torch's unbiased std
    flat = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)  # (N, 1)
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)  # equal rewards: exactly 0


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Number of groups whose G rewards are all equal (they carry no learning signal)."""
    r = rewards.view(-1, group_size)
    return int((r.max(1).values == r.min(1).values).sum())


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The KL term of eq. 10: the k3 estimator of KL(pi_theta || pi_ref) per token, exp(d) - d - 1
    >= 0, d = ref - logp clamped to [-KL_LOG_RATIO_MAX, KL_LOG_RATIO_MAX] so it stays finite."""
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
    """Eq. 11's token selection m_t [31]: (B, T) bool, True for the valid tokens whose entropy is at
    or above the (1 - rho) quantile of all valid tokens of the batch."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}; 0.2 keeps the top 20% of tokens")
    vals = entropy[mask].float()  # (n_valid,)
    if dist.is_available() and dist.is_initialized():
        vals = _gather_1d(vals)  # the quantile spans every process's rollouts
    if vals.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    tau = quantile(vals, 1 - rho)  # linear interpolation, as torch.quantile
    return mask.bool() & (entropy >= tau)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, ent_mask, eps=0.2, beta=1e-3):
    """Eq. 10, with eq. 9's ratio w, as a loss to minimise. logp, old_logp, ref_logp (B, T);
    advantages (B,); mask and ent_mask (B, T) bool. Per token
    -min(w A, clip(w, 1-eps, 1+eps) A) * m_t + beta * k3, w = exp(logp - old_logp); each sequence
    averaged over its valid tokens, then the mean over sequences. ref_logp may be None only when
    beta == 0. Returns (loss, stats of floats)."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp; pass the reference model's log-probs "
                         "or set beta=0")
    m = mask.float()  # (B, T)
    adv = advantages.float()[:, None]  # (B, 1)
    # eq. 9 writes pi_ref in the ratio, a typo: every GRPO uses pi_old there and pi_ref in the KL
    w = torch.exp(logp - old_logp)  # (B, T)
    # the entropy mask m_t multiplies the policy-gradient term only; the KL covers every token
    pg = -torch.min(w * adv, w.clamp(1 - eps, 1 + eps) * adv) * ent_mask.float()  # (B, T)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # (B, T)
    per_token = pg + beta * kl if beta > 0 else pg
    lengths = m.sum(1).clamp(min=1)  # (B,) the full |o_i|: masked tokens still count
    loss = ((per_token * m).sum(1) / lengths).mean()  # = the mean over prompts of the 1/G sum
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        low = ((w < 1 - eps) & (adv < 0) & mask).sum() / n
        high = ((w > 1 + eps) & (adv > 0) & mask).sum() / n
        stats = {"kl": float((kl * m).sum() / n), "clip_low": float(low),
                 "clip_high": float(high), "clip_frac": float(low + high)}
    return loss, stats


def sequence_logprobs(model, input_ids, attention_mask, n_completion: int, temperature=1.0,
                      chunk=1024, with_entropy=False, head_fp32=False):
    """log pi(o_t | x, o_<t) under softmax(logits / temperature) for the last n_completion tokens
    of input_ids (B, L) (left-padded prompt + right-padded completion) -> (B, T) fp32 [and the
    entropy (B, T), without gradient]. chunk = 0 is the plain path: log_softmax over every logit at
    once. chunk > 0 gives the same numbers through speed/chunked_head.py, `chunk` tokens' logits at
    a time (a 150k vocabulary needs it), its matmuls on the autocast dtype's inputs unless
    head_fp32."""
    if not 0 < n_completion < input_ids.shape[1]:
        raise ValueError(f"n_completion={n_completion} must be in 1..{input_ids.shape[1] - 1} "
                         "(at least one prompt token precedes the completion)")
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L) positions under left pad
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=pos, use_cache=False).last_hidden_state  # (B, L, H)
    B, T = input_ids.shape[0], n_completion
    h, targets = hidden[:, -T - 1:-1], input_ids[:, -T:]  # (B, T, H) states, (B, T) their tokens
    head = model.get_output_embeddings()
    # logits are divided by the sampling temperature everywhere (rollout, policy, reference), so
    # pi_old is the distribution that sampled
    if chunk == 0:
        logp = (head(h).float() / temperature).log_softmax(-1)  # (B, T, V)
        out = logp.gather(-1, targets[..., None])[..., 0]  # (B, T)
        return (out, -(logp.exp() * logp).sum(-1).detach()) if with_entropy else out
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and not head_fp32 \
        else torch.float32
    out = chunked_head.logprobs(h.reshape(B * T, -1), head.weight, getattr(head, "bias", None),
                                targets.reshape(B * T), temperature, chunk, dtype, with_entropy)
    return tuple(o.view(B, T) for o in out) if with_entropy else out.view(B, T)


def reference_and_optimizer(model, cfg: GRPOConfig):
    """pi_ref, a frozen copy of the policy as Stage II starts (the KL of eq. 10, and the summarizer
    of r_sim and r_comp), and AdamW on the policy's weights, made fp32 masters: a bf16 weight would
    round every lr = 1e-6 update away (autocast computes in bf16)."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.float()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    return ref, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def rollout_sampling(decode_cfg, cfg: GRPOConfig):
    """The rollouts' sampling: at cfg.temperature with no top-p or top-k truncation, so that pi_old,
    which the loss divides by the same temperature, is the distribution that sampled."""
    return dataclasses.replace(decode_cfg, greedy=False, temperature=cfg.temperature, top_p=1.0,
                               top_k=0, max_new_tokens=cfg.max_new_tokens)


@torch.no_grad()
def rollout(model, prompt_ids, prompt_mask, group_size, decode_cfg, eos_ids, pad_id):
    """G completions per prompt, groups contiguous: prompt_ids (N, P) -> a Rollout with tokens,
    mask, logp and entropy of shape (N*G, T). The entropies of eq. 11 (m_t and r_ent) come from this
    sampling pass itself, not from a second forward."""
    if getattr(decode_cfg, "greedy", False):
        raise ValueError("GRPO rollouts must sample; set greedy=False in the rollout DecodeConfig")
    ids = prompt_ids.repeat_interleave(group_size, 0)  # (N*G, P)
    am = prompt_mask.repeat_interleave(group_size, 0)  # (N*G, P)
    out = None
    try:
        out = decode.generate(model, ids, am, decode_cfg, eos_ids, pad_id, stats=True)
    except RuntimeError as e:  # transformers' sampler refuses non-finite probabilities itself
        if "probability tensor" not in str(e):
            raise
    bad = out is None or not bool(torch.isfinite(out.logp[out.mask.bool()]).all())
    if _any_rank([bad], ids.device)[0]:  # every process stops together
        raise FloatingPointError("the policy's next-token probabilities are not finite")
    return out


def make_batch(prompt_ids, prompt_mask, out, advantages, group_size) -> dict:
    """A rollout bundled for update(): prompts repeated per group, completions and their stats."""
    return {"prompt_ids": prompt_ids.repeat_interleave(group_size, 0),  # (B, P)
            "prompt_mask": prompt_mask.repeat_interleave(group_size, 0),  # (B, P)
            "tokens": out.tokens, "mask": out.mask.bool(),  # (B, T)
            "old_logp": out.logp.float(), "entropy": out.entropy.float(),  # (B, T)
            "advantages": advantages.float().to(out.tokens.device)}  # (B,)


def _micro(batch, idx):
    """Inputs of the sequences idx (b,), all-pad prompt columns and the completion tail trimmed."""
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
    """Each boolean flag OR-ed over all processes, so every process takes the same decision."""
    t = torch.tensor([float(f) for f in flags], device=device)  # (n_flags,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _check_config(cfg: GRPOConfig):
    if cfg.old_logp not in ("policy", "rollout"):
        raise ValueError(f"old_logp={cfg.old_logp!r}; use 'policy' (pi_old = the policy before "
                         "this batch's first step) or 'rollout' (the decoder's log-probs)")
    if not isinstance(cfg.iterations, int) or cfg.iterations < 1:
        raise ValueError(f"iterations={cfg.iterations!r}; use an integer >= 1 (1 = one "
                         "optimisation step per rollout batch, the official setting)")


@torch.no_grad()
def _fixed_logprobs(ref_model, batch, micro, cfg, autocast_dtype):
    """Per micro-batch, the log-probs that stay fixed over the passes: pi_ref's (None when beta is
    0) and, with old_logp="rollout", the decoder's as pi_old (else None: pass 1 gives its own)."""
    device = batch["tokens"].device
    refs, olds = [], []
    for idx, ids, am, t in micro:
        with _autocast(device, autocast_dtype):
            refs.append(sequence_logprobs(ref_model, ids, am, t, cfg.temperature, cfg.logit_chunk,
                                          head_fp32=cfg.head_fp32) if cfg.beta > 0 else None)
        # "rollout" lets decode-vs-train numerics into w: on SmolLM2-135M, bf16 decoding against a
        # bf16-autocast training forward gives |w - 1| > 0.05 on about a quarter of the tokens
        # (tools/real_model_check.py)
        olds.append(batch["old_logp"][idx, :t] if cfg.old_logp == "rollout" else None)
    return refs, olds


def _pass(model, optimizer, batch, micro, ent_mask, refs, olds, cfg, autocast_dtype):
    """One optimisation pass of eq. 10 over all micro-batches (losses scaled so that their sum is
    the full-batch mean): backward, the gradient averaged across processes, the grad-norm clip, an
    optimizer step. Returns (stats, reason); a non-empty reason (a non-finite loss or gradient
    norm) means the gradients were dropped and the optimizer did not step."""
    mask, device = batch["mask"], batch["tokens"].device
    B = mask.shape[0]
    n_tok = mask.sum().clamp(min=1).item()
    optimizer.zero_grad(set_to_none=True)
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    for i, ((idx, ids, am, t), ref) in enumerate(zip(micro, refs)):
        with _autocast(device, autocast_dtype):
            logp = sequence_logprobs(model, ids, am, t, cfg.temperature, cfg.logit_chunk,
                                     head_fp32=cfg.head_fp32)
        if olds[i] is None:  # pass 1 runs before any step, on the policy that sampled: it is pi_old
            olds[i] = logp.detach()  # (b, t); w = 1 in value on pass 1, as TRL's num_iterations=1
        loss, parts = grpo_loss(logp, olds[i], ref, batch["advantages"][idx], mask[idx, :t],
                                ent_mask[idx, :t], cfg.eps, cfg.beta)
        (loss * len(idx) / B).backward()
        stats["loss"] += loss.item() * len(idx) / B
        share = mask[idx].sum().item() / n_tok  # token-level stats: weighted by valid tokens
        for k in ("kl", "clip_low", "clip_high", "clip_frac"):
            stats[k] += parts[k] * share
    params = [p for p in model.parameters() if p.grad is not None]
    if dist.is_available() and dist.is_initialized():  # by hand: the chunked head bypasses
        for p in params:  # model.forward, so the model is not wrapped in DistributedDataParallel
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    bad_loss, bad_grad = _any_rank([not math.isfinite(stats["loss"]),
                                    not math.isfinite(stats["grad_norm"])], device)
    reason = "non-finite loss" if bad_loss else "non-finite gradient norm" if bad_grad else ""
    if not reason:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)  # what the optimizer does not hold too: no stale NaN grads
    return stats, reason


@torch.no_grad()
def finite_outputs(model, ids, mask, autocast_dtype=None) -> bool:
    """Whether the policy's next-token logits on prompts ids, mask (b, P) are finite on every
    process, in eval mode as the rollout samples (a model can be finite in one mode and not the
    other). A finite but far too large update (a far too high lr) can break the weights with every
    gradient finite; the next rollout would then sample from NaN probabilities."""
    training = model.training
    try:
        with _autocast(ids.device, autocast_dtype):
            logits = model.eval()(input_ids=ids, attention_mask=mask,
                                  logits_to_keep=1).logits  # (b, 1, V)
    finally:
        model.train(training)
    return not _any_rank([not bool(torch.isfinite(logits).all())], ids.device)[0]


def update(model, ref_model, optimizer, batch: dict, cfg: GRPOConfig, autocast_dtype=None) -> dict:
    """Eq. 10 (the ratio of eq. 9, the entropy mask of eq. 11) optimised on a rollout batch
    (make_batch): cfg.iterations passes over micro-batches of cfg.micro_batch sequences, one
    grad-norm clip and optimizer step each. autocast_dtype: e.g. torch.bfloat16 on GPU. Returns the
    pass-averaged STAT_KEYS, "kept" (the share of tokens in the mask), "passes" (the STAT_KEYS of
    each pass that stepped) and "skipped" ("" or why the step was skipped)."""
    _check_config(cfg)
    mask, device = batch["mask"], batch["tokens"].device
    # a non-finite number never reaches the weights: one NaN reward makes its group's advantages
    # NaN, one NaN entropy the mask's quantile (it then keeps nothing); every process skips together
    bad_adv, bad_ent = _any_rank([not bool(torch.isfinite(batch["advantages"]).all()),
                                  not bool(torch.isfinite(batch["entropy"][mask]).all())], device)
    if bad_adv or bad_ent:
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        why = ("non-finite advantage (a NaN or inf reward poisons its group: check the rewards)"
               if bad_adv else
               "non-finite entropy on a completion token (check the rollout's logits)")
        return {**dict.fromkeys(STAT_KEYS, math.nan), "kept": math.nan, "passes": [],
                "skipped": why}
    ent_mask = entropy_mask(batch["entropy"], mask, cfg.rho)  # (B, T), once per rollout batch
    # micro-batches of similar completion lengths pad little; the loss and its gradient are sums
    # over sequences, whatever the grouping. The same micro-batches serve every pass
    order = torch.argsort(mask.sum(1), descending=True, stable=True)  # (B,)
    micro = [(idx, *_micro(batch, idx)) for idx in order.split(cfg.micro_batch)]
    refs, olds = _fixed_logprobs(ref_model, batch, micro, cfg, autocast_dtype)  # taken once
    passes, skipped = [], ""
    for k in range(cfg.iterations):  # mu > 1 (PPO's update epochs): the clip binds after pass 1
        stats, reason = _pass(model, optimizer, batch, micro, ent_mask, refs, olds, cfg,
                              autocast_dtype)
        if reason:
            skipped = (f"pass {k + 1} of {cfg.iterations}: {reason} (this process: loss "
                       f"{stats['loss']:.4g}, grad norm {stats['grad_norm']:.4g})")
            break
        passes.append(stats)
    avg = {k: sum(p[k] for p in passes) / len(passes) if passes else math.nan for k in STAT_KEYS}
    kept = ent_mask.sum().item() / mask.sum().clamp(min=1).item()
    return {**avg, "kept": kept, "passes": passes, "skipped": skipped}
