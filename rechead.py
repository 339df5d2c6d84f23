"""Rechead: the reasoning-augmented recommendation head of RPORec (paper section 2.1, eq. 1-6).

r_x, r_y, r_z = f_his(x), f_cot(y), f_ans(z)                       eq. 1 (sentence-transformer + FFN)
r_sel = r_z if the answer z parsed else r_x                          eq. 2
r_rea = TransformerEncoder([r_x; r_y; r_sel]) at the r_sel position  eq. 3
gamma_0 = gamma * sigmoid(f_gate([r_sel || r_rea]) - 0.5)
h_u = gamma_0 * r_rea + r_sel                                        eq. 4
s(u, v) = h_u . h_v, h_v = f_item(text_v) precomputed into H_V       eq. 5
L_rec = cross-entropy over the positive and k sampled negatives      eq. 6

The FFN is n blocks of [LayerNorm, Linear] with LeakyReLU between blocks and none after the last, so r_x, r_y
can be negative (an FFN ending in an activation makes them almost non-negative, which handicaps eq. 5).
f_gate is the official MLP Linear(2d, d), LeakyReLU, Linear(d, d), LeakyReLU, Linear(d, 1) in both modes;
official=True drops the "- 0.5" and the FFN on the answer. The `-cot` ablation (use_cot=False, paper 3.3:
"removes CoT inputs and reasoning-augmented modeling") has no f_cot, eq. 3 or gate: h_u = r_sel, which is
r_x when no answer parsed (the history-only Rechead). Encoders compute in fp32 whatever dtype they were saved in.

Trainable StaticEmbedding copies (the paper's encoder type) take a fast path with the same vectors: each distinct
text is tokenised once, and a batch gathers only the table rows it touches, so with sparse=True the gradient and
the optimizer step (SparseAdam, see make_optimizer) cover those rows, not the whole vocabulary. item_ids=True
(beyond the paper) adds a learnable, zero-initialised vector per item to h_v; eq. 5 is `eq5` in every use.

Also: `ground_scores` (the `-I` ablation: answer -> items by cosine of the pre-trained encoder, no Rechead);
the toy encoder for the `toy` preset and the tests is toy.build_encoder.
The train script owns the training loop; this module gives it the model, the sampler and the loss.
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding
from torch import nn
from tqdm import tqdm


@dataclass
class RecheadConfig:
    encoder: str = "sentence-transformers/static-retrieval-mrl-en-v1"  # hub id or local folder, all four f_*
    trainable: bool = True  # fine-tune the three encoder copies (official); False = one frozen encoder, cached
    official: bool = False  # official-code variant: FFN on history and CoT only, no "-0.5" in the gate
    use_cot: bool = True  # False = `-cot` ablation: no CoT input, no eq. 3 or gate; h_u = r_sel
    gamma: float = 0.1  # eq. 4 scale of the reasoning branch, in (0, 1)
    gate_shift: float = 0.5  # the "- 0.5" inside eq. 4's sigmoid (forced to 0 when official=True)
    layers: int = 4  # eq. 3 TransformerEncoder layers
    heads: int = 8  # eq. 3 attention heads (must divide the encoder dimension d)
    dropout: float = 0.1  # eq. 3 TransformerEncoder dropout (torch default)
    ffn_layers: int = 3  # [LayerNorm, Linear(d, d)] blocks after the encoders, LeakyReLU between, none at the end
    max_seq_length: int = 0  # tokens kept per text; 0 = the encoder's own limit (none for StaticEmbedding)
    history_chars: int = 0  # character budget of x (newest items kept); 0 = data.max_history_chars
    history_items: int = 0  # x is built from the newest N history items (0 = all, as the paper); prompts are unchanged
    item_ids: bool = False  # beyond the paper: a learnable vector per item, zero-initialised, added to h_v in eq. 5
    sparse: bool = True  # row-sparse grads + SparseAdam for static-encoder and item-id tables; must be False under DDP
    lr: float = 1e-3  # Adam learning rate (official)
    batch_size: int = 128  # training samples per step (official)
    negatives: int = 49  # k in eq. 6 (official)
    epochs: int = 100  # maximum training epochs (official)
    patience: int = 5  # early stopping: epochs without a better valid NDCG@10
    encode_batch: int = 64  # texts per forward when encoding without gradients (items, frozen cache)


def load_encoder(name: str, max_seq_length: int, device) -> SentenceTransformer:
    """A sentence-transformer from a hub id or local folder, with truncation set, in fp32: model2vec and
    potion static models ship fp16 weights, which would not mix with the fp32 FFN and eq. 3-4."""
    st = SentenceTransformer(name, device=str(device)).float()
    if max_seq_length > 0:
        if isinstance(st[0], StaticEmbedding):  # its max_seq_length is a read-only inf; truncate in the tokenizer
            st[0].tokenizer.enable_truncation(max_seq_length)
        else:
            st.max_seq_length = max_seq_length
    return st


def encode(st: SentenceTransformer, texts: list[str], device) -> torch.Tensor:
    """Differentiable encoding (preprocess + forward; `tokenize` is deprecated in sentence-transformers 6)."""
    features = st.preprocess(list(texts))
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    return st(features)["sentence_embedding"]  # (B, d)


def ffn(d: int, n: int) -> nn.Sequential:
    """Eq. 1's FFN as the official code has it: [LN, Linear, LeakyReLU, ..., LN, Linear], ending in Linear."""
    layers = []
    for i in range(n):
        if i:
            layers.append(nn.LeakyReLU())
        layers += [nn.LayerNorm(d), nn.Linear(d, d)]
    return nn.Sequential(*layers)


def gate_mlp(d: int) -> nn.Sequential:
    """Eq. 4's f_gate, the official `final_gate`: [r_sel || r_rea] (2d) -> one logit."""
    return nn.Sequential(nn.Linear(2 * d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))


class Rechead(nn.Module):
    def __init__(self, cfg: RecheadConfig, item_texts: list[str], device):
        super().__init__()
        if len(item_texts) < 2:
            raise ValueError(f"item_texts has {len(item_texts)} entries; pass the dataset's texts list "
                             "(index 0 = pad item, then one text per item id 1..N)")
        self.cfg, self.device = cfg, torch.device(device)
        self.item_encoder = load_encoder(cfg.encoder, cfg.max_seq_length, self.device).requires_grad_(False)
        self.d = d = self.item_encoder.get_embedding_dimension()
        if d % cfg.heads:
            raise ValueError(f"encoder dimension {d} is not divisible by heads={cfg.heads} (--rechead.heads); pick heads "
                             f"dividing {d}")
        if cfg.history_items < 0:
            raise ValueError(f"history_items={cfg.history_items}; use 0 (all history items) or a positive count")
        self._cache: dict[str, torch.Tensor] = {}  # text -> frozen pre-trained embedding (d,)
        self._bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # text -> (token ids, mean weights), static path
        kinds = ["his", "cot", "ans"] if cfg.use_cot else ["his", "ans"]
        if cfg.trainable:  # separate fine-tuned copies of the pre-trained encoder (official)
            self.encoders = nn.ModuleDict({k: copy.deepcopy(self.item_encoder).requires_grad_(True) for k in kinds})
        first = self.item_encoder[0]
        self.static = cfg.trainable and isinstance(first, StaticEmbedding) and first.embedding.mode == "mean"
        with_ffn = [k for k in kinds if k != "ans" or not cfg.official]  # official code: no FFN on the answer
        self.ffn = nn.ModuleDict({k: ffn(d, cfg.ffn_layers) for k in with_ffn})
        if cfg.use_cot:  # the -cot ablation has no reasoning branch at all, so no parameters for it
            layer = nn.TransformerEncoderLayer(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
            self.reasoner = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.f_gate = gate_mlp(d)
        h_v = self.encode_frozen(item_texts[1:])  # (N, d), f_item = pre-trained encoder alone
        # Not persistent: recomputed from item_texts at construction, keeps checkpoints small.
        self.register_buffer("item_vecs", torch.cat([torch.zeros(1, d, device=self.device), h_v]), persistent=False)
        if cfg.item_ids:  # from_pretrained: zeros without drawing random numbers, so other inits match a plain head
            self.item_ids = nn.Embedding.from_pretrained(torch.zeros(len(item_texts), d), freeze=False,
                                                         padding_idx=0, sparse=cfg.sparse)
        self._cache.clear()  # item texts are not user-side inputs; free the memory
        self.to(self.device)

    @torch.no_grad()
    def encode_frozen(self, texts: list[str]) -> torch.Tensor:
        """Pre-trained encoder embeddings (B, d), no gradients, cached in memory by text."""
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(new), self.cfg.encode_batch):
            chunk = new[i:i + self.cfg.encode_batch]
            self._cache.update(zip(chunk, encode(self.item_encoder, chunk, self.device)))
        return torch.stack([self._cache[t] for t in texts])

    def forget(self):
        """Empty the frozen-embedding and token caches (Stage II sees new CoTs every step; keep memory bounded)."""
        self._cache.clear()
        self._bags.clear()

    def knows(self, text: str) -> bool:
        return text in self._cache

    def remember(self, texts: list[str], vecs: torch.Tensor | None):
        """Seed the frozen-embedding cache, e.g. from disk: texts[i] -> vecs[i] (d,), kept in fp32."""
        self._cache.update(zip(texts, [] if vecs is None else vecs.to(self.device, torch.float32)))

    def tokenise(self, texts: list[str]):
        """Cache each new text as a bag of distinct token ids with weights count / text length (a weighted sum is
        then StaticEmbedding's mean). Lazy in bags(); calling it once up front on every text is cheaper on a busy
        CPU than many small tokenizer calls interleaved with training steps."""
        new = list(dict.fromkeys(t for t in texts if t not in self._bags))
        if new:  # the encoder's own tokenizer and settings (truncation included), as StaticEmbedding.preprocess
            for t, e in zip(new, self.item_encoder[0].tokenizer.encode_batch(new, add_special_tokens=False)):
                ids, counts = np.unique(np.asarray(e.ids, dtype=np.int64), return_counts=True)
                self._bags[t] = ids, (counts / max(len(e.ids), 1)).astype(np.float32)

    def tokenise_all(self, texts: list[str], chunk: int = 4096):
        """Trainable static encoders: tokenise every distinct text once, up front, with a progress bar, so no
        epoch waits on the tokenizer; a no-op for other encoders."""
        if self.static:
            texts = list(dict.fromkeys(texts))
            for i in tqdm(range(0, len(texts), chunk), desc="tokenising texts (static encoder)"):
                self.tokenise(texts[i:i + chunk])

    def bags(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Texts as bags of distinct tokens for the static path: ids (T,), weights (T,), offsets (B,), each
        distinct text tokenised once (tokenise)."""
        self.tokenise(texts)
        bags = [self._bags[t] for t in texts]
        offsets = np.cumsum([0] + [len(ids) for ids, _ in bags[:-1]])  # (B,)
        ids = np.concatenate([ids for ids, _ in bags])  # (T,)
        weights = np.concatenate([w for _, w in bags])  # (T,)
        return (torch.from_numpy(ids).to(self.device), torch.from_numpy(weights).to(self.device),
                torch.from_numpy(offsets).to(self.device))

    def encode_static(self, kind: str, texts: list[str]) -> torch.Tensor:
        """A trainable StaticEmbedding copy's vectors (B, d), equal to encode(): the mean of each text's token rows,
        then the model's later modules (Normalize). Only the rows the batch touches are gathered, so with
        sparse=True the table's gradient is row-sparse (the U rows), not the whole vocabulary."""
        st = self.encoders[kind]
        ids, weights, offsets = self.bags(texts)
        rows, inv = torch.unique(ids, return_inverse=True)  # (U,), (T,)
        table = F.embedding(rows, st[0].embedding.weight, sparse=self.cfg.sparse)  # (U, d)
        r = F.embedding_bag(inv, table, offsets, mode="sum", per_sample_weights=weights)  # (B, d)
        features = {"sentence_embedding": r}
        for module in list(st)[1:]:
            features = module(features)
        return features["sentence_embedding"]

    def f(self, kind: str, texts: list[str]) -> torch.Tensor:
        """Eq. 1: encoder (fine-tuned copy, or frozen + cached) followed by the FFN where there is one."""
        if not self.cfg.trainable:
            r = self.encode_frozen(texts)
        elif self.static:
            r = self.encode_static(kind, texts)
        else:
            r = encode(self.encoders[kind], texts, self.device)
        return self.ffn[kind](r) if kind in self.ffn else r

    def represent(self, x: list[str], y: list[str] | None, z: list[str | None]):
        """Eq. 1-2: (r_x, r_y, r_sel), each (B, d); r_y is None for the -cot ablation."""
        if len(x) != len(z) or (self.cfg.use_cot and (y is None or len(y) != len(x))):
            raise ValueError(f"x, y, z must be lists of one length (got {len(x)}, "
                             f"{None if y is None else len(y)}, {len(z)}); y may be None only with use_cot=False")
        r_x = self.f("his", x)
        r_y = self.f("cot", y) if self.cfg.use_cot else None
        r_z = self.f("ans", [t if t is not None else "" for t in z])
        parsed = torch.tensor([t is not None for t in z], device=self.device)[:, None]  # (B, 1)
        return r_x, r_y, torch.where(parsed, r_z, r_x)

    def _need_reasoning(self, what: str):
        if not self.cfg.use_cot:
            raise ValueError(f"{what} is the reasoning branch, which the -cot ablation (use_cot=False) removes; "
                             "call user_vecs, which returns h_u = r_sel there")

    def reason(self, r_x, r_y, r_sel) -> torch.Tensor:
        """Eq. 3: transformer over [r_x; r_y; r_sel], output at the r_sel (last) position, (B, d)."""
        self._need_reasoning("eq. 3")
        seq = torch.stack([r_x, r_y, r_sel], dim=1)  # (B, 3, d)
        return self.reasoner(seq)[:, -1]  # (B, d)

    def gate(self, r_sel, r_rea) -> torch.Tensor:
        """Eq. 4 gate: gamma_0 = gamma * sigmoid(f_gate([r_sel || r_rea]) - shift), (B, 1); shift 0 if official."""
        self._need_reasoning("the eq. 4 gate")
        shift = 0.0 if self.cfg.official else self.cfg.gate_shift
        return self.cfg.gamma * torch.sigmoid(self.f_gate(torch.cat([r_sel, r_rea], dim=-1)) - shift)

    def user_vecs(self, x: list[str], y: list[str] | None, z: list[str | None]) -> torch.Tensor:
        """Eq. 1-4: h_u (B, d). z[i] None = the answer did not parse (eq. 2 fallback to history).
        The -cot ablation (use_cot=False) ignores y and has no reasoning branch: h_u = r_sel."""
        r_x, r_y, r_sel = self.represent(x, y, z)
        if not self.cfg.use_cot:
            return r_sel
        r_rea = self.reason(r_x, r_y, r_sel)
        return self.gate(r_sel, r_rea) * r_rea + r_sel

    forward = user_vecs

    def item_table(self) -> torch.Tensor:
        """h_v for every item, (N+1, d): the frozen text vectors plus the item-ID vectors when item_ids=True.
        Row 0 (the pad item) is zero. For scoring without gradients; training goes through item_rows."""
        return self.item_vecs + self.item_ids.weight if self.cfg.item_ids else self.item_vecs

    def item_rows(self, cand: torch.Tensor) -> torch.Tensor:
        """h_v of the items cand (any shape) -> (*cand.shape, d), gathering only those rows, so an item-ID
        table's gradient reaches only them (row-sparse with sparse=True)."""
        h_v = self.item_vecs[cand]
        return h_v + self.item_ids(cand) if self.cfg.item_ids else h_v

    def scores(self, h_u: torch.Tensor) -> torch.Tensor:
        """Eq. 5 over all items: (B, N+1); column 0 is the pad item (score 0 without item ids), callers ignore it."""
        return eq5(h_u, self.item_table())

    def candidate_scores(self, h_u: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Eq. 5 of each user against its own candidates cand (B, K) -> (B, K), e.g. Stage II's r_ndcg."""
        return eq5(h_u, self.item_rows(cand))

    def loss(self, h_u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Eq. 6 with this head's h_v (item ids included): the positive pos (B,) against its negatives neg (B, k)."""
        return candidate_loss(self.candidate_scores(h_u, candidates(pos, neg)))

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The tables that get row-sparse gradients (sparse=True): trainable StaticEmbedding copies, item ids."""
        if not self.cfg.sparse:
            return []
        tables = [st[0].embedding.weight for st in self.encoders.values()] if self.static else []
        return tables + ([self.item_ids.weight] if self.cfg.item_ids else [])


def sample_negatives(pos: torch.Tensor, n_items: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, k) negatives uniform over items 1..N except each row's positive, drawn with replacement.

    Draw from 1..N-1 and shift draws >= pos up by one: the same distribution as resampling collisions,
    without a loop. Call it once per batch so negatives are fresh."""
    if n_items < 2:
        raise ValueError(f"n_items={n_items}: negative sampling needs at least 2 items")
    if pos.numel() and (pos.min() < 1 or pos.max() > n_items):
        raise ValueError(f"positives must be item ids in 1..{n_items} (0 is the pad item); got {pos.tolist()}")
    neg = torch.randint(1, n_items, (pos.shape[0], k), generator=generator, device=generator.device)  # (B, k)
    neg = neg.to(pos.device)
    return neg + (neg >= pos[:, None]).long()


def eq5(h_u: torch.Tensor, h_v: torch.Tensor) -> torch.Tensor:
    """Eq. 5, s(u, v) = h_u . h_v, for h_u (B, d) and either one item table h_v (M, d) shared by all users -> (B, M)
    or each user's own candidates h_v (B, K, d) -> (B, K)."""
    if h_v.dim() == 2:
        return h_u @ h_v.T
    return torch.einsum("bd,bkd->bk", h_u, h_v)


def candidates(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Eq. 6's candidate list per sample, the positive first: (B, 1+k)."""
    return torch.cat([pos[:, None], neg], dim=1)


def candidate_loss(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 6: mean cross-entropy of column 0 (the positive) against the rest of logits (B, 1+k)."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def rec_loss(h_u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
    """Eq. 6 against a given item table item_vecs (N+1, d); Rechead.loss is the same with the head's own h_v."""
    return candidate_loss(eq5(h_u, item_vecs[candidates(pos, neg)]))


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


def make_optimizer(head: Rechead, lr: float) -> Optimizer:
    """Eq. 6's optimizer: Adam (official), except SparseAdam on the row-sparse tables when head.cfg.sparse.
    Several processes (DistributedDataParallel) need sparse=False: NCCL has no sparse all-reduce, so rather than
    risk it this refuses; sparse=False keeps the tokenise-once path with dense gradients and Adam."""
    sparse = [p for p in head.sparse_parameters() if p.requires_grad]
    if sparse and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError(f"--rechead.sparse true gives row-sparse gradients, which this code does not all-reduce "
                         f"across {torch.distributed.get_world_size()} processes; pass --rechead.sparse false")
    ids = {id(p) for p in sparse}
    dense = [p for p in head.parameters() if p.requires_grad and id(p) not in ids]
    return Optimizer(dense, sparse, lr)


def ground_scores(answer_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
    """`-I` ablation (no Rechead): cosine between the pre-trained encoder's answer vectors (history text
    where the answer did not parse) and every item, (B, N+1); the zero pad row scores 0."""
    return F.normalize(answer_vecs, dim=-1) @ F.normalize(item_vecs, dim=-1).T
