"""The Rechead: RPORec's reasoning-augmented recommendation head (paper section 2.1, eq. 1-6).

r_x, r_y, r_z = f_his(x), f_cot(y), f_ans(z)                     eq. 1 (sentence-transformer + FFN)
r_sel = r_z if the answer z parsed, else r_x                       eq. 2
r_rea = TransformerEncoder([r_x; r_y; r_sel]) at r_sel             eq. 3
gamma_0 = gamma * sigmoid(f_gate([r_sel || r_rea]) - 0.5)
h_u = gamma_0 * r_rea + r_sel                                      eq. 4
s(u, v) = h_u . h_v, h_v = f_item(text_v) precomputed into H_V     eq. 5
L_rec = cross-entropy of the positive against k sampled negatives  eq. 6
        (loss="full", beyond the paper: against every item 1..N, as RecBole trains SASRec)

The `-cot` ablation (use_cot=False; paper 3.3: "removes CoT inputs and reasoning-augmented
modeling") has no f_cot, eq. 3 or gate: h_u = r_sel, which is r_x when no answer parsed (the
history-only Rechead). `ground_scores` is the `-I` ablation: no Rechead, answers go to the items
nearest by the pre-trained encoder's cosine. The train script owns the training loop.
"""
import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from plumbing import checkpoint
from plumbing.flags import POSITIVE, OneOf, Range, Text, setting
from speed import static_encoder


@dataclass
class RecheadConfig:
    encoder: str = setting("sentence-transformers/static-retrieval-mrl-en-v1", Text())  # hub id
    # or local folder: every f_*
    trainable: bool = setting(True)  # fine-tune three encoder copies (official); False = one
    # frozen encoder, cached
    official: bool = setting(False)  # the official code: FFN on history and CoT only, no "- 0.5"
    # in the gate
    use_cot: bool = setting(True)  # False = the -cot ablation: no CoT input, eq. 3 or gate
    gamma: float = setting(0.1, Range(0, 1, open="both"))  # eq. 4's scale of the reasoning branch
    gate_shift: float = setting(0.5, Range())  # the "- 0.5" in eq. 4's sigmoid (0 with official)
    layers: int = setting(4, Range(1))  # eq. 3 TransformerEncoder layers
    heads: int = setting(8, Range(1))  # eq. 3 attention heads (must divide the encoder's width)
    dropout: float = setting(0.1, Range(0, 1, open="high"))  # eq. 3 dropout (torch's default)
    ffn_layers: int = setting(3, Range(0))  # [LayerNorm, Linear(d, d)] blocks after an encoder,
    # LeakyReLU between them, none at the end
    max_seq_length: int = setting(0, Range(0))  # tokens kept per text; 0 = the encoder's limit
    # (none for StaticEmbedding)
    history_chars: int = setting(0, Range(0))  # character budget of x (the newest items kept);
    # 0 = data.max_history_chars
    history_items: int = setting(0, Range(0))  # x from the newest N history items (0 = all, as
    # the paper); the prompts keep every item
    item_ids: bool = setting(False)  # beyond the paper: a learnable vector per item, zero at
    # first, added to h_v in eq. 5
    sparse: bool = setting(True)  # row-sparse gradients and SparseAdam for the static encoder's
    # and the item ids' tables (speed/static_encoder.py); must be False under DDP
    lr: float = setting(1e-3, POSITIVE)  # Adam learning rate (official)
    batch_size: int = setting(128, Range(1))  # training samples per step (official)
    loss: str = setting("sampled", OneOf("sampled", "full"))  # eq. 6 against k sampled negatives
    # (paper); "full": a softmax over every item 1..N
    negatives: int = setting(49, Range(1))  # k in eq. 6 (official); unused by loss="full"
    epochs: int = setting(100, Range(1))  # most training epochs (official)
    patience: int = setting(5, Range(1))  # early stopping: epochs without a better valid NDCG@10
    encode_batch: int = setting(64, Range(1), rerun=True)  # texts per forward when encoding
    # without gradients (items, the frozen cache)


def load_encoder(name: str, max_seq_length: int, device) -> SentenceTransformer:
    """A sentence-transformer from a hub id or a local folder, with truncation set, in fp32:
    model2vec and potion static models ship fp16 weights, which would not mix with the fp32 FFN."""
    try:
        st = SentenceTransformer(name, device=str(device)).float()
    except (OSError, ValueError, RuntimeError) as e:  # missing, corrupt, or no network for a hub id
        raise ValueError(f"could not load the encoder {name!r} (--rechead.encoder): "
                         f"{str(e).splitlines()[0][:300]}; pass a hub id or a local "
                         "sentence-transformers folder") from None
    if max_seq_length > 0:
        if isinstance(st[0], StaticEmbedding):  # its max_seq_length is a read-only inf
            st[0].tokenizer.enable_truncation(max_seq_length)
        else:
            st.max_seq_length = max_seq_length
    return st


def encode(st: SentenceTransformer, texts: list[str], device) -> torch.Tensor:
    """Differentiable encoding, sentence-transformers' own forward: (B, d)."""
    features = st.preprocess(list(texts))  # `tokenize` is deprecated in sentence-transformers 6
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    return st(features)["sentence_embedding"]  # (B, d)


def ffn(d: int, n: int) -> nn.Sequential:
    """Eq. 1's FFN as the official code has it: [LN, Linear, LeakyReLU, ..., LN, Linear]. It ends
    in Linear: ending in an activation makes r_x, r_y almost non-negative, a handicap for eq. 5."""
    layers = []
    for i in range(n):
        if i:
            layers.append(nn.LeakyReLU())
        layers += [nn.LayerNorm(d), nn.Linear(d, d)]
    return nn.Sequential(*layers)


def gate_mlp(d: int) -> nn.Sequential:
    """Eq. 4's f_gate, the official `final_gate` (the paper fixes no form): [r_sel || r_rea] (2d) ->
    one logit."""
    return nn.Sequential(nn.Linear(2 * d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(),
                         nn.Linear(d, 1))


class Rechead(nn.Module):
    def __init__(self, cfg: RecheadConfig, item_texts: list[str], device):
        super().__init__()
        if len(item_texts) < 2:
            raise ValueError(f"item_texts has {len(item_texts)} entries; pass the dataset's texts "
                             "list (index 0 = pad item, then one text per item id 1..N)")
        self.cfg, self.device = cfg, torch.device(device)
        self.item_encoder = load_encoder(cfg.encoder, cfg.max_seq_length, self.device)
        self.item_encoder.requires_grad_(False)  # f_item: the pre-trained encoder alone, frozen
        self.d = d = self.item_encoder.get_embedding_dimension()
        if d % cfg.heads:
            raise ValueError(f"encoder dimension {d} is not divisible by heads={cfg.heads} "
                             f"(--rechead.heads); pick heads dividing {d}")
        if cfg.history_items < 0:
            raise ValueError(f"history_items={cfg.history_items}; use 0 (all history items) or a "
                             "positive count")
        self._cache: dict[str, torch.Tensor] = {}  # text -> frozen pre-trained embedding (d,)
        kinds = ["his", "cot", "ans"] if cfg.use_cot else ["his", "ans"]
        if cfg.trainable:  # separate fine-tuned copies of the pre-trained encoder (official)
            self.encoders = nn.ModuleDict({k: copy.deepcopy(self.item_encoder).requires_grad_(True)
                                           for k in kinds})
        first = self.item_encoder[0]
        self.static = cfg.trainable and isinstance(first, StaticEmbedding) \
            and first.embedding.mode == "mean"
        self.bags = static_encoder.StaticBags(first.tokenizer) if self.static else None
        with_ffn = [k for k in kinds if k != "ans" or not cfg.official]  # official: none on z
        self.ffn = nn.ModuleDict({k: ffn(d, cfg.ffn_layers) for k in with_ffn})
        if cfg.use_cot:  # the -cot ablation has no reasoning branch at all, so no parameters for it
            layer = nn.TransformerEncoderLayer(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
            self.reasoner = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.f_gate = gate_mlp(d)
        h_v = self.encode_frozen(item_texts[1:])  # (N, d), H_V
        # not persistent: recomputed from item_texts at construction, which keeps checkpoints small
        self.register_buffer("item_vecs", torch.cat([torch.zeros(1, d, device=self.device), h_v]),
                             persistent=False)
        if cfg.item_ids:  # from_pretrained: zeros drawing no random numbers, so the rest matches
            self.item_ids = nn.Embedding.from_pretrained(torch.zeros(len(item_texts), d),
                                                         freeze=False, padding_idx=0,
                                                         sparse=cfg.sparse)
        self._cache.clear()  # item texts are no user-side inputs; free the memory
        self.to(self.device)

    # ------------------------------------------------------------------------- the encoders, eq. 1
    @torch.no_grad()
    def encode_frozen(self, texts: list[str]) -> torch.Tensor:
        """Pre-trained encoder embeddings (B, d), no gradients, cached in memory by text."""
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(new), self.cfg.encode_batch):
            chunk = new[i:i + self.cfg.encode_batch]
            self._cache.update(zip(chunk, encode(self.item_encoder, chunk, self.device)))
        return torch.stack([self._cache[t] for t in texts])

    def forget(self):
        """Empty the per-text caches: Stage II brings new CoTs every step; memory stays bounded."""
        self._cache.clear()
        if self.static:
            self.bags.clear()

    def knows(self, text: str) -> bool:
        return text in self._cache

    def remember(self, texts: list[str], vecs: torch.Tensor | None):
        """Seed the frozen-embedding cache, e.g. from disk: texts[i] -> vecs[i] (d,), in fp32."""
        self._cache.update(zip(texts, [] if vecs is None else vecs.to(self.device, torch.float32)))

    def prepare(self, texts: list[str], data_dir: str):
        """Each distinct text's encoder work, once, before training: a frozen encoder embeds it
        (kept under <data_dir>/embeddings, keyed by its weights), a trainable static one tokenises
        it."""
        checkpoint.embed_frozen(self, texts, os.path.join(data_dir, "embeddings"))
        if self.static:
            self.bags.add_all(texts)

    def f(self, kind: str, texts: list[str]) -> torch.Tensor:
        """Eq. 1: the encoder (a fine-tuned copy, or frozen and cached), then the FFN if any."""
        if not self.cfg.trainable:
            r = self.encode_frozen(texts)
        elif not self.static:  # the plain path: sentence-transformers' own forward
            r = encode(self.encoders[kind], texts, self.device)
        else:  # the same vectors, each text tokenised once, row-sparse gradients
            r = static_encoder.encode(self.encoders[kind], self.bags, texts, self.cfg.sparse,
                                      self.device)
        return self.ffn[kind](r) if kind in self.ffn else r

    # ------------------------------------------------------------------------- the user, eq. 2-4
    def represent(self, x: list[str], y: list[str] | None, z: list[str | None]):
        """Eq. 1-2: (r_x, r_y, r_sel), each (B, d); r_y is None for the -cot ablation."""
        if len(x) != len(z) or (self.cfg.use_cot and (y is None or len(y) != len(x))):
            raise ValueError(f"x, y, z must be lists of one length (got {len(x)}, "
                             f"{None if y is None else len(y)}, {len(z)}); y may be None only "
                             "with use_cot=False")
        r_x = self.f("his", x)
        r_y = self.f("cot", y) if self.cfg.use_cot else None
        r_z = self.f("ans", [t if t is not None else "" for t in z])
        parsed = torch.tensor([t is not None for t in z], device=self.device)[:, None]  # (B, 1)
        return r_x, r_y, torch.where(parsed, r_z, r_x)

    def _need_reasoning(self, what: str):
        if not self.cfg.use_cot:
            raise ValueError(f"{what} is the reasoning branch, which the -cot ablation "
                             "(use_cot=False) removes; call user_vecs, which returns h_u = r_sel")

    def reason(self, r_x, r_y, r_sel) -> torch.Tensor:
        """Eq. 3: a transformer over [r_x; r_y; r_sel], its output at r_sel (the last), (B, d)."""
        self._need_reasoning("eq. 3")
        seq = torch.stack([r_x, r_y, r_sel], dim=1)  # (B, 3, d)
        return self.reasoner(seq)[:, -1]  # (B, d)

    def gate(self, r_sel, r_rea) -> torch.Tensor:
        """Eq. 4's gamma_0 = gamma * sigmoid(f_gate([r_sel || r_rea]) - shift), (B, 1)."""
        self._need_reasoning("the eq. 4 gate")
        shift = 0.0 if self.cfg.official else self.cfg.gate_shift  # the official code has no shift
        logit = self.f_gate(torch.cat([r_sel, r_rea], dim=-1))  # (B, 1)
        return self.cfg.gamma * torch.sigmoid(logit - shift)

    def user_vecs(self, x: list[str], y: list[str] | None, z: list[str | None]) -> torch.Tensor:
        """Eq. 1-4: h_u (B, d). z[i] None = the answer did not parse (eq. 2 falls back to x).
        The -cot ablation ignores y and has no reasoning branch: h_u = r_sel."""
        r_x, r_y, r_sel = self.represent(x, y, z)
        if not self.cfg.use_cot:
            return r_sel
        r_rea = self.reason(r_x, r_y, r_sel)
        return self.gate(r_sel, r_rea) * r_rea + r_sel

    forward = user_vecs

    # ------------------------------------------------------------------------- the items, eq. 5-6
    def item_table(self) -> torch.Tensor:
        """h_v of every item, (N+1, d): the frozen text vectors, plus the item-ID vectors with
        item_ids. Row 0 (the pad item) is zero. For scoring; training goes through item_rows."""
        return self.item_vecs + self.item_ids.weight if self.cfg.item_ids else self.item_vecs

    def item_rows(self, cand: torch.Tensor) -> torch.Tensor:
        """h_v of the items cand (any shape) -> (*cand.shape, d), gathering only those rows, so the
        item-ID table's gradient reaches only them (row-sparse with sparse=True)."""
        h_v = self.item_vecs[cand]
        return h_v + self.item_ids(cand) if self.cfg.item_ids else h_v

    def scores(self, h_u: torch.Tensor) -> torch.Tensor:
        """Eq. 5 over all items, (B, N+1); column 0 is the pad item, which callers ignore."""
        return eq5(h_u, self.item_table())

    def candidate_scores(self, h_u: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Eq. 5 of each user against its own candidates cand (B, K) -> (B, K), e.g. r_ndcg's."""
        return eq5(h_u, self.item_rows(cand))

    def loss(self, h_u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Eq. 6 with this head's h_v: the positives pos (B,) against their negatives neg (B, k), or
        with loss="full" against every item 1..N (neg unused: the loop draws it either way, so both
        losses see the same batches for a seed)."""
        if self.cfg.loss == "full":
            return full_loss(h_u, pos, self.item_rows, len(self.item_vecs) - 1)
        return candidate_loss(self.candidate_scores(h_u, candidates(pos, neg)))

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The tables with row-sparse gradients (sparse=True): static encoder copies, item ids."""
        if not self.cfg.sparse:
            return []
        tables = [st[0].embedding.weight for st in self.encoders.values()] if self.static else []
        return tables + ([self.item_ids.weight] if self.cfg.item_ids else [])


def sample_negatives(pos: torch.Tensor, n_items: int, k: int, generator: torch.Generator
                     ) -> torch.Tensor:
    """(B, k) negatives uniform over items 1..N except each row's positive, with replacement. Draws
    from 1..N-1 shifted up by one at and above pos: the distribution of resampling collisions,
    without a loop. Called once per batch, so negatives are fresh."""
    if n_items < 2:
        raise ValueError(f"n_items={n_items}: negative sampling needs at least 2 items")
    if pos.numel() and (pos.min() < 1 or pos.max() > n_items):
        raise ValueError(f"positives must be item ids in 1..{n_items} (0 is the pad item); got "
                         f"{pos.tolist()}")
    neg = torch.randint(1, n_items, (pos.shape[0], k), generator=generator,
                        device=generator.device)  # (B, k)
    neg = neg.to(pos.device)
    return neg + (neg >= pos[:, None]).long()


def eq5(h_u: torch.Tensor, h_v: torch.Tensor) -> torch.Tensor:
    """Eq. 5, s(u, v) = h_u . h_v, for h_u (B, d) and either one item table h_v (M, d) shared by
    all users -> (B, M), or each user's own candidates h_v (B, K, d) -> (B, K)."""
    if h_v.dim() == 2:
        return h_u @ h_v.T
    return torch.einsum("bd,bkd->bk", h_u, h_v)


def candidates(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Eq. 6's candidate list per sample, the positive first: (B, 1+k)."""
    return torch.cat([pos[:, None], neg], dim=1)


def candidate_loss(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 6: the mean cross-entropy of column 0 (the positive) against the rest of logits
    (B, 1+k)."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # (B,)
    return F.cross_entropy(logits, target)


FULL_CHUNK = 16384  # items per chunk of full_loss; a catalogue of at most this many: one plain pass


def full_loss(h_u: torch.Tensor, pos: torch.Tensor, item_rows, n_items: int,
              chunk: int = FULL_CHUNK) -> torch.Tensor:
    """Eq. 6 over the whole catalogue: the mean of log sum_{v=1..N} exp s(u, v) - s(u, pos), the pad
    item 0 never a column. item_rows(ids) -> (*ids.shape, d) gives h_v (Rechead.item_rows). Above
    `chunk` items the log-sum-exp runs chunk by chunk, each recomputed in the backward pass
    (checkpoint), so memory holds one (B, chunk) block of scores, not the whole catalogue's."""
    if n_items <= chunk:
        ids = torch.arange(1, n_items + 1, device=h_u.device)  # (N,)
        return F.cross_entropy(eq5(h_u, item_rows(ids)), pos - 1)

    def lse(h, ids):
        return torch.logsumexp(eq5(h, item_rows(ids)), dim=1)  # (B,)

    parts = [recompute(lse, h_u, torch.arange(a, min(a + chunk, n_items + 1), device=h_u.device),
                       use_reentrant=False) for a in range(1, n_items + 1, chunk)]  # each (B,)
    pos_scores = eq5(h_u, item_rows(pos[:, None]))[:, 0]  # (B,)
    return (torch.logsumexp(torch.stack(parts, dim=1), dim=1) - pos_scores).mean()


def make_optimizer(head: Rechead, lr: float) -> static_encoder.Optimizer:
    """Eq. 6's optimizer: Adam (official), with SparseAdam on the row-sparse tables when
    cfg.sparse. Under DDP it refuses sparse tables (NCCL has no sparse all-reduce); sparse=False
    keeps the tokenise-once path with dense gradients and Adam."""
    sparse = [p for p in head.sparse_parameters() if p.requires_grad]
    if sparse and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError(f"--rechead.sparse true gives row-sparse gradients, which this code does "
                         f"not all-reduce across {torch.distributed.get_world_size()} processes; "
                         "pass --rechead.sparse false")
    ids = {id(p) for p in sparse}
    dense = [p for p in head.parameters() if p.requires_grad and id(p) not in ids]
    return static_encoder.Optimizer(dense, sparse, lr)


def ground_scores(answer_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
    """The -I ablation (no Rechead): the cosine between the pre-trained encoder's answer vectors
    (the history's where no answer parsed) and every item, (B, N+1); the zero pad row scores 0."""
    return F.normalize(answer_vecs, dim=-1) @ F.normalize(item_vecs, dim=-1).T
