"""Benchmark of the fast decode backend (fastdecode.py: static KV cache, one CUDA graph per step) against
HF `generate`, and a full GRPO step against TRL's GRPOTrainer, on Qwen3-0.6B's architecture with
random bf16 weights on CUDA (no download), or a tiny fp32 Qwen3 on CPU (< 1 minute).

Sections (--sections, all by default; each writes its result to --out as soon as it ends, and a
failing section is recorded and the others still run):
- decode: ms per decode step at each batch size, sampling, EOS off; per-step = (t(N new tokens) -
  t(1 new token)) / (N - 1), fastest of `repeats`, prefill excluded; peak GPU memory. With --baseline
  also the fast backend on its torch kernels (the reference the Triton kernels replace).
- equiv: greedy tokens of fast vs HF at batch 8 with mixed prompt lengths, without EOS and with an
  EOS id that row 0 emits mid-way; fp32 (exact) and, on CUDA, bf16 (kernels may flip near-ties).
- grpo: one step as rporec.stage2 runs it (fp32 master policy, bf16 reference, bf16 autocast):
  rollout, rewards (the reference's greedy summary of every completion, as r_sim/r_comp need, plus
  r_ent; the Rechead and MiniLM scoring are left out), update. s/step, completions/s, peak memory.
  With --baseline also the step without the Triton kernels and the autocast head: decoding on torch
  kernels, the update's output head in fp32 (under "baseline").
- trl: TRL's GRPOTrainer on the same model, prompts, G, prompts/step, completion length, beta,
  top-20% entropy mask and micro-batch, no vLLM, gradient checkpointing off as ours (needs `trl`).

Also `--project RUN`: the wall time of the full paper runs (CDs, Instruments, Games) on the machine that ran RUN,
projected per phase from the cost that RUN measured (its metrics.json "cost", e.g. of tools/gpu_rehearsal.sh).

  python -m tools.bench [--out bench.json] [--model auto|tiny|0.6b] [--sections decode,equiv,grpo,trl]
  python -m tools.bench --project RUN_FOLDER
  python -m tools.bench --help  (every flag, with its default on this machine)
"""
import copy
import dataclasses
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch
import transformers

import grpo
import rewards
from plumbing import decode, files, toy
from plumbing import flags as flags_lib  # `flags` is the parsed config below
from plumbing.cost import peak_gib, reset_peak, sync
from plumbing.flags import SEED, OneOf, Own, Range, Text, setting
from plumbing.processes import DEVICE, DTYPE
from speed import fastdecode

SECTIONS = ("decode", "equiv", "grpo", "trl")


@dataclass
class BenchConfig:
    out: str = setting("bench.json", Text())  # results JSON, rewritten atomically after every section
    model: str = setting("auto", OneOf("auto", "tiny", "0.6b"))  # "0.6b" (Qwen3-0.6B config) | "tiny" |
    # "auto" = 0.6b on CUDA, tiny on CPU
    sections: str = setting(",".join(SECTIONS), Own("a comma-separated subset of SECTIONS"))  # the parts to
    # run, in order, comma-separated: decode,equiv,grpo,trl
    batches: tuple[int, ...] = setting((1, 64, 128), Own("batch sizes >= 1"))  # decode batch sizes to time,
    # comma-separated
    kernels: str = setting("auto", OneOf(*fastdecode.KERNELS))  # the fast backend's decode kernels
    # (DecodeConfig.kernels) in decode, equiv and grpo
    baseline: bool = setting(False)  # decode and grpo also as before the Triton kernels (torch kernels, fp32
    # output head)
    hf_repeats: int = setting(0, Range(0))  # timing runs per decode point for HF generate; 0 = repeats
    prompt_len: int = setting(256, Range(1))  # prompt tokens per row (no padding) for the timing runs
    new_tokens: int = setting(128, Range(2))  # decode steps per timing run
    equiv_batch: int = setting(8, Range(1))  # rows in the greedy agreement check (mixed prompt lengths)
    equiv_tokens: int = setting(64, Range(2))  # greedy tokens compared per row
    grpo_prompts: int = setting(8, Range(1))  # GRPO step: prompts per rollout batch
    grpo_group: int = setting(8, Range(2))  # GRPO step: completions per prompt (G)
    grpo_new_tokens: int = setting(512, Range(1))  # GRPO step: completion length (EOS off, so every row runs
    # to it)
    summary_new_tokens: int = setting(128, Range(1))  # GRPO step: greedy summary length
    # (rewards.summary_max_new_tokens)
    repeats: int = setting(3, Range(1))  # timing runs per decode point; the fastest counts (shared machines
    # are noisy)
    seed: int = setting(0, SEED)  # weights, prompts and sampling
    project: str = setting("", Own("a run folder holding metrics.json"))  # a run folder: print the paper runs
    # projected from its metrics.json "cost", then exit


@dataclass
class Flags:
    bench: BenchConfig = field(default_factory=BenchConfig)  # flags.parse_flags reads sections; bench has one


# CPU sizes, so the whole run takes < 1 minute on 2 cores
CPU_SCALE = dict(prompt_len=32, new_tokens=24, equiv_tokens=32, grpo_new_tokens=32,
                 summary_new_tokens=16)
GPU = DEVICE.type == "cuda"  # DEVICE and DTYPE (the bench model's weights; the GRPO policy is fp32): plumbing.processes
QWEN3_06B = {k: v for k, v in toy.STANDINS["Qwen3-0.6B"].items() if k != "text_vocab"}  # its config.json
# CPU stand-in with the same structure. Its larger init keeps greedy output varied (at 0.02 a tiny random
# model repeats one token), so that the equivalence check means something.
TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
            max_position_embeddings=4096, initializer_range=0.1)


def build_model(name, seed):
    """Random-weight Qwen3 in DTYPE on DEVICE."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**(QWEN3_06B if name == "0.6b" else TINY))
    with DEVICE:
        model = transformers.Qwen3ForCausalLM(config)
    return model.to(DTYPE).eval()


def prompts(batch, length, vocab, pads=(), seed=0):
    """Random prompt ids (batch, length) from 1..vocab-1; row i left-padded with pads[i] pad tokens (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n] = 0
        mask[row, :n] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def run(model, ids, mask, backend, new_tokens, stats=False, greedy=False, eos_ids=(), base=decode.DecodeConfig()):
    cfg = dataclasses.replace(base, max_new_tokens=new_tokens, backend=backend, greedy=greedy)
    return decode.generate(model, ids, mask, cfg, eos_ids=list(eos_ids), pad_id=0, stats=stats,
                           generator=torch.Generator(ids.device).manual_seed(0))


# ----------------------------------------------------------------------------- decode speed and equivalence
def decode_ms_per_step(model, ids, mask, backend, bc, base=decode.DecodeConfig(), repeats=None):
    """(ms per decode step, peak GiB) for one backend at one batch size, the other settings from base. Ours
    runs as in GRPO rollouts (sampling, logp/entropy recorded), HF as plain sampling `generate`."""
    stats = backend == "fast"
    run(model, ids, mask, backend, 8, stats, base=base)  # warm-up: allocations, cuBLAS, graph capture, Triton JIT
    reset_peak()
    times = {1: float("inf"), bc.new_tokens: float("inf")}
    for _ in range(repeats or bc.repeats):
        for n in times:
            sync()
            start = time.perf_counter()
            out = run(model, ids, mask, backend, n, stats, base=base)
            sync()
            times[n] = min(times[n], time.perf_counter() - start)
            if out.tokens.shape[1] != n:
                raise RuntimeError(f"{backend} produced {out.tokens.shape[1]} tokens, expected {n}")
    per_step = 1e3 * (times[bc.new_tokens] - times[1]) / (bc.new_tokens - 1)
    return (per_step if per_step > 0 else None), peak_gib()  # None: noise beat the signal, never a negative time


def decode_speed(model, bc):
    rows = []
    for batch in bc.batches:
        ids, mask = prompts(batch, bc.prompt_len, model.config.vocab_size, seed=bc.seed)
        row = {"batch": batch}
        for name, kernels in (("fast", bc.kernels), ("base", "torch"))[:1 + bc.baseline]:
            ms, mem = decode_ms_per_step(model, ids, mask, "fast", bc, decode.DecodeConfig(kernels=kernels))
            fastdecode.clear_fast_cache(model)  # so the next peak does not include this KV cache
            row.update({f"{name}_ms_per_step": ms, f"{name}_peak_gib": mem})
        hf, hf_mem = decode_ms_per_step(model, ids, mask, "hf", bc, repeats=bc.hf_repeats)
        ours = row["fast_ms_per_step"]
        rows.append({**row, "hf_ms_per_step": hf, "speedup": hf / ours if ours and hf else None, "hf_peak_gib": hf_mem})
    return rows


def agreement(a, b):
    """Rows where two greedy Rollouts hold the same completion (tokens up to and including EOS)."""
    T = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(x):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]))  # (B, T)

    ta = pad(a.tokens * a.mask)
    tb = pad(b.tokens * b.mask)
    ma = pad(a.mask.long())
    mb = pad(b.mask.long())
    prefix = ((ta == tb) & (ma == mb)).long().cumprod(1).sum(1)  # (B,) agreed prefix length
    return {"rows_identical": int((prefix == T).sum()), "rows": len(prefix),
            "mean_common_prefix": float(prefix.float().mean()), "hf_lengths": a.mask.sum(1).tolist()}


def mid_batch_eos(tokens):
    """A token that some row first emits in the second half of a no-EOS greedy run and some other row
    never emits: as EOS, it ends that row mid-way while others run on."""
    n = tokens.shape[1]
    for pos in range(n // 2, n - 1):
        for row in range(tokens.shape[0]):
            tok = int(tokens[row, pos])
            if tok not in tokens[row, :pos] and not (tokens == tok).any(1).all():
                return tok
    raise RuntimeError("no token qualifies as a mid-batch EOS; change --seed")


def greedy_equivalence(model, bc):
    pads = [(row * bc.prompt_len) // (2 * bc.equiv_batch) for row in range(bc.equiv_batch)]
    ids, mask = prompts(bc.equiv_batch, bc.prompt_len, model.config.vocab_size, pads, bc.seed + 1)
    result = {}
    for dtype in ([torch.float32, torch.bfloat16] if GPU else [torch.float32]):
        m = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)
        hf = run(m, ids, mask, "hf", bc.equiv_tokens, greedy=True)
        eos = mid_batch_eos(hf.tokens)
        for name, eos_ids in (("no_eos", []), ("eos_mid_batch", [eos])):
            a = run(m, ids, mask, "hf", bc.equiv_tokens, greedy=True, eos_ids=eos_ids) if eos_ids else hf
            b = run(m, ids, mask, "fast", bc.equiv_tokens, greedy=True, eos_ids=eos_ids,
                    base=decode.DecodeConfig(kernels=bc.kernels))
            result[f"{str(dtype)[6:]}_{name}"] = {**agreement(a, b), "eos_ids": eos_ids}
        fastdecode.clear_fast_cache(m)
        del m
    return {**result, "tokens_per_row": bc.equiv_tokens, "kernels": bc.kernels}


# ----------------------------------------------------------------------------- GRPO step: ours and TRL's
def left_align(tokens, mask):
    """Right-padded completions (B, T) as left-padded prompts: each row rolled right by its padding."""
    n = mask.sum(1).tolist()
    T = tokens.shape[1]
    return (torch.stack([r.roll(T - k) for r, k in zip(tokens, n)]),
            torch.stack([r.roll(T - k) for r, k in zip(mask.long(), n)]))


def grpo_step(model, bc):
    out = grpo_step_with(model, bc, bc.kernels, head_fp32=False)
    return {**out, "baseline": grpo_step_with(model, bc, "torch", head_fp32=True)} if bc.baseline else out


def grpo_step_with(model, bc, kernels, head_fp32):
    G = bc.grpo_group
    N = bc.grpo_prompts
    ref = model  # frozen, in DTYPE: pi_ref for the KL and the summarizer, as in rporec.stage2
    policy = copy.deepcopy(model).float()  # fp32 master weights; the fast backend decodes them in bf16 on CUDA
    cfg = grpo.GRPOConfig(group_size=G, prompts_per_step=N, max_new_tokens=bc.grpo_new_tokens, head_fp32=head_fp32)
    roll = decode.DecodeConfig(max_new_tokens=bc.grpo_new_tokens, backend="fast", kernels=kernels)
    summ = decode.DecodeConfig(max_new_tokens=bc.summary_new_tokens, backend="fast", greedy=True, kernels=kernels)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    ids, mask = prompts(N, bc.prompt_len, model.config.vocab_size, seed=bc.seed + 2)
    for _ in ("warm-up", "timed"):  # the warm-up allocates, captures graphs and builds AdamW state
        sync()
        reset_peak()
        t0 = time.perf_counter()
        ro = grpo.rollout(policy.eval(), ids, mask, G, roll, [], 0)
        sync()
        t1 = time.perf_counter()
        decode.generate(ref, *left_align(ro.tokens, ro.mask), summ, [], 0)
        reward = rewards.entropy_rewards(ro.entropy.float().cpu(), ro.mask.cpu(), rewards.RewardConfig.rho)  # (N*G,)
        sync()
        t2 = time.perf_counter()
        batch = grpo.make_batch(ids, mask, ro, grpo.group_advantages(reward, G), G)
        grpo.update(policy.train(), ref, opt, batch, cfg, torch.bfloat16 if GPU else None)
        sync()
        t3 = time.perf_counter()
    fastdecode.clear_fast_cache(policy)
    fastdecode.clear_fast_cache(ref)
    return {"rollout_s": t1 - t0, "rewards_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0,
            "completions_per_s": N * G / (t3 - t0), "peak_gib": peak_gib(), "completions": N * G,
            "completion_tokens": bc.grpo_new_tokens, "kernels": kernels, "head_fp32": head_fp32}


def trl_step(model, bc):
    try:
        import datasets
        import trl
    except ImportError as e:  # name what is missing: datasets alone can fail for want of pandas
        return {"skipped": f"trl or datasets does not import ({e}); optional: pip install trl datasets"}
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    G = bc.grpo_group
    N = bc.grpo_prompts
    V = model.config.vocab_size
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "w5 w17 ..." -> [5, 17, ...]: our prompts exactly
    # random weights almost never emit w0, so as EOS it leaves every completion at full length
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="w0", eos_token="w0")
    ids, _ = prompts(N, bc.prompt_len, V, seed=bc.seed + 2)
    texts = [" ".join(f"w{i}" for i in row) for row in ids.tolist()]

    class Clock(TrainerCallback):  # step end times and the second step's peak memory
        ends = []
        peak = None

        def on_step_end(self, args, state, control, **kw):
            sync()
            Clock.ends.append(time.perf_counter())
            Clock.peak = peak_gib()
            reset_peak()

    model.to("cpu")  # TRL loads its own policy and reference; the bench copy would only inflate its peak
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        args = trl.GRPOConfig(
            output_dir=tmp, num_generations=G, per_device_train_batch_size=G, gradient_accumulation_steps=N,
            max_completion_length=bc.grpo_new_tokens, beta=1e-3, top_entropy_quantile=0.2, use_vllm=False,
            learning_rate=1e-6, bf16=GPU, use_cpu=not GPU, gradient_checkpointing=False, max_steps=2,
            logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=bc.seed)
        trainer = trl.GRPOTrainer(model=tmp, reward_funcs=length_reward, args=args,
                                  train_dataset=datasets.Dataset.from_dict({"prompt": texts * 2}),
                                  processing_class=tok, callbacks=[Clock()])
        sync()
        reset_peak()
        trainer.train()
        del trainer
    model.to(DEVICE)
    step = Clock.ends[1] - Clock.ends[0]  # the second step: the first one warms up
    return {"trl": trl.__version__, "step_s": step, "completions_per_s": N * G / step, "peak_gib": Clock.peak,
            "generation_batch": args.generation_batch_size, "micro_batch": G, "gradient_checkpointing": False}


def length_reward(completions, **kwargs):
    """A stand-in reward for TRL: the completion's length (its value does not change the step's cost)."""
    return [float(len(c)) for c in completions]


# ----------------------------------------------------------------------------- projection of the paper runs
PAPER_SAMPLES = {"cds": 13435, "instruments": 34373, "games": 63502}  # paper Table 3 (SPEC section 1)


@dataclass
class PaperRun:
    """The paper's run (SPEC section 5, rporec.py's defaults), what a projection scales the measured rates to."""
    tokens: int = 768  # reasoning and rollout length cap; a projection assumes every completion reaches it
    group_size: int = 4  # G; the measured GRPO step must have the paper's G, prompts per step and length
    prompts_per_step: int = 8  # GRPO prompts per step
    epochs: int = 1  # Stage II epochs over train, run to the end (no early stop)
    eval_every: int = 50  # Stage II evaluation period, step 0 and the last step included
    eval_samples: int = 512  # valid subset per Stage II evaluation
    save_every: int = 50  # Stage II checkpoint period, the last step included
    rechead_epochs: int = 20  # Rechead epochs before early stopping (the MovieLens runs stopped at 11-13)
    train_end: float = 0.8  # the 8:1:1 split (data.DataConfig)
    valid_end: float = 0.9


GENERATION = ("reasoning", "stage2_eval", "final_eval")  # the phases that generate CoTs


def project(cost, n_samples, run=PaperRun()):
    """Projected seconds per phase of a full paper run on n_samples samples, from a run's measured cost
    (cost_summary). Generation scales by tokens per sample; the GRPO step and checkpoint take their
    measured mean (the measured run must use the paper's G, prompts per step and length); evaluations the
    measured seconds per generated sample. Raises ValueError naming a phase the run did not measure."""
    def per(phase, unit):
        c = cost.get(phase, {})
        if not c.get(unit):
            raise ValueError(f"the run measured no {unit} in phase {phase!r}; project from a run of both stages "
                             "with a backbone (tools/gpu_rehearsal.sh)")
        return c["s"] / c[unit]

    def per_sample(phase):  # seconds per sample at run.tokens per completion
        return per(phase, "samples") * run.tokens / (cost[phase]["tokens"] / cost[phase]["samples"])

    train = int(run.train_end * n_samples)
    held_out = n_samples - train  # valid and test, regenerated by the best backbone at the end
    steps = math.ceil(train * run.epochs / run.prompts_per_step)
    evals = 1 + steps // run.eval_every + (steps % run.eval_every > 0)
    saves = steps // run.save_every + (steps % run.save_every > 0)
    # CoTs that came from a reasoning cache were not generated, so not timed: a phase that generated nothing
    # takes the rate of one that did (every generation samples the same way, at the same lengths)
    timed = {p: per_sample(p) for p in GENERATION if cost.get(p, {}).get("samples")}
    if not timed:
        raise ValueError("the run generated no CoT (all came from the reasoning cache); project from a run with a "
                         "fresh --data.data_dir (tools/gpu_rehearsal.sh deletes the cache first)")
    gen, stage2_eval, final = (timed.get(p, next(iter(timed.values()))) for p in GENERATION)
    out = {"stage1_reasoning": n_samples * gen,
           "rechead": train * run.rechead_epochs * per("rechead_epoch", "samples"),
           "grpo_steps": steps * per("grpo_step", "count"),
           "stage2_evals": evals * run.eval_samples * stage2_eval,
           "checkpoints": saves * per("checkpoint", "count"),
           "final_eval": held_out * final}
    out["total"] = sum(out.values())
    return {"samples": n_samples, "steps": steps, "evals": evals, "seconds": out}


def paper_step(run=PaperRun()):
    """The paper run's GRPO step settings, by their GRPOConfig names."""
    return {"group_size": run.group_size, "prompts_per_step": run.prompts_per_step, "max_new_tokens": run.tokens}


def step_mismatch(run_cfg, run=PaperRun()):
    """The GRPO settings of a run's config.json that differ from the paper run's ({field: value}): its measured
    step time then does not transfer."""
    g = run_cfg.get("grpo", {})
    return {k: g.get(k) for k, v in paper_step(run).items() if g.get(k) != v}


def projection_table(cost, run=PaperRun()):
    """The markdown table of project() for the paper's three datasets, in hours."""
    rows = {name: project(cost, n, run) for name, n in PAPER_SAMPLES.items()}
    phases = list(next(iter(rows.values()))["seconds"])
    lines = ["| hours | " + " | ".join(f"{k} ({r['samples']:,} samples, {r['steps']:,} steps, {r['evals']} evals)"
                                      for k, r in rows.items()) + " |", "|---" * (len(rows) + 1) + "|"]
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(f"{r['seconds'][phase] / 3600:.2f}" for r in rows.values()) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def gib(x):
    return "n/a" if x is None else f"{x:.2f}"


def report(res):
    env = res["env"]
    bc = res["bench"]
    print(f"\n{env['device']} | torch {env['torch']} | transformers {env['transformers']} | {env['model']}")
    if isinstance(res.get("decode"), list):
        print(f"decode: prompt {bc['prompt_len']} tokens, {bc['new_tokens']} new, EOS off; fast = sampling + "
              f"logp/entropy on {res.get('kernels')} kernels, base = fast on torch kernels, hf = plain sampling "
              "generate; peaks include the weights")
        names = ["fast", "base", "hf"] if bc["baseline"] else ["fast", "hf"]
        print("| batch | " + " | ".join(f"{n} ms/step" for n in names) + " | speedup | "
              + " | ".join(f"{n} peak GiB" for n in names) + " |")
        print("|---:" * (2 * len(names) + 2) + "|")
        for r in res["decode"]:
            ms = [f"{r[f'{n}_ms_per_step']:.2f}" if r[f"{n}_ms_per_step"] else "too noisy" for n in names]
            speedup = f"{r['speedup']:.1f}x" if r["speedup"] else "n/a"
            peaks = [gib(r[f"{n}_peak_gib"]) for n in names]
            print(f"| {r['batch']} | {' | '.join(ms)} | {speedup} | {' | '.join(peaks)} |")
    for k, v in res.get("equiv", {}).items():
        if isinstance(v, dict) and "rows" in v:
            print(f"greedy {k}: {v['rows_identical']}/{v['rows']} rows identical over {res['equiv']['tokens_per_row']} "
                  f"tokens (mean common prefix {v['mean_common_prefix']:.1f}, hf lengths {v['hf_lengths']})")
    grpo_runs = {"grpo": res.get("grpo"), "grpo baseline": (res.get("grpo") or {}).get("baseline"),
                 "trl": res.get("trl")}
    for name, r in grpo_runs.items():
        if isinstance(r, dict) and "step_s" in r:
            parts = (f" = rollout {r['rollout_s']:.2f} + rewards {r['rewards_s']:.2f} + update {r['update_s']:.2f} "
                     f"({r['kernels']} kernels, head_fp32 {r['head_fp32']})" if name != "trl" else f" ({r['trl']})")
            print(f"GRPO step, {name}: {r['step_s']:.2f} s{parts}, {r['completions_per_s']:.1f} completions/s, "
                  f"peak {gib(r['peak_gib'])} GiB")
    for name in bc["sections"].split(","):
        if isinstance(res.get(name), dict) and ({"error", "skipped"} & set(res[name])):
            print(f"{name}: {res[name].get('error') or res[name].get('skipped')}")


def main(bc):
    if bc.project:
        path = os.path.join(bc.project, "metrics.json")
        cost = files.load_json(path, "rerun the run").get("cost")
        if not cost:
            raise SystemExit(f"error: {path} holds no \"cost\"; pass the folder of a finished rporec.py run")
        cfg_path = os.path.join(bc.project, "config.json")
        off = step_mismatch(files.load_json(cfg_path, "rerun the run")) if os.path.exists(cfg_path) else {}
        if off:
            print(f"warning: {bc.project} ran its GRPO steps with {off}, not the paper's {paper_step()}: its "
                  "grpo_steps row does not transfer to the paper run")
        try:
            print(projection_table(cost))
        except ValueError as e:
            raise SystemExit(f"error: {bc.project}: {e}") from None
        return {}
    name = bc.model if bc.model != "auto" else "0.6b" if GPU else "tiny"
    model = build_model(name, bc.seed)
    try:
        triton = fastdecode.use_triton(model, decode.DecodeConfig(kernels=bc.kernels), DEVICE)
    except ValueError as e:
        raise SystemExit(f"error: --kernels {bc.kernels}: {e}") from None
    res = {"env": {"device": torch.cuda.get_device_name(DEVICE) if GPU else platform.processor() or "cpu",
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "model": f"Qwen3 {name} config, random {str(DTYPE)[6:]} weights"}, "bench": asdict(bc),
           "kernels": "triton" if triton else "torch"}
    work = {"decode": decode_speed, "equiv": greedy_equivalence, "grpo": grpo_step, "trl": trl_step}
    for section in bc.sections.split(","):  # grpo leaves the bench model as it was: it trains a copy
        print(f"--- {section}", flush=True)
        try:
            res[section] = work[section](model, bc)
        except Exception as e:  # keep the other sections' results; the traceback says what broke
            traceback.print_exc()
            res[section] = {"error": f"{type(e).__name__}: {e}"}
            fastdecode.clear_fast_cache()
            model.to(DEVICE)
        files.save_json(bc.out, res)
    report(res)
    return res


def parse_config(argv):
    """BenchConfig from flags as rporec's (--sections decode,equiv --model 0.6b --out PATH; --prompt-len
    works as --prompt_len). On CPU, the sizes no flag sets shrink to CPU_SCALE."""
    flags = Flags(BenchConfig(**({} if GPU else CPU_SCALE)))
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\nFlags (defaults on this machine; lists are comma-separated):")
        print(flags_lib.help_text(flags, bare="bench"))
        raise SystemExit(0)
    for before, arg in zip(argv, argv[1:]):
        if not before.startswith("--") and not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; lists are comma-separated: --sections decode,equiv")
    flags_lib.apply(flags, flags_lib.parse_flags(flags, argv, bare="bench"))
    bc = flags.bench
    if errors := flags_lib.range_errors(flags, bare="bench"):
        raise SystemExit(f"error: {errors[0]}")
    unknown = [name for name in bc.sections.split(",") if name not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: unknown --sections {unknown}; choose from {','.join(SECTIONS)}")
    if min(bc.batches) < 1:
        raise SystemExit(f"error: --batches {bc.batches} must be batch sizes >= 1")
    if bc.project and not os.path.isfile(os.path.join(bc.project, "metrics.json")):
        raise SystemExit(f"error: --project {bc.project} must be a run folder holding metrics.json; pass the --out "
                         "of a finished rporec.py run")
    return bc


if __name__ == "__main__":
    result = main(parse_config(sys.argv[1:]))
    raise SystemExit(1 if any("error" in v for v in result.values() if isinstance(v, dict)) else 0)
