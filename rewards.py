"""Stage II rewards of RPORec (paper §2.2, eq. 7).

Every completion gets six scores, combined by eq. 7:
    r = r_fmt * (a0 r_fmt + a1 r_clean + a2 r_ndcg + a3 r_sim + a4 r_comp + a5 r_ent)
- r_fmt   (§2.2.1) <think>, </think>, <answer>, </answer> in this order, with a non-empty CoT y
          (the first <think> to the first </think> after it) and a non-empty answer z (the last
          <answer>...</answer> after the think block), as the official regex
          (.*)<think>(.*)</think>(.*)<answer>(.*)</answer>(.*) accepts. Tag words inside the think
          block are allowed (Qwen3 restates "inside <answer> and </answer>" while thinking).
- r_clean (§2.2.1) max(0, 1 - L_out / kappa), L_out = the characters before <think> plus those
          after </answer> (official pre_len + after_len: plain counts, whitespace included).
- r_ndcg  (§2.2.2) 1 / log2(rank + 1) of the target among itself and k negatives fixed per
          sample; NaN when a score is not finite, so the caller's non-finite check skips the step.
- r_sim, r_comp (§2.2.3) from the frozen reference model's summary y_hat of the CoT y.
- r_ent   (§2.2.3, eq. 11) E_top20% - E_mean over the CoT tokens' policy entropies.
Each term is a pure function of a batch; `score` (Algorithm 1 lines 16-18) runs the models that
feed them (the frozen Rechead, the reference model's summaries, the frozen encoder) and eq. 7.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

import data
from evaluate import strict_rank
from plumbing import decode
from plumbing.flags import POSITIVE, RATE, SEED, Own, Range, setting
from plumbing.processes import DEVICE

TERMS = ("fmt", "clean", "ndcg", "sim", "comp", "ent")  # the reward terms of eq. 7, in order
LABELS = {"fmt": "format r_fmt", "clean": "clean output r_clean", "ndcg": "Rechead ranking r_ndcg",
          "sim": "summary similarity r_sim", "comp": "compression r_comp", "ent": "entropy r_ent"}
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"

SUMMARY_PROMPT = (
    "Summarize the following reasoning into a short rationale that keeps only what matters for "
    "the recommendation. Reply with the rationale only.\n\nReasoning:\n{cot}"
)


@dataclass
class RewardConfig:
    w_fmt: float = setting(0.1, Range(0))  # a0, format reward weight (official)
    w_clean: float = setting(0.1, Range(0))  # a1, clean-output reward weight (official)
    w_ndcg: float = setting(0.5, Range(0))  # a2, ranking reward weight (official)
    w_sim: float = setting(0.1, Range(0))  # a3, summary-similarity reward weight (official)
    w_comp: float = setting(0.1, Range(0))  # a4, compression reward weight (official)
    w_ent: float = setting(0.1, Range(0))  # a5, entropy reward weight (official)
    kappa: float = setting(100.0, POSITIVE)  # r_clean: L_out at which the reward reaches 0
    delta: float = setting(0.5, Range(-1, 1))  # r_sim: cosine threshold (strict >)
    negatives: int = setting(49, Range(1))  # r_ndcg: negatives per candidate set (candidate set = 1
    # + negatives)
    seed: int = setting(0, SEED)  # r_ndcg: candidate set of sample i drawn with seed + i
    rho: float = setting(0.2, RATE)  # r_ent: top fraction of CoT tokens in E_top (paper: top 20%)
    summary_max_new_tokens: int = setting(128, Range(1))  # greedy summary length cap (official 128)
    drop: str = setting("", Own("comma-separated reward terms"))  # comma-separated terms to drop
    # (ablations -fmt,-clean,...): weight -> 0; "fmt" also removes the r_fmt gate of eq. 7, since
    # with the gate kept -fmt would only shift every well-formed reward by a0

    def dropped(self) -> set[str]:
        names = {d.strip().lstrip("-") for d in self.drop.split(",") if d.strip()}
        unknown = names - set(TERMS)
        if unknown:
            raise ValueError(f"unknown reward term(s) {sorted(unknown)} in drop={self.drop!r}; "
                             f"use a comma-separated subset of {', '.join(TERMS)}")
        return names

    def weights(self) -> dict:
        """The a_k of eq. 7 keyed by term; dropped terms get 0."""
        dropped = self.dropped()
        return {k: 0.0 if k in dropped else float(getattr(self, f"w_{k}")) for k in TERMS}

    def check(self):
        try:
            self.dropped()
        except ValueError as e:
            raise ValueError(f"--rewards.drop: {e}") from None

    def labels(self) -> dict:
        """{term: its name} of the terms that count (weight > 0), for the plots."""
        return {k: LABELS[k] for k, w in self.weights().items() if w}

    @property
    def gate(self) -> bool:
        """Whether eq. 7's multiplicative r_fmt gate applies (off only for the -fmt ablation)."""
        return "fmt" not in self.dropped()


def _blocks(text: str):
    """Character spans (start of open tag, end of close tag, inner start, inner end) of the think
    block and the answer block as parse_completion defines them; None when a block is missing.

    The answer block is the last <answer> ... </answer> pair after the think block: the last
    </answer> and the last <answer> before it, which is the pair the official regex's greedy groups
    pick. Tags inside the think block are part of y and never start or end the answer.
    """
    think = answer = None
    i = text.find(THINK_OPEN)
    j = text.find(THINK_CLOSE, i + len(THINK_OPEN)) if i >= 0 else -1
    if j >= 0:
        think = (i, j + len(THINK_CLOSE), i + len(THINK_OPEN), j)
    lo = think[1] if think else 0
    b = text.rfind(ANSWER_CLOSE, lo)
    a = text.rfind(ANSWER_OPEN, lo, b) if b >= 0 else -1
    if a >= 0:
        answer = (a, b + len(ANSWER_CLOSE), a + len(ANSWER_OPEN), b)
    return think, answer


def _cot_span(text: str) -> tuple[int, int]:
    """(start, end) of the CoT y: inside the think block, or without a complete one the text before
    <answer> (all of it when there is no answer)."""
    think, _ = _blocks(text)
    if think is not None:
        return think[2], think[3]
    cut = text.find(ANSWER_OPEN)
    return 0, len(text) if cut < 0 else cut


def parse_completion(text: str) -> tuple[str | None, str | None]:
    """Split a completion into (think, answer), each stripped, None when missing.

    think = y, the text between the first <think> and the first </think> after it (None if either
    is missing, e.g. a CoT cut off by the length limit); tag words inside it stay part of y.
    answer = z, the text of the last <answer> ... </answer> pair after the think block (anywhere
    when there is no think block), so a restated or drafted answer before the final one is skipped
    and format_reward, clean_reward and parse_completion see the same blocks.
    An empty tag pair gives "" (not None); format_reward rejects it, and callers that need a
    usable answer should test truthiness. A CoT with no answer gives (think, None).
    """
    think, answer = _blocks(text)
    return (text[think[2]:think[3]].strip() if think else None,
            text[answer[2]:answer[3]].strip() if answer else None)


def split_reasoning(text: str) -> tuple[str, str | None]:
    """(y, z) of one completion: the CoT, and the answer or None when it did not parse (eq. 2 then
    falls back to the history)."""
    start, end = _cot_span(text)
    return text[start:end].strip(), (parse_completion(text)[1] or None)


def format_reward(text: str) -> float:
    """r_fmt (§2.2.1): 1.0 iff <think>, </think>, <answer>, </answer> occur in this order with a
    non-empty (after strip) y and z as parse_completion reads them: y from the first <think> to the
    first </think> after it, z the last answer pair after that. Tags inside y, repeated answer
    pairs and text between or around the blocks are allowed (the official regex accepts them);
    the outside text is penalised by clean_reward."""
    think, answer = parse_completion(text)
    return float(bool(think) and bool(answer))


def clean_reward(text: str, kappa: float = 100.0) -> float:
    """r_clean (§2.2.1) = max(0, 1 - L_out / kappa), L_out = the characters before the think
    block's <think> plus those after the answer block's </answer> (official pre_len + after_len:
    plain character counts, whitespace included; text between the blocks does not count).
    With a block missing, L_out counts everything outside the block that is there: before <answer>
    when the think block is missing, after </think> when the answer block is missing, and every
    character when there is neither. Only the -fmt ablation sees these cases, since eq. 7's r_fmt
    gate zeroes them otherwise."""
    if kappa <= 0:
        raise ValueError(f"kappa must be > 0, got {kappa}; pass a positive scale such as 100")
    spans = [s for s in _blocks(text) if s is not None]
    l_out = spans[0][0] + len(text) - spans[-1][1] if spans else len(text)
    return max(0.0, 1.0 - l_out / kappa)


def ndcg_rewards(scores: torch.Tensor) -> torch.Tensor:
    """r_ndcg (§2.2.2) for a batch: scores (B, k+1), the target in column 0 -> (B,) float32 1 /
    log2(rank + 1), rank = 1 + number of candidates scoring strictly higher (ties count in the
    target's favour). A row with any non-finite score gets NaN instead of a reward (NaN compares
    False, so its target would otherwise rank first), so the caller's non-finite check skips the
    step."""
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (B, k+1) with the target in column 0, got shape "
                         f"{tuple(scores.shape)}; stack one candidate row per completion")
    rank = strict_rank(scores[:, 1:], scores[:, :1]).float()  # (B,)
    rank = rank.masked_fill(~torch.isfinite(scores).all(1), math.nan)
    return 1.0 / torch.log2(rank + 1.0)  # (B,)


def candidates(index: int, target: int, n_items: int, k: int, seed: int) -> torch.Tensor:
    """Candidate set for r_ndcg: (k+1,) long, the target first, then k distinct negatives drawn
    uniformly from 1..n_items without 0 (pad) and the target. Fixed per sample: the generator is
    seeded with seed + index, so a sample sees the same set at every GRPO step."""
    if not 1 <= target <= n_items:
        raise ValueError(f"target {target} is not an item id in 1..{n_items}; "
                         "check the dataset split")
    if k > n_items - 1:
        raise ValueError(f"cannot draw {k} distinct negatives from {n_items - 1} items; "
                         f"lower RewardConfig.negatives to at most {n_items - 1}")
    g = torch.Generator().manual_seed(seed + index)
    neg = torch.randperm(n_items - 1, generator=g)[:k] + 1  # (k,) in 1..n_items-1
    neg = neg + (neg >= target).long()  # skip the target: 1..n_items without it
    return torch.cat([torch.tensor([target]), neg])


def entropy_reward(entropies: torch.Tensor, rho: float = 0.2) -> float:
    """r_ent (§2.2.3, eq. 11) = mean of the ceil(rho * n) largest CoT token entropies minus the
    mean of all n; 0 for an empty CoT, NaN when any entropy is not finite (the caller's non-finite
    check then skips the step instead of training on a reward that hides broken logits)."""
    n = entropies.numel()
    if n == 0:
        return 0.0
    e = entropies.detach().float().flatten()
    if not bool(torch.isfinite(e).all()):
        return math.nan
    k = max(1, math.ceil(round(rho * n, 6)))  # round: 0.2 * 15 must give 3, not 4
    return float(e.topk(k).values.mean() - e.mean())


def format_rewards(texts: list[str]) -> torch.Tensor:
    """r_fmt of a batch of completions, (B,)."""
    return torch.tensor([format_reward(t) for t in texts])


def clean_rewards(texts: list[str], kappa: float) -> torch.Tensor:
    """r_clean of a batch of completions, (B,)."""
    return torch.tensor([clean_reward(t, kappa) for t in texts])


def similarity_rewards(cos: torch.Tensor, delta: float) -> torch.Tensor:
    """r_sim (§2.2.3) = 1{cos(e(y), e(y_hat)) > delta} for a batch: cos (B,) -> (B,) float32;
    strict, so cos == delta gives 0. A row without a summary passes cos = -inf."""
    return (cos > delta).float()


def compression_rewards(summary_lens: torch.Tensor, cot_lens: torch.Tensor) -> torch.Tensor:
    """r_comp (§2.2.3) = clip(|y_hat| / |y|, 0, 1) for a batch: lengths in tokens (B,) -> (B,)
    float32; 0 where the CoT is empty."""
    ratio = summary_lens.float() / cot_lens.float().clamp(min=1)
    return torch.where(cot_lens > 0, ratio.clamp(0, 1), torch.zeros_like(ratio))


def entropy_rewards(entropy: torch.Tensor, cot: torch.Tensor, rho: float) -> torch.Tensor:
    """r_ent (eq. 11) of a batch: per-token entropies (B, T) over each row's CoT tokens cot (B, T)
    -> (B,). A loop over entropy_reward: a masked sort-and-cumsum form would sum in another order
    and move float32 bits."""
    return torch.tensor([entropy_reward(entropy[b][cot[b]], rho) for b in range(entropy.shape[0])])


def total_rewards(parts: dict, weights: dict, gate: bool = True) -> torch.Tensor:
    """Eq. 7 for a batch: r = r_fmt * sum_k a_k r_k over fmt, clean, ndcg, sim, comp, ent, parts
    {term: (B,)} -> (B,) float32. gate=False (the -fmt ablation, RewardConfig.gate) drops the
    leading r_fmt factor. A NaN term (r_ndcg of non-finite Rechead scores, r_ent of non-finite
    entropies) gives a NaN total even under r_fmt = 0 or a zero weight (0 * NaN = NaN), so broken
    scores always reach the caller's non-finite check. Summed in float64 in the order of TERMS and
    rounded once to float32, so each total is bit for bit the plain Python-float sum of eq. 7."""
    missing = [k for k in TERMS if k not in parts or k not in weights]
    if missing:
        raise ValueError(f"reward terms {missing} missing from parts or weights; "
                         f"both need the keys {TERMS}")
    r = {k: torch.as_tensor(parts[k], dtype=torch.float64) for k in TERMS}  # each (B,)
    shapes = {k: tuple(v.shape) for k, v in r.items()}
    if len(set(shapes.values())) > 1 or r["fmt"].dim() != 1:
        raise ValueError(f"reward terms must all be (B,) tensors of one length, got shapes "
                         f"{shapes}; "
                         "pass one value per completion for every term")
    total = torch.zeros_like(r["fmt"])  # (B,)
    for k in TERMS:
        total = total + weights[k] * r[k]
    return (r["fmt"] * total if gate else total).float()


def summary_messages(cot: str) -> list[dict]:
    """Chat messages asking the frozen reference model to compress the CoT y into y_hat
    (§2.2.3). Apply the chat template with thinking off so the reply is the summary itself."""
    return [{"role": "user", "content": SUMMARY_PROMPT.format(cot=cot)}]


def cot_token_mask(token_ids: torch.Tensor, mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """(T,) bool: the completion tokens whose text lies inside the think block (the CoT y).

    Their entropies feed r_ent and their count is |y| in r_comp. Each token is decoded on its own
    and the character offsets accumulated (one batch_decode call instead of O(T^2) prefix decodes).
    Approximation: per-token decoding can differ from decoding the whole sequence in whitespace
    and in multi-byte characters split across tokens; the tags are ASCII, so their positions, and
    hence which tokens lie between them, are unaffected. A token that straddles a tag and CoT text
    counts as CoT. Without a complete think block the CoT is the text before <answer> (all of it
    when there is no answer), as in split_reasoning.
    """
    ids = token_ids[mask.bool()].tolist()
    pieces = tokenizer.batch_decode([[t] for t in ids])
    ends = torch.tensor([len(p) for p in pieces]).cumsum(0)  # (n,) end offset of each token
    out = torch.zeros(token_ids.shape[0], dtype=torch.bool)
    if not ids:
        return out
    text = "".join(pieces)
    cot_start, cot_end = _cot_span(text)  # the same y as split_reasoning's
    starts = ends - torch.tensor([len(p) for p in pieces])
    inside = (ends > cot_start) & (starts < cot_end) & (ends > starts)  # (n,) overlaps the CoT
    out[mask.bool().nonzero().squeeze(1)] = inside
    return out


# ----------------------------------------------------------------------------- eq. 7 on a rollout
@dataclass
class Scored:
    """The rewards of B = N*G completions (groups of G contiguous)."""
    texts: list[str]  # the completions, decoded
    total: torch.Tensor  # (B,) eq. 7
    parts: dict  # {term: (B,)} in TERMS order
    cot_len: torch.Tensor  # (B,) tokens of each CoT y, |y| of r_comp
    summaries: list[str]  # the reference model's y_hat ("" where none was needed)


def score(cfg, ds, head, ref, tok, samples, rollout) -> Scored:
    """Algorithm 1 lines 16-18 for the G completions of each of the N samples: the frozen Rechead's
    scores of the target among k fixed negatives (eq. 5), the six rewards of section 2.2, and eq. 7.
    ref is the frozen initial backbone, which writes the summaries y_hat of r_sim and r_comp."""
    G = cfg.grpo.group_size
    tokens = rollout.tokens.masked_fill(~rollout.mask, tok.pad_token_id)  # (B, T)
    texts = tok.batch_decode(tokens, skip_special_tokens=True)
    B = len(texts)
    owner = [samples[b // G] for b in range(B)]
    x, y, z = data.rechead_inputs(cfg, ds, owner, [split_reasoning(t) for t in texts])
    cot = torch.stack([cot_token_mask(rollout.tokens[b], rollout.mask[b], tok)
                       for b in range(B)])  # (B, T), the CoT's tokens
    k, seed = cfg.rewards.negatives, cfg.rewards.seed
    cand = torch.stack([candidates(s["i"], s["target"], ds.n_items, k, seed)
                        for s in samples]).repeat_interleave(G, 0)  # (B, k+1), one set per group
    with torch.no_grad():  # the target among k fixed negatives, scored by the frozen Rechead
        scores = head.candidate_scores(head.user_vecs(x, y, z), cand.to(DEVICE)).cpu()  # (B, k+1)
    fmt = format_rewards(texts)
    # r_sim, r_comp need a summary: only where the total can be non-zero (eq. 7 multiplies by r_fmt)
    todo = [b for b in range(B) if y[b] and (fmt[b] > 0 or not cfg.rewards.gate)]
    summaries, cos, lens = summarise(cfg, head, ref, tok, y, todo)
    parts = {"fmt": fmt,
             "clean": clean_rewards(texts, cfg.rewards.kappa),
             "ndcg": ndcg_rewards(scores),
             "sim": similarity_rewards(cos, cfg.rewards.delta),
             "comp": compression_rewards(*lens),
             "ent": entropy_rewards(rollout.entropy.float().cpu(), cot, cfg.rewards.rho)}
    head.forget()  # every step brings new CoTs: keep the frozen-embedding cache bounded
    total = total_rewards(parts, cfg.rewards.weights(), cfg.rewards.gate)  # (B,) eq. 7
    return Scored(texts, total, parts, cot.sum(1).float(), summaries)


def summarise(cfg, head, ref, tok, y, todo):
    """The frozen reference model's greedy summaries y_hat of the CoTs y[b], b in todo, in one
    batched call: (summaries [B], cos(e(y), e(y_hat)) (B,) (-inf where none), (|y_hat|, |y|) in
    tokens, each (B,))."""
    B = len(y)
    summaries, cos = [""] * B, torch.full((B,), -math.inf)  # (B,)
    lens = torch.zeros(2, B, dtype=torch.long)  # (2, B)
    if todo:
        greedy = dataclasses.replace(cfg.decode, greedy=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=cfg.rewards.summary_max_new_tokens)
        outs, _, _ = decode.complete(ref, tok, [summary_messages(y[b]) for b in todo], greedy,
                                     thinking=False)
        for b, o in zip(todo, outs):
            summaries[b] = o.strip()
        y_hat, cots = [summaries[b] for b in todo], [y[b] for b in todo]
        cos[todo] = torch.cosine_similarity(head.encode_frozen(cots), head.encode_frozen(y_hat),
                                            dim=-1).float().cpu()
        ids = [tok(t, add_special_tokens=False).input_ids for t in (y_hat, cots)]
        lens[:, todo] = torch.tensor([[len(i) for i in side] for side in ids])  # (2, len(todo))
    return summaries, cos, (lens[0], lens[1])
