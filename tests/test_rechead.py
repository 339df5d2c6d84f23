import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_transformers import SentenceTransformer
from torch import nn

from plumbing.toy import build_encoder
from rechead import (
    Rechead,
    RecheadConfig,
    candidate_loss,
    candidates,
    eq5,
    ground_scores,
    make_optimizer,
    sample_negatives,
)

COLOURS = ["red", "blue", "green", "black", "white", "golden", "silver", "purple"]
GENRES = ["jazz", "rock", "blues", "folk", "punk", "soul"]
ITEMS = [""] + [f"{c} {g} album number {i}" for i, (c, g) in
                enumerate((c, g) for c in COLOURS for g in GENRES)][:30]  # 30 items, 0 = pad
X = ["history: red jazz album then blue rock album", "history: green folk album", "history: white soul"]
Y = ["the user likes jazz and red covers", "folk fans like green", "soul listeners"]
Z = ["red jazz album", None, "white soul album"]


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return build_encoder(ITEMS + X + Y + [z for z in Z if z], str(tmp_path_factory.mktemp("m") / "toy"), dim=16)


def make(enc, **kw):
    torch.manual_seed(0)
    cfg = RecheadConfig(**{"encoder": enc, "layers": 1, "heads": 2, "ffn_layers": 2, "dropout": 0.0, **kw})
    return Rechead(cfg, ITEMS, "cpu").eval()


def test_toy_encoder_roundtrip_deterministic(tmp_path):
    texts = ["A red Jazz album", "blue rock"]
    a, b, c = (build_encoder(texts, str(tmp_path / n), dim=8, seed=s) for n, s in [("a", 0), ("b", 0), ("c", 1)])
    ea, eb, ec = (SentenceTransformer(p, device="cpu").encode(["red jazz", "never seen word"]) for p in (a, b, c))
    assert ea.shape == (2, 8)
    assert (ea == eb).all() and not (ea == ec).all()
    assert (SentenceTransformer(a, device="cpu").encode(["RED JAZZ"]) == ea[:1]).all()  # lowercased
    mtime = os.path.getmtime(os.path.join(a, "modules.json"))
    build_encoder(["other words"], a, dim=8, seed=5)  # already there: skipped
    assert os.path.getmtime(os.path.join(a, "modules.json")) == mtime
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="delete it"):
        build_encoder(texts, str(tmp_path / "junk"))


def test_item_vecs_are_frozen_pretrained_embeddings(enc):
    rh = make(enc)
    ref = torch.from_numpy(SentenceTransformer(enc, device="cpu").encode(ITEMS[1:]))
    assert rh.item_vecs.shape == (len(ITEMS), 16)
    assert (rh.item_vecs[0] == 0).all()
    torch.testing.assert_close(rh.item_vecs[1:], ref)
    assert not any(p.requires_grad for p in rh.item_encoder.parameters())


def test_eq2_fallback(enc):
    for trainable in (True, False):
        rh = make(enc, trainable=trainable)
        with torch.no_grad():
            r_x, r_y, r_sel = rh.represent(X, Y, Z)
            r_z = rh.f("ans", [Z[0], Z[2]])
        assert r_x.shape == r_y.shape == r_sel.shape == (3, 16)
        torch.testing.assert_close(r_sel[1], r_x[1])  # z None -> r_x
        torch.testing.assert_close(r_sel[[0, 2]], r_z)  # parsed -> r_z
        assert not torch.allclose(r_sel[0], r_x[0])


def test_ffn_ends_in_linear_and_goes_negative(enc):
    rh = make(enc, ffn_layers=3)
    kinds = [type(m) for m in rh.ffn["his"]]
    assert kinds == [nn.LayerNorm, nn.Linear, nn.LeakyReLU] * 2 + [nn.LayerNorm, nn.Linear]  # official prompt_fn
    assert [type(m) for m in make(enc).ffn["cot"]] == [nn.LayerNorm, nn.Linear, nn.LeakyReLU, nn.LayerNorm, nn.Linear]
    with torch.no_grad():
        out = rh.ffn["his"](torch.randn(256, 16, generator=torch.Generator().manual_seed(0)))
        r_x = rh.f("his", X)
    # an FFN ending in LeakyReLU also has negative entries, but tiny ones (slope 0.01): measure the mass
    assert out[out < 0].abs().sum() > 0.2 * out.abs().sum()
    assert (out < 0).float().mean() > 0.2
    assert r_x[r_x < 0].abs().sum() > 0.2 * r_x.abs().sum()


def test_f_gate_is_the_official_mlp(enc):
    for official in (False, True):
        g = make(enc, official=official).f_gate
        assert [type(m) for m in g] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
        assert [(m.in_features, m.out_features) for m in g if isinstance(m, nn.Linear)] == [(32, 16), (16, 16), (16, 1)]


@pytest.mark.parametrize("official", [False, True])
def test_eq4_gate_known_inputs(enc, official):
    rh = make(enc, official=official, gamma=0.3)
    shift = 0.0 if official else 0.5
    b = 0.7
    with torch.no_grad():  # final layer constant: gamma_0 = gamma * sigmoid(b - shift) whatever the input
        rh.f_gate[-1].weight.zero_()
        rh.f_gate[-1].bias.fill_(b)
        g = rh.gate(torch.randn(4, 16), torch.randn(4, 16))
    assert g.shape == (4, 1)
    torch.testing.assert_close(g, torch.full((4, 1), 0.3 / (1 + math.exp(-(b - shift)))))
    with torch.no_grad():  # f_gate = mean(leaky(leaky(r_sel + r_rea))): the input now matters
        first, middle, last = rh.f_gate[0], rh.f_gate[2], rh.f_gate[4]
        first.weight.copy_(torch.cat([torch.eye(16), torch.eye(16)], dim=1))
        middle.weight.copy_(torch.eye(16))
        last.weight.fill_(1 / 16)
        for m in (first, middle, last):
            m.bias.zero_()
        r_sel = torch.tensor([[1.0], [-1.0]]).expand(2, 16)
        r_rea = torch.tensor([[2.0], [-3.0]]).expand(2, 16)
        g = rh.gate(r_sel, r_rea)
    logits = [3.0, -4.0 * 0.01 * 0.01]  # LeakyReLU's negative slope 0.01, applied twice
    torch.testing.assert_close(g, torch.tensor([[0.3 / (1 + math.exp(-(v - shift)))] for v in logits]))


def test_user_vecs_compose_eq3_eq4_and_scores(enc):
    rh = make(enc)
    with torch.no_grad():
        h = rh.user_vecs(X, Y, Z)
        r_x, r_y, r_sel = rh.represent(X, Y, Z)
        r_rea = rh.reason(r_x, r_y, r_sel)
        s = rh.scores(h)
    torch.testing.assert_close(h, rh.gate(r_sel, r_rea) * r_rea + r_sel)
    # eq. 3 has no positional encoding, so the r_sel token's output is the same wherever r_sel sits
    with torch.no_grad():
        torch.testing.assert_close(r_rea, rh.reasoner(torch.stack([r_sel, r_y, r_x], 1))[:, 0])
    assert s.shape == (3, len(ITEMS))
    torch.testing.assert_close(s, h @ rh.item_vecs.T)
    assert (s[:, 0] == 0).all()
    with pytest.raises(ValueError, match="one length"):
        rh.user_vecs(X, Y[:2], Z)


def test_ffn_count_official_and_cot_ablation(enc):
    assert set(make(enc).ffn) == {"his", "cot", "ans"}
    assert set(make(enc, official=True).ffn) == {"his", "cot"}
    assert set(make(enc, use_cot=False).ffn) == {"his", "ans"}
    assert set(make(enc, use_cot=False).encoders) == {"his", "ans"}
    rh = make(enc, use_cot=False)
    with torch.no_grad():
        h1, h2 = rh.user_vecs(X, None, Z), rh.user_vecs(X, ["unrelated"] * 3, Z)
        r_x, r_y, r_sel = rh.represent(X, None, Z)
    assert r_y is None and h1.shape == (3, 16)
    torch.testing.assert_close(h1, h2)  # the CoT is ignored
    with pytest.raises(ValueError):
        make(enc).user_vecs(X, None, Z)


def test_cot_ablation_is_h_u_equals_r_sel(enc):
    rh = make(enc, use_cot=False)
    full = make(enc)
    assert not hasattr(rh, "reasoner") and not hasattr(rh, "f_gate")
    assert not any(n.startswith(("reasoner", "f_gate")) for n, _ in rh.named_parameters())
    assert any(n.startswith("reasoner") for n, _ in full.named_parameters())
    assert sum(p.numel() for p in rh.parameters()) < sum(p.numel() for p in full.parameters())
    for trainable in (True, False):
        rh = make(enc, use_cot=False, trainable=trainable)
        with torch.no_grad():
            h = rh.user_vecs(X, None, Z)
            _, _, r_sel = rh.represent(X, None, Z)
            h_none = rh.user_vecs(X, None, [None] * 3)  # no answer parsed, e.g. --model none
            r_x = rh.f("his", X)
            raw = rh.encode_frozen(X)
        assert torch.equal(h, r_sel)
        assert torch.equal(h_none, r_x)
        assert not torch.allclose(h_none, raw)  # r_x went through the history FFN
        with pytest.raises(ValueError, match="-cot"):
            rh.reason(r_x, None, r_sel)
        with pytest.raises(ValueError, match="-cot"):
            rh.gate(r_sel, r_sel)


@pytest.mark.parametrize("trainable", [True, False])
def test_fp16_encoder_trains_in_fp32(enc, tmp_path, trainable):
    half = str(tmp_path / "half")
    SentenceTransformer(enc, device="cpu").half().save(half)
    assert next(SentenceTransformer(half, device="cpu").parameters()).dtype == torch.float16  # fp16 on disk
    rh = make(half, trainable=trainable).train()
    assert rh.item_vecs.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in rh.parameters())
    opt = make_optimizer(rh, lr=1e-2)  # SparseAdam on the trainable encoder tables, Adam on the rest
    pos = torch.tensor([1, 9, 26])
    neg = sample_negatives(pos, len(ITEMS) - 1, 8, torch.Generator().manual_seed(0))
    before = rh.ffn["his"][1].weight.clone()
    loss = rh.loss(rh.user_vecs(X, Y, Z), pos, neg)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, rh.ffn["his"][1].weight)
    # an embedding cache written from an fp16 encoder is read back in fp32
    rh.remember(["cached text"], torch.ones(1, 16, dtype=torch.float16))
    assert rh.encode_frozen(["cached text"]).dtype == torch.float32


def test_frozen_mode_caches(enc):
    rh = make(enc, trainable=False)
    assert not hasattr(rh, "encoders")
    assert all(p.requires_grad for p in rh.ffn.parameters())
    calls = []
    inner = rh.item_encoder.forward
    rh.item_encoder.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
    h1 = rh.user_vecs(X, Y, Z)
    n = len(calls)
    assert n > 0
    h2 = rh.user_vecs(list(reversed(X)), list(reversed(Y)), list(reversed(Z)))
    assert len(calls) == n  # every text already cached
    torch.testing.assert_close(h2, h1.flip(0))


def test_sample_negatives_exclude_pad_and_positive():
    g = torch.Generator().manual_seed(0)
    n_items, k = 3, 50
    seen = set()
    for _ in range(100):
        pos = torch.randint(1, n_items + 1, (16,), generator=g)
        neg = sample_negatives(pos, n_items, k, g)
        assert neg.shape == (16, k) and neg.dtype == torch.long
        assert (neg >= 1).all() and (neg <= n_items).all()
        assert (neg != pos[:, None]).all()
        seen |= {(p, n) for p, row in zip(pos.tolist(), neg.tolist()) for n in row}
    assert seen == {(p, n) for p in range(1, 4) for n in range(1, 4) if p != n}  # every allowed pair occurs
    pos = torch.full((2000,), 2)
    frac = (sample_negatives(pos, n_items, 1, g) == 1).float().mean().item()
    assert abs(frac - 0.5) < 0.05  # uniform over the other items
    a = sample_negatives(pos[:4], 10, 5, torch.Generator().manual_seed(3))
    assert (a == sample_negatives(pos[:4], 10, 5, torch.Generator().manual_seed(3))).all()
    with pytest.raises(ValueError, match="pad"):
        sample_negatives(torch.tensor([0]), 5, 2, g)
    with pytest.raises(ValueError, match="at least 2"):
        sample_negatives(torch.tensor([1]), 1, 2, g)


def test_eq6_by_hand():
    torch.manual_seed(0)
    h, items = torch.randn(3, 4), torch.randn(7, 4)
    pos, neg = torch.tensor([1, 4, 6]), torch.tensor([[2, 3], [1, 1], [5, 2]])
    expect = 0.0
    for b in range(3):
        s = [float(h[b] @ items[v]) for v in [pos[b].item()] + neg[b].tolist()]
        expect += -math.log(math.exp(s[0]) / sum(math.exp(v) for v in s)) / 3
    assert abs(candidate_loss(eq5(h, items[candidates(pos, neg)])).item() - expect) < 1e-5


def test_training_steps_reduce_loss(enc):
    rh = make(enc).train()
    before = rh.item_vecs.clone()
    opt = make_optimizer(rh, lr=1e-2)
    pos = torch.tensor([1, 9, 26])
    neg = sample_negatives(pos, len(ITEMS) - 1, 8, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = rh.loss(rh.user_vecs(X, Y, Z), pos, neg)
        opt.zero_grad()
        loss.backward()
        assert rh.encoders["his"][0].embedding.weight.grad.to_dense().abs().sum() > 0  # encoder copies fine-tune
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(rh.item_vecs, before)  # f_item stays frozen


def test_ground_scores_find_the_named_item(enc):
    rh = make(enc, trainable=False)
    s = ground_scores(rh.encode_frozen([ITEMS[5], ITEMS[17]]), rh.item_vecs)
    assert s.shape == (2, len(ITEMS))
    assert s[:, 1:].argmax(1).tolist() == [4, 16]  # columns shifted by the pad
    assert abs(s[0, 5].item() - 1) < 1e-5 and (s[:, 0] == 0).all()


def test_loss_flag():
    import rporec
    assert rporec.parse_config([]).rechead.loss == "sampled"
    assert rporec.parse_config(["--rechead.loss", "full"]).rechead.loss == "full"
    for bad, msg in ((["--rechead.loss", "softmax"], "one of"),
                     (["--rechead.loss", "full", "--rechead.negatives", "9"], "does not use")):
        with pytest.raises(SystemExit, match=msg):
            rporec.parse_config(bad)
