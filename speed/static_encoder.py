"""The fast path of a trainable StaticEmbedding encoder, the paper's encoder type (a table of token vectors,
averaged). rechead.encode runs sentence-transformers' own forward: the tokenizer on every text of every batch,
and a gradient over the whole vocabulary table. Here each distinct text is tokenised once into a bag of distinct
token ids with weights count / length (StaticBags), a batch gathers only the table rows it touches, and with
sparse=True the gradient and the optimizer step (SparseAdam, in Optimizer) cover those rows only. The vectors
are encode()'s: tests/test_rechead_sparse.py holds them equal.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from plumbing.report import progress


class StaticBags:
    """Texts as bags of distinct tokens, each distinct text tokenised once by the encoder's own tokenizer and kept
    by text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # text -> (token ids, mean weights)

    def add(self, texts: list[str]):
        """Tokenise the texts not seen yet, with the encoder's own tokenizer and settings (truncation included),
        as StaticEmbedding.preprocess does. A weighted sum of the rows is then StaticEmbedding's mean."""
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            for t, e in zip(new, self.tokenizer.encode_batch(new, add_special_tokens=False)):
                ids, counts = np.unique(np.asarray(e.ids, dtype=np.int64), return_counts=True)
                self.cache[t] = ids, (counts / max(len(e.ids), 1)).astype(np.float32)

    def add_all(self, texts: list[str], chunk: int = 4096):
        """Every distinct text up front, with a progress bar: cheaper on a busy CPU than many small tokenizer
        calls between training steps, and no epoch waits on the tokenizer."""
        texts = list(dict.fromkeys(texts))
        for i in progress(range(0, len(texts), chunk), desc="tokenising texts (static encoder)"):
            self.add(texts[i:i + chunk])

    def batch(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (T,), weights (T,) and offsets (B,) of the texts' bags, for F.embedding_bag."""
        self.add(texts)
        bags = [self.cache[t] for t in texts]
        offsets = np.cumsum([0] + [len(ids) for ids, _ in bags[:-1]])  # (B,)
        ids = np.concatenate([ids for ids, _ in bags])  # (T,)
        weights = np.concatenate([w for _, w in bags])  # (T,)
        return (torch.from_numpy(ids).to(device), torch.from_numpy(weights).to(device),
                torch.from_numpy(offsets).to(device))

    def clear(self):
        self.cache.clear()


def encode(st, bags: StaticBags, texts: list[str], sparse: bool, device) -> torch.Tensor:
    """The StaticEmbedding model st's vectors of texts (B, d), equal to rechead.encode(st, texts): the mean of each
    text's token rows, then the model's later modules (Normalize). Only the U rows the batch touches are gathered,
    so with sparse=True the table's gradient is row-sparse, not the whole vocabulary."""
    ids, weights, offsets = bags.batch(texts, device)
    rows, inv = torch.unique(ids, return_inverse=True)  # (U,), (T,)
    table = F.embedding(rows, st[0].embedding.weight, sparse=sparse)  # (U, d)
    r = F.embedding_bag(inv, table, offsets, mode="sum", per_sample_weights=weights)  # (B, d)
    features = {"sentence_embedding": r}
    for module in list(st)[1:]:
        features = module(features)
    return features["sentence_embedding"]


class Optimizer:
    """Adam on the dense parameters and SparseAdam (lazy Adam: a row's moments and value change only when a batch
    touches it) on the row-sparse tables, stepped together; the torch.optim calls the train loop needs."""

    def __init__(self, dense: list[nn.Parameter], sparse: list[nn.Parameter], lr: float):
        self.optimizers = [torch.optim.Adam(dense, lr=lr)] if dense else []
        if sparse:
            self.optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
        if not self.optimizers:
            raise ValueError("the Rechead has no trainable parameters; unfreeze something before training it")

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict):
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"optimizer state has {len(state['optimizers'])} parts, this run {len(self.optimizers)}: "
                             "it was saved with another --rechead.sparse / --rechead.item_ids setting")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
