"""Stage II rewards of RPORec (paper §2.2, eq. 7).

Every completion gets six scores, combined by eq. 7:
    r = r_fmt * (a0 r_fmt + a1 r_clean + a2 r_ndcg + a3 r_sim + a4 r_comp + a5 r_ent)
- r_fmt   (§2.2.1) the four tags <think>, </think>, <answer>, </answer> each exactly once, in that
          order, with non-empty content. It checks tags only: text before, between or after the
          blocks is r_clean's business. (Were r_fmt to reject outside text, the r_fmt gate of eq. 7
          would leave r_clean constant at 1 whenever it counts.)
- r_clean (§2.2.1) max(0, 1 - L_out / kappa), L_out = non-whitespace characters outside the two
          blocks (whitespace, such as the newline a chat model puts between blocks, is layout,
          not extraneous content).
- r_ndcg  (§2.2.2) 1 / log2(rank + 1) of the target among itself and k negatives fixed per sample.
- r_sim, r_comp (§2.2.3) from the frozen reference model's summary y_hat of the CoT y.
- r_ent   (§2.2.3, eq. 11) E_top20% - E_mean over the CoT tokens' policy entropies.
The functions are pure; rporec.py runs the models (Rechead, summarizer, encoder) and feeds them.
"""
import math
from dataclasses import dataclass

import torch

TERMS = ("fmt", "clean", "ndcg", "sim", "comp", "ent")  # the reward terms of eq. 7, in order
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"

SUMMARY_PROMPT = (
    "Summarize the following reasoning into a short rationale that keeps only what matters for "
    "the recommendation. Reply with the rationale only.\n\nReasoning:\n{cot}"
)


@dataclass
class RewardConfig:
    w_fmt: float = 0.1   # a0, format reward weight (official)
    w_clean: float = 0.1  # a1, clean-output reward weight (official)
    w_ndcg: float = 0.5  # a2, ranking reward weight (official)
    w_sim: float = 0.1   # a3, summary-similarity reward weight (official)
    w_comp: float = 0.1  # a4, compression reward weight (official)
    w_ent: float = 0.1   # a5, entropy reward weight (official)
    kappa: float = 100.0  # r_clean: L_out at which the reward reaches 0
    delta: float = 0.5   # r_sim: cosine threshold (strict >)
    negatives: int = 49  # r_ndcg: negatives per candidate set (candidate set = 1 + negatives)
    seed: int = 0        # r_ndcg: candidate set of sample i drawn with seed + i
    rho: float = 0.2     # r_ent: top fraction of CoT tokens in E_top (paper: top 20%)
    summary_max_new_tokens: int = 128  # greedy summary length cap (official 128)
    drop: str = ""       # comma-separated terms to drop (ablations -fmt,-clean,...): weight -> 0;
                         # "fmt" also removes the r_fmt gate of eq. 7, since with the gate kept
                         # -fmt would only shift every well-formed reward by a0

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

    @property
    def gate(self) -> bool:
        """Whether eq. 7's multiplicative r_fmt gate applies (off only for the -fmt ablation)."""
        return "fmt" not in self.dropped()


def _blocks(text: str):
    """Character spans (start of open tag, end of close tag, inner start, inner end) of the think
    block and the answer block as parse_completion defines them; None when a block is missing."""
    think = answer = None
    i = text.find(THINK_OPEN)
    j = text.find(THINK_CLOSE, i + len(THINK_OPEN)) if i >= 0 else -1
    if j >= 0:
        think = (i, j + len(THINK_CLOSE), i + len(THINK_OPEN), j)
    a = text.find(ANSWER_OPEN, think[1] if think else 0)
    b = text.find(ANSWER_CLOSE, a + len(ANSWER_OPEN)) if a >= 0 else -1
    if b >= 0:
        answer = (a, b + len(ANSWER_CLOSE), a + len(ANSWER_OPEN), b)
    return think, answer


def parse_completion(text: str) -> tuple[str | None, str | None]:
    """Split a completion into (think, answer), each stripped, None when missing.

    think = text between the first <think> and the first </think> after it (None if either is
    missing, e.g. a CoT cut off by the length limit). answer = text between the first <answer>
    after the think block (anywhere when there is no think block) and the next </answer>.
    An empty tag pair gives "" (not None); format_reward rejects it, and callers that need a
    usable answer should test truthiness. A CoT with no answer gives (think, None).
    """
    think, answer = _blocks(text)
    return (text[think[2]:think[3]].strip() if think else None,
            text[answer[2]:answer[3]].strip() if answer else None)


def format_reward(text: str) -> float:
    """r_fmt (§2.2.1): 1.0 iff <think>, </think>, <answer>, </answer> each occur exactly once, in
    this order (so no nesting), and both contents are non-empty after strip. Text outside the
    blocks is allowed here and penalised by clean_reward."""
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    if any(text.count(t) != 1 for t in tags):
        return 0.0
    pos = [text.find(t) for t in tags]
    if pos != sorted(pos):
        return 0.0
    think, answer = parse_completion(text)
    return float(bool(think) and bool(answer))


def clean_reward(text: str, kappa: float = 100.0) -> float:
    """r_clean (§2.2.1) = max(0, 1 - L_out / kappa). L_out counts the non-whitespace characters
    outside the think and answer blocks (tags included in the blocks); stray or repeated tags
    count as outside text. With no blocks at all, every non-whitespace character counts."""
    if kappa <= 0:
        raise ValueError(f"kappa must be > 0, got {kappa}; pass a positive scale such as 100")
    inside = sorted(s[:2] for s in _blocks(text) if s is not None)
    outside, last = [], 0
    for start, end in inside:
        outside.append(text[last:start])
        last = end
    outside.append(text[last:])
    l_out = sum(not c.isspace() for c in "".join(outside))
    return max(0.0, 1.0 - l_out / kappa)


def ndcg_reward(rank: int) -> float:
    """r_ndcg (§2.2.2) = 1 / log2(rank + 1), rank 1-based within the candidate set."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1 (1-based), got {rank}; use candidate_rank()")
    return 1.0 / math.log2(rank + 1)


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


def candidate_rank(scores: torch.Tensor) -> int:
    """1-based rank of column 0 (the target): 1 + number of candidates scoring strictly higher."""
    return 1 + int((scores[1:] > scores[0]).sum())


def similarity_reward(cos: float, delta: float = 0.5) -> float:
    """r_sim (§2.2.3) = 1{cos(e(y), e(y_hat)) > delta}; cos == delta gives 0."""
    return 1.0 if cos > delta else 0.0


def compression_reward(summary_len: int, cot_len: int) -> float:
    """r_comp (§2.2.3) = clip(|y_hat| / |y|, 0, 1), lengths in tokens; an empty CoT gives 0."""
    if cot_len <= 0:
        return 0.0
    return min(1.0, max(0.0, summary_len / cot_len))


def entropy_reward(entropies: torch.Tensor, rho: float = 0.2) -> float:
    """r_ent (§2.2.3, eq. 11) = mean of the ceil(rho * n) largest CoT token entropies minus the
    mean of all n; 0 for an empty CoT."""
    n = entropies.numel()
    if n == 0:
        return 0.0
    k = max(1, math.ceil(round(rho * n, 6)))  # round: 0.2 * 15 must give 3, not 4
    e = entropies.detach().float().flatten()
    return float(e.topk(k).values.mean() - e.mean())


def total_reward(parts: dict, weights: dict, gate: bool = True) -> float:
    """Eq. 7: r = r_fmt * sum_k a_k r_k over fmt, clean, ndcg, sim, comp, ent. gate=False (the
    -fmt ablation, RewardConfig.gate) drops the leading r_fmt factor."""
    missing = [k for k in TERMS if k not in parts or k not in weights]
    if missing:
        raise ValueError(f"reward terms {missing} missing from parts or weights; "
                         f"both need the keys {TERMS}")
    r = sum(weights[k] * parts[k] for k in TERMS)
    return float(parts["fmt"] * r if gate else r)


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
    when there is no answer), as in rporec.split_reasoning.
    """
    ids = token_ids[mask.bool()].tolist()
    pieces = tokenizer.batch_decode([[t] for t in ids])
    ends = torch.tensor([len(p) for p in pieces]).cumsum(0)  # (n,) end offset of each token
    out = torch.zeros(token_ids.shape[0], dtype=torch.bool)
    if not ids:
        return out
    text = "".join(pieces)
    think, _ = _blocks(text)
    if think is None:  # no think block: y is the text before <answer> (rporec.split_reasoning)
        cut = text.find(ANSWER_OPEN)
        think = (0, 0, 0, len(text) if cut < 0 else cut)
    starts = ends - torch.tensor([len(p) for p in pieces])
    inside = (ends > think[2]) & (starts < think[3]) & (ends > starts)  # (n,) overlaps the CoT
    out[mask.bool().nonzero().squeeze(1)] = inside
    return out
