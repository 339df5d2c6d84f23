"""The fast path of trainable StaticEmbedding copies (tokenise once, row-sparse gradients, SparseAdam) and the
item-ID vectors of eq. 5 (RecheadConfig.item_ids)."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import (
    Normalize,
    Pooling,
    WordEmbeddings,
)
from sentence_transformers.sentence_transformer.modules.tokenizer import (
    WhitespaceTokenizer,
)

import rechead
from plumbing.toy import build_encoder
from rechead import (
    Rechead,
    RecheadConfig,
    candidate_loss,
    candidates,
    encode,
    eq5,
    sample_negatives,
)
from speed import static_encoder

ITEMS = [""] + [f"{c} {g} album number {i}" for i, (c, g) in
                enumerate((c, g) for c in ["red", "blue", "green", "black", "white"] for g in ["jazz", "rock", "folk"])]
X = ["history: red jazz album then blue rock album", "history: green folk album folk folk", "history: white album"]
Y = ["the user likes jazz and red covers", "folk fans like green", "white listeners"]
Z = ["red jazz album", None, "white folk album"]
POS = torch.tensor([1, 8, 13])


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return build_encoder(ITEMS + X + Y + [z for z in Z if z], str(tmp_path_factory.mktemp("m") / "toy"), dim=16)


@pytest.fixture(scope="module")
def enc_norm(enc, tmp_path_factory):
    """The toy StaticEmbedding followed by Normalize, the layout of static-retrieval-mrl-en-v1's offline stand-in."""
    out = str(tmp_path_factory.mktemp("n") / "toy_norm")
    SentenceTransformer(modules=[SentenceTransformer(enc, device="cpu")[0], Normalize()], device="cpu").save(out)
    return out


def make(enc, **kw):
    torch.manual_seed(0)
    cfg = RecheadConfig(**{"encoder": enc, "layers": 1, "heads": 2, "ffn_layers": 2, "dropout": 0.0, **kw})
    return Rechead(cfg, ITEMS, "cpu").train()


def negatives(k=6):
    return sample_negatives(POS, len(ITEMS) - 1, k, torch.Generator().manual_seed(0))  # (3, k)


def step(rh, opt, neg):
    opt.zero_grad(set_to_none=True)
    loss = rh.loss(rh.user_vecs(X, Y, Z), POS, neg)
    loss.backward()
    opt.step()
    return loss.item()


class CountingTokenizer:
    """Wraps the encoder's tokenizer and records every text it is asked to tokenise."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def encode_batch(self, texts, **kw):
        self.seen += list(texts)
        return self.tok.encode_batch(texts, **kw)


@pytest.mark.parametrize("model,max_seq_length", [("enc", 0), ("enc_norm", 0), ("enc_norm", 3)])
def test_static_path_equals_encode_and_tokenises_once(request, model, max_seq_length):
    rh = make(request.getfixturevalue(model), max_seq_length=max_seq_length)
    assert rh.static
    texts = X + ["", "never seen words", "album album album red", X[0]]  # empty, unknown, repeated tokens, a duplicate
    for kind in ("his", "cot", "ans"):
        fast = static_encoder.encode(rh.encoders[kind], rh.bags, texts, rh.cfg.sparse, "cpu")
        torch.testing.assert_close(fast, encode(rh.encoders[kind], texts, "cpu"))
    counter = CountingTokenizer(rh.bags.tokenizer)
    rh.bags.tokenizer = counter
    rh.forget()
    with torch.no_grad():
        first = rh.user_vecs(X, Y, Z)
        again = rh.user_vecs(list(reversed(X)), list(reversed(Y)), list(reversed(Z)))
    assert sorted(counter.seen) == sorted(set(X + Y + [z for z in Z if z] + [""]))  # each distinct text once
    torch.testing.assert_close(again, first.flip(0))
    ids, weights, offsets = rh.bags.batch(["album album red", ""], "cpu")
    assert offsets.tolist() == [0, 2] and sorted(weights.tolist()) == pytest.approx([1 / 3, 2 / 3])


@pytest.mark.parametrize("item_ids", [False, True])
def test_sparse_and_dense_sgd_steps_agree(enc_norm, item_ids):
    """One plain SGD step from the same init: the library's own StaticEmbedding forward (dense gradient), the fast
    path with dense gradients and the fast path with row-sparse gradients reach the same parameters."""
    heads = {"library": make(enc_norm, sparse=False, item_ids=item_ids), "dense": make(enc_norm, sparse=False,
             item_ids=item_ids), "sparse": make(enc_norm, item_ids=item_ids)}
    heads["library"].static = False  # encode(): tokenizer + StaticEmbedding.forward every call
    init = {n: p.detach().clone() for n, p in heads["sparse"].named_parameters()}
    neg = negatives()
    for name, rh in heads.items():
        step(rh, torch.optim.SGD([p for p in rh.parameters() if p.requires_grad], lr=0.5), neg)
        table = rh.encoders["his"][0].embedding.weight
        assert table.grad.is_sparse == (name == "sparse")
    ref = dict(heads["library"].named_parameters())
    for name in ("dense", "sparse"):
        for n, p in heads[name].named_parameters():
            torch.testing.assert_close(p, ref[n], atol=1e-6, rtol=0)
    moved = {n for n, p in heads["sparse"].named_parameters() if not torch.equal(p, init[n])}
    assert {"encoders.his.0.embedding.weight", "encoders.cot.0.embedding.weight",
            "encoders.ans.0.embedding.weight"} <= moved
    assert ("item_ids.weight" in moved) == item_ids


def test_make_optimizer_moves_only_the_rows_a_batch_touches(enc):
    rh = make(enc, item_ids=True)
    opt = rechead.make_optimizer(rh, 1e-2)
    assert [type(o) for o in opt.optimizers] == [torch.optim.Adam, torch.optim.SparseAdam]
    sparse = {id(p) for p in rh.sparse_parameters()}
    assert len(sparse) == 4  # his, cot, ans tables and the item ids
    assert sum(len(g["params"]) for g in opt.optimizers[0].param_groups) == \
        sum(1 for p in rh.parameters() if p.requires_grad and id(p) not in sparse)
    before = {n: p.detach().clone() for n, p in rh.named_parameters()}
    neg = negatives()
    step(rh, opt, neg)
    tok = rh.item_encoder[0].tokenizer
    for kind, texts in (("his", X), ("cot", Y), ("ans", [z or "" for z in Z])):
        touched = {i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids}
        n = f"encoders.{kind}.0.embedding.weight"
        changed = (rh.get_parameter(n) != before[n]).any(1).nonzero().flatten().tolist()
        assert set(changed) == touched
    changed = (rh.item_ids.weight != 0).any(1).nonzero().flatten().tolist()
    assert set(changed) == set(torch.cat([POS[:, None], neg], 1).flatten().tolist())
    dense = make(enc, item_ids=True, sparse=False)
    opt = rechead.make_optimizer(dense, 1e-2)
    assert [type(o) for o in opt.optimizers] == [torch.optim.Adam] and dense.sparse_parameters() == []
    step(dense, opt, neg)
    step(dense, opt, neg)
    # dense Adam: a row that never had a gradient has zero moments, so it stays at zero too
    assert set((dense.item_ids.weight != 0).any(1).nonzero().flatten().tolist()) == set(changed)
    state = opt.state_dict()
    opt.load_state_dict(state)
    with pytest.raises(ValueError, match="sparse"):
        rechead.make_optimizer(rh, 1e-2).load_state_dict(state)


def test_make_optimizer_refuses_sparse_gradients_under_ddp(enc, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="--rechead.sparse false"):
        rechead.make_optimizer(make(enc), 1e-3)
    assert [type(o) for o in rechead.make_optimizer(make(enc, sparse=False), 1e-3).optimizers] == [torch.optim.Adam]
    rechead.make_optimizer(make(enc, trainable=False), 1e-3)  # frozen encoder, no item ids: nothing sparse


def test_item_ids_start_at_zero_and_match_the_plain_head(enc):
    plain, with_ids = make(enc), make(enc, item_ids=True)
    assert with_ids.item_ids.weight.shape == (len(ITEMS), 16) and not with_ids.item_ids.weight.any()
    assert with_ids.item_ids.padding_idx == 0
    for n, v in plain.state_dict().items():
        assert torch.equal(v, with_ids.state_dict()[n]), n  # the zero table draws no random numbers
    neg = negatives()
    with torch.no_grad():
        h = plain.user_vecs(X, Y, Z)
        assert torch.equal(with_ids.user_vecs(X, Y, Z), h)
        assert torch.equal(with_ids.scores(h), plain.scores(h))
        assert torch.equal(with_ids.loss(h, POS, neg), plain.loss(h, POS, neg))
        assert torch.equal(plain.loss(h, POS, neg), candidate_loss(eq5(h, plain.item_vecs[candidates(POS, neg)])))
        cand = torch.cat([POS[:, None], neg], 1)  # (3, 7)
        torch.testing.assert_close(with_ids.candidate_scores(h, cand), plain.scores(h).gather(1, cand))


@pytest.mark.parametrize("sparse", [True, False])
def test_item_ids_train_and_survive_a_state_dict_round_trip(enc, sparse):
    rh = make(enc, item_ids=True, sparse=sparse)
    opt = rechead.make_optimizer(rh, 1e-2)
    neg = negatives()
    losses = [step(rh, opt, neg) for _ in range(5)]
    assert losses[-1] < losses[0]
    ids = rh.item_ids.weight.detach()
    assert ids[POS].abs().sum(1).min() > 0 and not ids[0].any()  # positives moved, the pad row did not
    untouched = sorted(set(range(1, len(ITEMS))) - set(torch.cat([POS[:, None], neg], 1).flatten().tolist()))
    assert untouched and not ids[untouched].any()  # items outside every batch keep their text vector
    torch.testing.assert_close(rh.item_table(), rh.item_vecs + ids)
    rh.eval()
    with torch.no_grad():
        h = rh.user_vecs(X, Y, Z)
        torch.testing.assert_close(rh.scores(h), h @ (rh.item_vecs + ids).T)
        expect = rh.scores(h)
    state = rh.state_dict()
    assert "item_ids.weight" in state and "item_vecs" not in state
    fresh = make(enc, item_ids=True, sparse=sparse).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.scores(fresh.user_vecs(X, Y, Z)), expect)
    with pytest.raises(RuntimeError, match="item_ids"):
        make(enc).load_state_dict(state)  # a head without item ids refuses the extra table


def test_non_static_encoder_keeps_the_encode_path(tmp_path):
    words = sorted({w for t in ITEMS + X + Y + [z for z in Z if z] for w in t.lower().split()})
    weights = torch.randn(len(words) + 1, 8, generator=torch.Generator().manual_seed(0)).numpy()  # + padding row
    emb = WordEmbeddings(WhitespaceTokenizer(vocab=words), weights, update_embeddings=True)
    path = str(tmp_path / "words")
    SentenceTransformer(modules=[emb, Pooling(8, "mean")], device="cpu").save(path)
    rh = make(path, item_ids=True)
    assert not rh.static
    texts = X + ["never seen"]
    with torch.no_grad():
        torch.testing.assert_close(rh.f("his", texts), rh.ffn["his"](encode(rh.encoders["his"], texts, "cpu")))
    opt = rechead.make_optimizer(rh, 1e-2)
    assert [type(o) for o in opt.optimizers] == [torch.optim.Adam, torch.optim.SparseAdam]
    assert [p.shape for p in rh.sparse_parameters()] == [rh.item_ids.weight.shape]  # only the item ids
    table = rh.encoders["his"][0].emb_layer.weight
    before = table.detach().clone()
    step(rh, opt, negatives())
    assert not table.grad.is_sparse and not torch.equal(table, before)


def explicit_full_loss(h, table, pos):
    """The full softmax written out: -log_softmax over the real items 1..N (table rows 1..N), mean over users."""
    logp = torch.log_softmax(h @ table[1:].T, dim=1)  # (B, N)
    return -logp[torch.arange(len(pos)), pos - 1].mean()


@pytest.mark.parametrize("item_ids", [False, True])
def test_full_loss_is_log_softmax_over_every_real_item(enc, item_ids):
    rh = make(enc, item_ids=item_ids, loss="full").eval()
    if item_ids:
        with torch.no_grad():
            rh.item_ids.weight[1:].normal_(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = rh.user_vecs(X, Y, Z)
        expect = explicit_full_loss(h, rh.item_table(), POS)
        torch.testing.assert_close(rh.loss(h, POS, negatives()), expect)
        by_hand = sum(math.log(sum(math.exp(h[b] @ rh.item_table()[v]) for v in range(1, len(ITEMS))))
                      - float(h[b] @ rh.item_table()[POS[b]]) for b in range(3)) / 3
        assert abs(rh.loss(h, POS, negatives()).item() - by_hand) < 1e-4
        assert torch.equal(rh.loss(h, POS, negatives(3)), rh.loss(h, POS, negatives(9)))  # neg is unused


def test_full_loss_never_counts_the_pad_item(enc):
    rh = make(enc, item_ids=True, loss="full")
    h = rh.user_vecs(X, Y, Z).detach().requires_grad_(True)
    before = rh.loss(h, POS, negatives())
    with torch.no_grad():
        rh.item_vecs[0] = 100 * h.mean(0)  # the pad row would now win every softmax it took part in
    after = rh.loss(h, POS, negatives())
    assert torch.equal(after, before)
    after.backward()
    grad = rh.item_ids.weight.grad.coalesce()
    assert 0 not in grad.indices().flatten().tolist()
    assert sorted(grad.indices().flatten().tolist()) == list(range(1, len(ITEMS)))  # every real item has a row


@pytest.mark.parametrize("sparse", [True, False])
def test_full_loss_in_chunks_equals_the_plain_loss_and_gradient(enc, sparse):
    """Chunks of 4 and of 7 items (15 items: the last chunk short) against one pass over all 15."""
    grads = {}
    for chunk in (4, 7, rechead.FULL_CHUNK):
        rh = make(enc, item_ids=True, sparse=sparse)
        with torch.no_grad():
            rh.item_ids.weight[1:].normal_(generator=torch.Generator().manual_seed(1))
        h = rh.user_vecs(X, Y, Z)
        loss = rechead.full_loss(h, POS, rh.item_rows, len(ITEMS) - 1, chunk=chunk)
        loss.backward()
        g_ids = rh.item_ids.weight.grad
        grads[chunk] = (loss.detach(), g_ids.to_dense() if g_ids.is_sparse else g_ids,
                        {n: p.grad.to_dense() for n, p in rh.named_parameters() if p.grad is not None})
    loss, g_ids, g_all = grads[rechead.FULL_CHUNK]
    torch.testing.assert_close(loss, explicit_full_loss(h.detach(), rh.item_table().detach(), POS))
    for chunk in (4, 7):
        torch.testing.assert_close(grads[chunk][0], loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grads[chunk][1], g_ids, atol=1e-6, rtol=1e-5)
        assert grads[chunk][2].keys() == g_all.keys()
        for n, g in g_all.items():
            torch.testing.assert_close(grads[chunk][2][n], g, atol=1e-6, rtol=1e-5)
    assert not g_ids[0].any() and g_ids[1:].abs().sum(1).min() > 0


def test_sampled_loss_is_the_default_and_unchanged(enc):
    assert RecheadConfig().loss == "sampled"
    for item_ids in (False, True):
        rh = make(enc, item_ids=item_ids)
        with torch.no_grad():
            h = rh.user_vecs(X, Y, Z)
            cand = torch.cat([POS[:, None], negatives()], 1)  # (3, 7), the positive first
            logits = torch.einsum("bd,bkd->bk", h, rh.item_table()[cand])
            expect = torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
            assert torch.equal(rh.loss(h, POS, negatives()), expect)
            assert torch.equal(make(enc, item_ids=item_ids, loss="sampled").loss(h, POS, negatives()), expect)


@pytest.mark.parametrize("variant", [dict(use_cot=False), dict(use_cot=False, item_ids=True), dict(),
                                     dict(item_ids=True), dict(trainable=False, item_ids=True)])
def test_every_variant_trains_with_the_full_loss(enc, variant):
    """The faithful text path (-cot and with CoTs), item ids, a frozen encoder: full-loss steps lower the loss,
    and with item ids every real item's vector moves, the pad's does not."""
    rh = make(enc, loss="full", **variant)
    opt = rechead.make_optimizer(rh, 1e-2)
    losses = [step(rh, opt, negatives()) for _ in range(5)]
    assert losses[-1] < losses[0]
    if rh.cfg.item_ids:
        ids = rh.item_ids.weight.detach()
        assert not ids[0].any() and ids[1:].abs().sum(1).min() > 0
