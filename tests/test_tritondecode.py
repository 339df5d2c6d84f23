"""tritondecode.py's Triton kernels against the torch code they replace, on random inputs (on a CPU in Triton's
interpreter, see conftest.py; on a GPU compiled): split-KV attention against SDPA in float64 for many head
layouts, buckets, splits and attended spans; the fused RoPE/q-k norm/cache-write and SiLU kernels against
fastdecode's torch ops; and the fast backend on kernels="triton" against HF generate token for token."""
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.7,<3.8'; .ci/run does)")
from test_decode import NEW, PAD, naive_stats, pick_eos, prompts, tiny

from plumbing import decode
from speed import fastdecode, tritondecode

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel(out, ref):
    """||out - ref|| / ||ref||, in float64."""
    return float((out.double() - ref).norm() / ref.norm())


def attention_reference(q, cache, layer, start, col):
    """float64 SDPA of q (B, H, D) over cache[layer] columns [start_b, col], the G heads of a group sharing K/V."""
    B, H, D = q.shape
    Hkv = cache.shape[3]
    k, v = cache[layer, 0].double(), cache[layer, 1].double()  # (B, Hkv, max_len, D)
    cols = torch.arange(k.shape[2], device=q.device)
    mask = (cols >= start[:, None]) & (cols <= col)  # (B, max_len)
    o = F.scaled_dot_product_attention(q.double().view(B, Hkv, H // Hkv, D), k, v, attn_mask=mask[:, None, None])
    return o.reshape(B, H, D)


# (B, Hkv, G, D, max_len, kv_len, splits, block, dtype): one split and many, tiles of 16 and 64 columns, G = 1
# (no GQA), 3 (not a power of two) and 8, a bucket that is no multiple of the split, float32 and bfloat16
CASES = [(1, 1, 1, 16, 64, 64, 1, 16, torch.float32), (3, 2, 2, 32, 128, 128, 4, 16, torch.float32),
         (2, 2, 4, 16, 96, 80, 3, 16, torch.bfloat16), (4, 1, 8, 64, 64, 64, 2, 64, torch.bfloat16),
         (2, 3, 3, 16, 48, 48, 1, 16, torch.float32), (2, 2, 2, 32, 192, 192, 3, 64, torch.float32)]


@pytest.mark.parametrize("B,Hkv,G,D,max_len,kv_len,splits,block,dtype", CASES)
def test_decode_attention_matches_sdpa(B, Hkv, G, D, max_len, kv_len, splits, block, dtype):
    g = torch.Generator().manual_seed(B * 1000 + kv_len)
    for draw in range(2):
        cache = torch.randn(2, 2, B, Hkv, max_len, D, generator=g).to(DEV, dtype)
        q = torch.randn(B, Hkv * G, D, generator=g).to(DEV, dtype)
        col = kv_len - 1 if draw == 0 else int(torch.randint(kv_len // 2, kv_len, (1,), generator=g))
        start = torch.randint(0, col + 1, (B,), generator=g)
        start[0] = col  # one row attends a single column; with several splits the others are empty
        start, col_t = start.to(DEV), torch.tensor([col], device=DEV)
        out = tritondecode.decode_attention(q, cache, 1, start, col_t, kv_len, splits, block)
        assert out.shape == q.shape and out.dtype == dtype and bool(out.isfinite().all())
        ref = attention_reference(q, cache, 1, start, col)
        assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2), (draw, col)
        assert torch.allclose(out[0].double(), cache[1, 1, 0, :, col].double().repeat_interleave(G, 0), atol=1e-2)


def test_n_splits_fills_the_card_and_never_splits_below_a_tile():
    assert tritondecode.n_splits(rows=8, kv_len=768, programs=528) == 12  # batch 1: capped at one tile per split
    assert tritondecode.n_splits(rows=512, kv_len=768, programs=528) == 2  # batch 64
    assert tritondecode.n_splits(rows=1024, kv_len=768, programs=528) == 1
    assert tritondecode.n_splits(rows=8, kv_len=8, programs=528) == 1


@pytest.mark.parametrize("arch,dtype", [("qwen3", torch.float32), ("qwen3", torch.bfloat16), ("llama", torch.float32)])
def test_rope_qk_cache_matches_torch_ops(arch, dtype):
    """q equals fastdecode's torch RoPE (with Qwen3's q/k norm), and the cache differs
    from before only at column col of the layer, where it holds the rotated k and the plain v."""
    model = tiny(arch).to(DEV)
    dec = fastdecode._FastDecoder(model, 8, 32, dtype)
    g = torch.Generator().manual_seed(1)
    dec.start.copy_(torch.randint(0, 10, (8,), generator=g))
    dec.col.fill_(13)
    w = dec.layers[1]
    qkv = torch.randn(8, 1, (dec.H + 2 * dec.Hkv) * dec.D, generator=g).to(DEV, dtype)  # (B, 1, (H+2Hkv)D)
    before = torch.randn(dec.cache.shape, generator=g).to(DEV, dtype)
    dec.cache.copy_(before)
    with torch.no_grad():
        q = tritondecode.rope_qk_cache(qkv[:, 0], w.qk_norm, dec.cos, dec.sin, dec.start, dec.col, dec.cache, 1,
                                       dec.eps)
        pos = dec.col - dec.start
        q_ref, k_ref, v_ref = dec._rope(w, qkv, dec.cos[pos][:, None, None], dec.sin[pos][:, None, None])
    expected = before.clone()
    expected[1, 0, :, :, 13] = k_ref[:, 0]
    expected[1, 1, :, :, 13] = v_ref[:, 0]
    if dtype == torch.float32:
        assert torch.allclose(q, q_ref[:, 0], atol=1e-5) and torch.allclose(dec.cache, expected, atol=1e-5)
    else:  # the kernel rounds to bf16 after each op as torch does; the interpreter truncates where a GPU rounds
        tol = 2 ** -8 if DEV.type == "cuda" else 2 ** -6
        assert rel(q, q_ref[:, 0].double()) < tol and rel(dec.cache, expected.double()) < tol
        if DEV.type == "cuda":
            assert (q == q_ref[:, 0]).float().mean() > 0.9
    assert torch.equal(dec.cache[:, :, :, :, :13], before[:, :, :, :, :13])
    assert torch.equal(dec.cache[0], before[0]) and torch.equal(dec.cache[1, :, :, :, 14:], before[1, :, :, :, 14:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    gu = (3 * torch.randn(5, 2 * 300, generator=torch.Generator().manual_seed(0))).to(DEV, dtype)  # 300: masked tail
    out, ref = tritondecode.silu_mul(gu), fastdecode._swiglu(gu)
    assert out.shape == ref.shape == (5, 300) and out.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(out, ref, atol=1e-6, rtol=1e-6)
    else:  # as in the RoPE test: rounding after each op, truncated by the interpreter
        assert rel(out, ref.double()) < (2 ** -8 if DEV.type == "cuda" else 2 ** -6)


def generate(model, eos_ids, kernels, stats=False, greedy=True, new=8, **kw):
    ids, mask = prompts()
    cfg = decode.DecodeConfig(max_new_tokens=new, backend="fast" if kernels else "hf", greedy=greedy,
                              kernels=kernels or "auto", **kw)
    return decode.generate(model, ids.to(DEV), mask.to(DEV), cfg, eos_ids=eos_ids, pad_id=PAD, stats=stats,
                           generator=torch.Generator(DEV).manual_seed(3))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fast_backend_on_triton_kernels_equals_hf_generate(arch):
    model = tiny(arch).to(DEV)
    free = generate(model, [], None, new=NEW).tokens  # HF, no EOS
    eos = pick_eos(free)
    hf = generate(model, [eos], None)
    out = generate(model, [eos], "triton", stats=True)
    assert torch.equal(out.tokens, hf.tokens) and torch.equal(out.mask, hf.mask)
    assert not out.mask.all() and out.mask[:, -1].any()  # EOS ended some rows, others ran to the end
    ref = generate(model, [eos], "torch", stats=True)
    assert torch.allclose(out.logp, ref.logp, atol=1e-4) and torch.allclose(out.entropy, ref.entropy, atol=1e-4)


def test_triton_bf16_sampling_stats_close_to_naive():
    model = tiny("qwen3").to(DEV, torch.bfloat16)
    out = generate(model, [], "triton", stats=True, greedy=False, new=4)
    logp, ent = naive_stats(model.cpu(), out.tokens.cpu(), 1.0)
    assert (out.logp.cpu() - logp).abs().max() < 0.1 and (out.entropy.cpu() - ent).abs().max() < 0.05


def test_kernel_choice(monkeypatch):
    model = tiny("qwen3")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = decode.DecodeConfig(kernels="auto")
    assert fastdecode.use_triton(model, auto, cuda) and not fastdecode.use_triton(model, auto, cpu)
    if tritondecode.INTERPRETED:  # conftest, without a GPU
        assert fastdecode.use_triton(model, decode.DecodeConfig(kernels="triton"), cpu)
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            fastdecode.use_triton(model, decode.DecodeConfig(kernels="triton"), cpu)
    assert not fastdecode.use_triton(model, decode.DecodeConfig(kernels="torch"), cuda)
    monkeypatch.setattr(fastdecode, "triton_kernels", lambda: None)  # a machine without triton
    assert not fastdecode.use_triton(model, auto, cuda)
    with pytest.raises(ValueError, match="triton does not import.*--decode.kernels torch"):
        fastdecode.use_triton(model, decode.DecodeConfig(kernels="triton"), cuda)
    monkeypatch.undo()
    narrow = tiny("qwen3")
    narrow.config.head_dim = 8  # tl.dot needs 16
    assert not fastdecode.use_triton(narrow, auto, cuda)
    with pytest.raises(ValueError, match="head_dim 8"):
        fastdecode.use_triton(narrow, decode.DecodeConfig(kernels="triton"), cuda)
    with pytest.raises(ValueError, match="kernels"):
        generate(model, [], "cuda")


@torch.no_grad()
def test_triton_step_needs_no_host_sync():
    """As test_decode's check for the torch step: the Triton step's host code, on the meta device (the kernels'
    fake versions), reads no tensor value."""
    dec = fastdecode._FastDecoder(tiny("qwen3").to("meta"), 8, 64)
    for cfg in (decode.DecodeConfig(greedy=True), decode.DecodeConfig(temperature=0.7, top_k=5, top_p=0.9)):
        dec.decode_step(32, cfg, True, triton=True)
    assert dec.out_tok.is_meta


COMPILE = """
import json, re, subprocess, sys, tempfile
from collections import Counter
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from speed import tritondecode
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
results = []
for name, args, consts in json.loads(sys.argv[1]):
    names = list(args) + list(consts)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in args.items()
             if t.startswith("*") or "stride" in a}
    src = triton.compiler.ASTSource(fn=getattr(tritondecode, name), constexprs=consts, attrs=attrs,
                                    signature={**args, **dict.fromkeys(consts, "constexpr")})
    path = Path(tempfile.mkdtemp()) / "k.cubin"
    path.write_bytes(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"])
    usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    results.append([Counter(re.findall(r"\\b((?:LDGSTS|LDG|HMMA|LDL|STL)[.A-Z0-9]*)", sass)),
                    re.search(r"REG:\\d+ STACK:\\d+", usage).group()])
print(json.dumps(results))
"""


def compile_for_hopper(kernels):
    """[(SASS opcode counts, resource line)] of tritondecode's kernels [(name, {arg: Triton type}, constexprs)]
    compiled for sm_90 as a launch would be: pointers and strides 16-divisible, as the decoder's are (Triton
    specialises on that). In a fresh process: the interpreter the other tests run in patches triton.language."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(kernels)], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return [(collections.Counter(ops), usage) for ops, usage in json.loads(out.stdout)]


def test_kernels_compile_for_hopper_with_wide_loads_and_no_spills():
    """Without a GPU: Triton's own ptxas builds every kernel for the H100/H200 (sm_90) at Qwen3-0.6B's shapes, and
    the SASS streams K/V with 16-byte loads, multiplies on the tensor cores, and keeps everything in registers."""
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton build has no NVIDIA backend tools (ptxas, cuobjdump)")
    ptr = dict.fromkeys(("start_ptr", "col_ptr"), "*i64")
    strides = dict.fromkeys(("stride_b", "stride_h", "stride_n"), "i32")
    attn = {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), "*bf16"), **ptr, "out_ptr": "*bf16",
            "part_ptr": "*fp32", "stat_ptr": "*fp32", **strides, "scale": "fp32", "split": "i32", "n_splits": "i32"}
    rope = {**dict.fromkeys(("qkv_ptr", "norm_ptr", "cos_ptr", "sin_ptr"), "*bf16"), **ptr,
            **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), "*bf16"), **strides, "eps": "fp32"}
    (ops, usage), *others = compile_for_hopper([
        ("_attn_split", attn, dict(HKV=8, G=2, G_PAD=16, D=128, SINGLE=False, BLOCK=64, PRECISION="tf32",
                                   UPCAST=False)),
        ("_rope_qk_cache", rope, dict(H=16, HKV=8, D=128, NH_PAD=32, HAS_NORM=True)),
        ("_silu_mul", {"gu_ptr": "*bf16", "out_ptr": "*bf16"}, dict(N=3072, BLOCK=1024)),
        ("_attn_merge", {"part_ptr": "*fp32", "stat_ptr": "*fp32", "out_ptr": "*bf16", "n_splits": "i32"},
         dict(D=128, S_PAD=16))])
    assert ops["LDGSTS.E.BYPASS.128"] >= 16 and not [op for op in ops if op.startswith("LDG.E.U16")]
    assert ops["HMMA.16816.F32.BF16"] > 0 and not (ops["LDL"] or ops["STL"]) and usage.endswith("STACK:0")
    for ops, usage in others:  # the pointwise kernels and the merge
        assert ops["LDG.E.128"] > 0 and not (ops["LDL"] or ops["STL"]) and usage.endswith("STACK:0")
