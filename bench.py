"""Decode benchmark for issue #6: decode.py's fast backend (static KV cache, one CUDA graph per step)
against HF `generate`, on Qwen3-0.6B's architecture with random bf16 weights (no download) on CUDA,
or a tiny fp32 Qwen3 on CPU (< 1 minute). Measures decode ms/step at several batch sizes (EOS
disabled, per-step time = (t(N new tokens) - t(1 new token)) / (N - 1), fastest of 3, prefill excluded),
greedy-token agreement at batch 8 with mixed prompt lengths, and peak GPU memory.

  python bench.py [--out bench.json] [--batches 1 64 128] [--prompt-len 256] [--new-tokens 128]
"""
import argparse
import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

import decode


@dataclass
class BenchConfig:
    out: str = "bench.json"  # results JSON, written atomically
    batches: list = field(default_factory=lambda: [1, 64, 128])  # decode batch sizes to time
    prompt_len: int = 256  # prompt tokens per row (no padding) for the timing runs
    new_tokens: int = 128  # decode steps per timing run
    equiv_batch: int = 8  # rows in the greedy agreement check (mixed prompt lengths)
    equiv_tokens: int = 64  # greedy tokens compared per row
    grpo_prompts: int = 8  # GRPO step: prompts per rollout batch
    grpo_group: int = 8  # GRPO step: completions per prompt (G)
    grpo_new_tokens: int = 512  # GRPO step: completion length (EOS off, so every row runs to it)
    repeats: int = 3  # timing runs per point; the fastest counts (shared machines are noisy)
    seed: int = 0  # weights, prompts and sampling


# CPU sizes, so the whole run takes < 1 minute on 2 cores
CPU_SCALE = dict(prompt_len=32, new_tokens=24, equiv_tokens=32, grpo_prompts=2, grpo_new_tokens=16)


GPU = torch.cuda.is_available()  # the 0.6B model in bf16 on the GPU, else the tiny one in fp32 on CPU
DEVICE = torch.device("cuda" if GPU else "cpu")
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960)  # Qwen3-0.6B config.json
TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
            max_position_embeddings=4096)  # CPU stand-in with the same structure


def build_model(device, dtype, seed):
    """Random-weight Qwen3: the 0.6B config on CUDA, the tiny one on CPU."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**(QWEN3_06B if device.type != "cpu" else TINY))
    with device:
        model = transformers.Qwen3ForCausalLM(config)
    return model.to(dtype).eval()


def sync(device):
    if device.type != "cpu":
        torch.cuda.synchronize(device)


def prompts(batch, length, vocab, device, pads=(), seed=0):
    """Random prompt ids (batch, length); row i left-padded with pads[i] pad tokens (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids.to(device), mask.to(device)


def run(model, ids, mask, backend, new_tokens, stats, greedy=False):
    cfg = decode.DecodeConfig(max_new_tokens=new_tokens, backend=backend, greedy=greedy)
    return decode.generate(model, ids, mask, cfg, eos_ids=[], pad_id=0, stats=stats,
                           generator=torch.Generator(ids.device).manual_seed(0))


def decode_ms_per_step(model, ids, mask, backend, bc, device):
    """Per-step decode time (prefill excluded) and peak memory for one backend at one batch size.
    Ours runs as in GRPO rollouts (sampling, stats=True); HF as plain sampling `generate`."""
    stats = backend == "fast"
    run(model, ids, mask, backend, 8, stats)  # warm-up: allocations, cuBLAS, graph capture
    if device.type != "cpu":
        torch.cuda.reset_peak_memory_stats(device)
    times = {1: float("inf"), bc.new_tokens: float("inf")}
    for _ in range(bc.repeats):
        for n in times:
            sync(device)
            start = time.perf_counter()
            out = run(model, ids, mask, backend, n, stats)
            sync(device)
            times[n] = min(times[n], time.perf_counter() - start)
            if out.tokens.shape[1] != n:
                raise RuntimeError(f"{backend} produced {out.tokens.shape[1]} tokens, expected {n}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type != "cpu" else None
    return 1e3 * (times[bc.new_tokens] - times[1]) / (bc.new_tokens - 1), peak


def greedy_agreement(model, bc, device):
    """Greedy tokens of fast vs HF at batch 8 with mixed prompt lengths: identical rows and mean
    common prefix. fp32 on CPU should be identical; bf16 kernels may flip near-tied argmaxes."""
    pads = [(row * bc.prompt_len) // (2 * bc.equiv_batch) for row in range(bc.equiv_batch)]
    ids, mask = prompts(bc.equiv_batch, bc.prompt_len, model.config.vocab_size, device, pads, bc.seed + 1)
    hf = run(model, ids, mask, "hf", bc.equiv_tokens, False, greedy=True).tokens
    fast = run(model, ids, mask, "fast", bc.equiv_tokens, False, greedy=True).tokens
    same = (hf == fast).long().cumprod(1).sum(1)  # (B,) agreed prefix length
    return {"rows_identical": int((same == bc.equiv_tokens).sum()), "rows": bc.equiv_batch,
            "mean_common_prefix": float(same.float().mean()), "tokens_per_row": bc.equiv_tokens}


def grpo_step_timing(model, bc, device):
    """Seconds for one GRPO step through grpo.py: rollout (fast backend, stats) and update
    (policy + reference forward/backward, AdamW). The reward is rewards.entropy_reward, a real
    term of eq. 7 that needs no tokenizer; its cost is negligible next to the two timed parts."""
    here = Path(__file__).resolve().parent
    if not all((here / f).exists() for f in ("grpo.py", "rewards.py")):
        return "skipped: grpo.py / rewards.py not present"
    import grpo
    import rewards
    if not all(hasattr(grpo, f) for f in ("rollout", "update", "make_batch", "group_advantages")):
        return "skipped: grpo.py does not expose rollout/update/make_batch/group_advantages"
    G, ref = bc.grpo_group, copy.deepcopy(model)
    cfg = grpo.GRPOConfig(group_size=G, prompts_per_step=bc.grpo_prompts, max_new_tokens=bc.grpo_new_tokens)
    dcfg = decode.DecodeConfig(max_new_tokens=bc.grpo_new_tokens, backend="fast")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    ids, mask = prompts(bc.grpo_prompts, bc.prompt_len, model.config.vocab_size, device, seed=bc.seed + 2)
    times = {}
    for _ in ("warm-up", "timed"):  # the warm-up run allocates, captures graphs, builds AdamW state
        sync(device)
        if device.type != "cpu":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        ro = grpo.rollout(model, ids, mask, G, dcfg, [], 0)
        sync(device)
        mid = time.perf_counter()
        ent, done = ro.entropy.float().cpu(), ro.mask.cpu()
        reward = torch.tensor([rewards.entropy_reward(e[m]) for e, m in zip(ent, done)])  # (N*G,)
        batch = grpo.make_batch(ids, mask, ro, grpo.group_advantages(reward, G), G)
        grpo.update(model, ref, optimizer, batch, cfg)
        sync(device)
        times = {"rollout_s": mid - start, "update_s": time.perf_counter() - mid,
                 "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type != "cpu" else None}
    del ref, optimizer
    decode.clear_fast_cache(model)
    return {**times, "sequences": bc.grpo_prompts * G, "completion_tokens": bc.grpo_new_tokens}


def write_json(path, obj):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main(bc):
    device, dtype = DEVICE, torch.bfloat16 if GPU else torch.float32
    model = build_model(device, dtype, bc.seed)
    env = {"device": torch.cuda.get_device_name(device) if GPU else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
           "model": "Qwen3-0.6B config, random weights" if GPU else "tiny Qwen3, random weights"}
    rows = []
    for batch in bc.batches:
        ids, mask = prompts(batch, bc.prompt_len, model.config.vocab_size, device, seed=bc.seed)
        ours, ours_mem = decode_ms_per_step(model, ids, mask, "fast", bc, device)
        decode.clear_fast_cache(model)  # so HF's peak does not include our KV cache
        hf, hf_mem = decode_ms_per_step(model, ids, mask, "hf", bc, device)
        rows.append({"batch": batch, "fast_ms_per_step": ours, "hf_ms_per_step": hf, "speedup": hf / ours,
                     "fast_peak_gib": ours_mem, "hf_peak_gib": hf_mem})
    agree = greedy_agreement(model, bc, device)
    decode.clear_fast_cache(model)
    try:
        import trl
        trl_note = f"trl {trl.__version__}: its non-vLLM GRPO generation is model.generate, i.e. the hf column"
    except ImportError:
        trl_note = "skipped: trl not installed"
    grpo_step = grpo_step_timing(model, bc, device)  # last: its optimizer step changes the weights
    result = {"env": env, "bench": asdict(bc), "decode": rows, "greedy_agreement": agree,
              "grpo_step": grpo_step, "trl": trl_note}
    gib = lambda x: "n/a" if x is None else f"{x:.2f}"
    print(f"{env['device']} | torch {env['torch']} | transformers {env['transformers']} | {env['model']}, {dtype}")
    print(f"prompt {bc.prompt_len} tokens, {bc.new_tokens} new, EOS off; fast = sampling + logp/entropy, "
          "hf = plain sampling generate\n")
    print("| batch | fast ms/step | hf ms/step | speedup | fast peak GiB | hf peak GiB |")  # peaks include weights
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['fast_ms_per_step']:.2f} | {r['hf_ms_per_step']:.2f} | {r['speedup']:.1f}x "
              f"| {gib(r['fast_peak_gib'])} | {gib(r['hf_peak_gib'])} |")
    print(f"\ngreedy agreement (batch {agree['rows']}, mixed prompt lengths): {agree['rows_identical']}/"
          f"{agree['rows']} rows identical over {agree['tokens_per_row']} tokens, mean common prefix "
          f"{agree['mean_common_prefix']:.1f}")
    if isinstance(grpo_step, dict):
        grpo_step = (f"rollout {grpo_step['rollout_s']:.2f} s + update {grpo_step['update_s']:.2f} s "
                     f"({grpo_step['sequences']} sequences x {grpo_step['completion_tokens']} tokens)")
    print(f"GRPO step: {grpo_step}\nTRL: {trl_note}")
    write_json(bc.out, result)


def parse_args():
    """Flags override BenchConfig; on CPU, unset sizes shrink to CPU_SCALE."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=BenchConfig.out)
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--grpo-new-tokens", type=int)
    parser.add_argument("--seed", type=int, default=BenchConfig.seed)
    a = vars(parser.parse_args())
    given = {k: v for k, v in a.items() if v is not None}
    scale = {} if GPU else {k: v for k, v in CPU_SCALE.items() if k not in given}
    bc = BenchConfig(**{**scale, **given})
    if bc.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 to time decode steps, got {bc.new_tokens}")
    return bc


if __name__ == "__main__":
    main(parse_args())
