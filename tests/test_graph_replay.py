"""fastdecode.py's CUDA-graph path, run on CPU under an emulator with a CUDA graph's semantics:
- capture records the step's ops and changes no tensor that existed before it (it does not execute);
- replay re-runs the recorded ops on the same tensor objects (static addresses), with every Python value
  (shapes, scalars, config) baked in at capture.
A step that kept state in Python, rebound a buffer instead of updating it in place, or relied on the
capture executing would decode differently from eager here, as it would on a GPU."""
import contextlib

import pytest
import torch
from test_decode import NEW, P, pick_eos, prompts, run, tiny
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from plumbing import decode, sampling
from speed import fastdecode


class Ref:  # an op output made during capture: replay binds it anew
    def __init__(self, key):
        self.key = key


class Ext:  # a tensor that existed before capture: replay uses the same object
    def __init__(self, t):
        self.t = t


class FakeGraph:
    replays = 0

    def __init__(self):
        self.ops = []

    def replay(self):
        FakeGraph.replays += 1
        vals = {}
        resolve = lambda a: vals[a.key] if isinstance(a, Ref) else a.t if isinstance(a, Ext) else a
        for i, (func, args, kwargs) in enumerate(self.ops):
            out = func(*tree_map(resolve, args), **tree_map(resolve, kwargs))
            for k, o in enumerate(out if isinstance(out, (tuple, list)) else [out]):
                vals[(i, k)] = o


class Capture(TorchDispatchMode):
    """Runs each op on shadow copies of pre-existing tensors (so they stay unchanged), records it with
    its tensor arguments as Ref/Ext, and hands the caller the original tensor where an op returns a shadow."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph
        self.internal = {}  # id(tensor made during capture) -> its Ref
        self.shadow = {}  # id(pre-existing tensor) -> the copy the ops run on
        self.original = {}  # id(shadow) -> the pre-existing tensor
        self.keep = []  # every op output, alive until capture ends

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def record(a):
            if not isinstance(a, torch.Tensor):
                return a
            return self.internal.get(id(a)) or Ext(a)

        def execute(a):
            if not isinstance(a, torch.Tensor) or id(a) in self.internal:
                return a
            if id(a) not in self.shadow:
                self.shadow[id(a)] = a.clone()
                self.original[id(self.shadow[id(a)])] = a
            return self.shadow[id(a)]

        i = len(self.graph.ops)
        self.graph.ops.append((func, tree_map(record, args), tree_map(record, kwargs)))
        out = func(*tree_map(execute, args), **tree_map(execute, kwargs))
        self.keep.append(out)  # no id() reuse while capturing
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        for k, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and id(o) in self.original:
                outs[k] = self.original[id(o)]  # in-place on a pre-existing tensor: the caller keeps it
            elif isinstance(o, torch.Tensor):
                self.internal[id(o)] = Ref((i, k))
        return type(out)(outs) if isinstance(out, (tuple, list)) else outs[0]


class FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def emulated_graphs(monkeypatch):
    monkeypatch.setattr(fastdecode, "graphs_available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: Capture(g))
    FakeGraph.replays = 0


@pytest.fixture(scope="module")
def qwen3():
    return tiny("qwen3")


def decoded(model, greedy, eos_ids, graph, kv_bucket=8):
    fastdecode.clear_fast_cache(model)
    g = torch.Generator().manual_seed(3)
    return run(model, "fast", eos_ids, stats=True, generator=g, greedy=greedy, cuda_graph=graph, kv_bucket=kv_bucket)


@pytest.mark.parametrize("greedy", [True, False])
def test_graph_replay_equals_eager(qwen3, emulated_graphs, greedy):
    eos = [pick_eos(decoded(qwen3, True, [], False).tokens)]  # rows end mid-batch
    eager = decoded(qwen3, greedy, eos, graph=False)
    assert FakeGraph.replays == 0
    graphed = decoded(qwen3, greedy, eos, graph=True)
    dec = fastdecode._DECODERS[qwen3][-1]
    # attended length grows past P + NEW in buckets of 8: one graph per bucket, captured then replayed
    assert len(dec.graphs) == len({-(-(P + t) // 8) * 8 for t in range(1, NEW)}) >= 2
    assert FakeGraph.replays >= NEW - 1 - len(dec.graphs) - 1
    for name in ("tokens", "mask", "logp", "entropy"):
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
    assert not graphed.mask.all()  # the EOS really stopped some rows


def test_emulator_catches_state_kept_outside_the_graph(qwen3, emulated_graphs, monkeypatch):
    """The emulator has teeth: a step that rebinds `done` instead of updating it in place decodes
    differently once replayed (a real graph would keep writing the old buffer too)."""
    def emit(self, logits, cfg, stats):
        nxt = torch.where(self.done, self.pad, sampling.choose_tokens(logits, cfg, self.noise))
        self.out_tok.index_copy_(1, self.step, nxt[:, None])
        self.out_mask.index_copy_(1, self.step, ~self.done[:, None])
        self.done = self.done | (nxt[:, None] == self.eos).any(1)  # rebinding: invisible to a replayed graph
        self.tok.copy_(nxt)
        self.step += 1
    eos = [pick_eos(decoded(qwen3, True, [], False).tokens)]
    monkeypatch.setattr(fastdecode._FastDecoder, "emit", emit)
    eager = decoded(qwen3, True, eos, graph=False)
    graphed = decoded(qwen3, True, eos, graph=True)
    assert torch.equal(eager.tokens, decoded(qwen3, True, eos, graph=False).tokens)
    assert not torch.equal(graphed.mask, eager.mask)


def test_graph_replay_equals_eager_on_triton_kernels(qwen3, emulated_graphs):
    """The Triton step too: its kernels are torch custom ops, so capture records them and replay reruns them
    on the same cache, start and col tensors (tritondecode.py, in the interpreter on a CPU)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.7,<3.8'; .ci/run does)")
    if torch.cuda.is_available():
        pytest.skip("with a GPU, test_tritondecode.py decodes through real CUDA graphs of the kernels")
    outs = {}
    for graph in (False, True):
        fastdecode.clear_fast_cache(qwen3)
        cfg = decode.DecodeConfig(max_new_tokens=6, backend="fast", kernels="triton", cuda_graph=graph, kv_bucket=8)
        outs[graph] = decode.generate(qwen3, *prompts(), cfg, eos_ids=[], pad_id=0, stats=True,
                                      generator=torch.Generator().manual_seed(3))
    dec = fastdecode._DECODERS[qwen3][-1]
    assert len(dec.graphs) == 2 and FakeGraph.replays == 3  # buckets 16 and 24 (P = 12): 5 steps, 2 captures
    recorded = {str(func) for g in dec.graphs.values() for func, _, _ in g.ops}
    assert {"rporec.rope_qk_cache.default", "rporec.decode_attention.default", "rporec.silu_mul.default"} <= recorded
    assert not [n for n in recorded if "scaled_dot_product" in n or n in ("aten.roll.default", "aten.silu.default")]
    for name in ("tokens", "mask", "logp", "entropy"):
        assert torch.equal(getattr(outs[True], name), getattr(outs[False], name)), name
