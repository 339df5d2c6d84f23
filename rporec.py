"""RPORec, the one train script (arXiv 2605.21967, Algorithm 1).

    python rporec.py                                  # toy preset: tiny random models, CPU, offline
    python rporec.py --dataset cds                    # the paper run (Qwen3-0.6B)
    torchrun --nproc_per_node 4 rporec.py --dataset cds
    python rporec.py --help                           # every flag, its default and what it means

Top to bottom: config, data and backbone, sampled reasoning (Alg. 1 line 1), Stage I (Rechead,
eq. 1-6, lines 2-12), Stage II (GRPO with Rechead rewards, eq. 7-11, lines 13-21, keeping the best
valid step), evaluation and main. Flag parsing and checks live in config.py; processes, files and seeded
choices in common.py; caches and checkpoints in checkpoint.py. Each run folder holds config.json, log.jsonl,
rechead.pt, ckpt/, best/, metrics.json, stage2.png and run.lock (one run per folder).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import common
import config
import data
import decode
import evaluate
import grpo
import rechead
import rewards
import toy
from common import DEVICE, DISTRIBUTED, DTYPE, MAIN, RANK, WORLD, fail, shard


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    dataset: str = "toy"      # preset and data source (PRESETS, data.py)
    model: str = "toy"        # backbone: hub id, local folder, "toy" (tiny random), "none" (no LLM) or
                              # "random:Qwen3-0.6B" (real size, random weights: times a run, learns nothing)
    stage: str = "both"       # 1 | 2 | both (Algorithm 1)
    out: str = ""             # run folder; default runs/<dataset>-<time>
    init: str = ""            # --stage 2: the Stage I run folder holding rechead.pt (required)
    resume: bool = False      # continue Stage II from <out>/ckpt
    ablate: str = ""          # "" | cot | I | II (paper Fig. 2); reward terms: --rewards.drop
    thinking: bool = True     # Qwen3 chat template thinking mode
    prompt_suffix: str = ""   # appended to the paper's prompt, e.g. a <think>/<answer> format hint for
                              # backbones without a thinking mode (SmolLM2); "" = the paper's prompt
    gen_batch: int = 64       # prompts per generation batch (Stage I reasoning, evaluation); a batch shares a seed
    limit: int = 0            # >0: only the first `limit` samples of each split (quick slices)
    seed: int = 0             # seeds python, numpy, torch and every sampled CoT
    dist_backend: str = "auto"  # torchrun: auto (nccl on GPUs, else gloo) | nccl | gloo
    official_eval: bool = False  # also the official protocol: valid only, 4 sampled CoTs, metrics averaged


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: data.DataConfig = field(default_factory=data.DataConfig)
    rechead: rechead.RecheadConfig = field(default_factory=rechead.RecheadConfig)
    decode: decode.DecodeConfig = field(  # Alg. 1 line 1 and evaluation: sampled as the backbone's generation_config
        default_factory=lambda: decode.DecodeConfig(temperature=None, top_p=None, top_k=None))
    grpo: grpo.GRPOConfig = field(default_factory=grpo.GRPOConfig)
    rewards: rewards.RewardConfig = field(default_factory=rewards.RewardConfig)
    eval: evaluate.EvalConfig = field(default_factory=evaluate.EvalConfig)  # cut-offs, chunk, history masking


QWEN = {"run.model": "Qwen/Qwen3-0.6B"}
PRESETS = {
    # tiny random backbone and encoder built in code: every code path in a minute on a CPU. A random
    # model never writes the <think>/<answer> tags, so the toy drops eq. 7's r_fmt gate (the -fmt
    # ablation): the other rewards then vary and GRPO has something to learn from
    "toy": {"rewards.drop": "fmt", "run.model": "toy", "rechead.encoder": "toy", "rechead.layers": 1,
            "rechead.heads": 2, "rechead.batch_size": 64, "rechead.epochs": 40, "rechead.patience": 4,
            "decode.max_new_tokens": 24, "grpo.max_new_tokens": 24, "grpo.steps": 6, "grpo.prompts_per_step": 4,
            "grpo.lr": 1e-4, "grpo.save_every": 3, "grpo.sample_every": 2, "grpo.eval_every": 3,
            "grpo.eval_samples": 64, "rewards.summary_max_new_tokens": 12},
    "cds": QWEN, "instruments": QWEN, "games": QWEN, "ml-100k": QWEN, "ml-1m": QWEN, "custom": QWEN,
}


def parse_config(argv):
    """Defaults < PRESETS[dataset] < flags, then the derived fields and every check (config.resolve)."""
    return config.parse(Config(), PRESETS, argv, __doc__)


# ----------------------------------------------------------------------------- data and backbone
def load_backbone(cfg, ds):
    """(model, tokenizer) from a hub id, a local folder or the toy builder; (None, None) for --model none."""
    name = cfg.run.model
    if name == "toy":  # built once per item table into the data folder; the config keeps saying "toy"
        where = toy.model_dir(cfg.data.data_dir, "backbone", ds.texts[1:])
        name = common.main_first(toy.build_backbone, ds.texts[1:], where)
    if name.startswith("random:"):  # real size, random weights; its tokenizer is cached in the data folder
        return toy.build_standin(name[len("random:"):], DTYPE, DEVICE, cache_dir=cfg.data.data_dir)
    return (None, None) if name == "none" else decode.load_model(name, DTYPE, DEVICE)


# ----------------------------------------------------------------------------- reasoning (Alg. 1, line 1)
def generate_reasoning(cfg, ds, model, tok, split, samples, seed=None, cost=None):
    """Sampled reasoning for every sample of a split, kept in a resumable JSONL cache (checkpoint.cached_map).
    Returns ([(y, z)] in sample order, the parse rate). The dict `cost` gains what this call generated (samples,
    prompt and completion tokens, over all ranks), its wall time, rate and peak memory."""
    if model is None:  # --model none: the history-only Rechead
        return [("", None)] * len(samples), None
    seed = cfg.run.seed if seed is None else seed
    sampling = decode.resolve_sampling(cfg.decode, model)
    made = [0, 0, 0]  # samples, prompt tokens, completion tokens generated by this call on this rank

    def generate(idx):
        with torch.random.fork_rng(devices=[DEVICE] if DEVICE.type == "cuda" else []):
            torch.manual_seed(common.batch_seed(seed, split, idx[0]))  # the rest of the run's RNG stays untouched
            messages = [data.build_messages(ds, samples[i], cfg.data, cfg.run.prompt_suffix) for i in idx]
            texts, out, prompt_tokens = decode.complete(model, tok, messages, sampling, cfg.run.thinking)
        made[:] = made[0] + len(idx), made[1] + prompt_tokens, made[2] + int(out.mask.sum())
        return [{"i": i, "text": t} for i, t in zip(idx, texts)], int(out.mask.sum())

    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["history"]))  # similar lengths share a batch
    with common.measure({} if cost is None else cost) as cost:
        path = checkpoint.reasoning_cache(cfg, model, split, seed)
        done = checkpoint.cached_map(path, order, cfg.run.gen_batch, generate, f"reasoning {split}")
    n, prompt, tokens = (int(v) for v in common.all_sum(*made))
    cost.update(samples=n, prompt_tokens=prompt, tokens=tokens, tok_s=common.rate(tokens, cost["s"]))
    rs = [rewards.split_reasoning(done[i]["text"]) for i in range(len(samples))]
    return rs, sum(z is not None for _, z in rs) / max(len(rs), 1)


# ----------------------------------------------------------------------------- Stage I: Rechead (eq. 1-6)
def rechead_inputs(cfg, ds, samples, reasoning):
    """The Rechead's three texts per sample: history x (the newest --rechead.history_items, all by default),
    CoT y, answer z (None: not parsed)."""
    budget = cfg.rechead.history_chars or cfg.data.max_history_chars  # short encoders keep the newest items
    n = cfg.rechead.history_items
    x = [data.history_text(ds, s["history"][-n:] if n else s["history"], budget) for s in samples]
    return x, [r[0] for r in reasoning], [r[1] for r in reasoning]


def make_head(cfg, ds):
    rc = cfg.rechead
    if rc.encoder == "toy":  # built once per item table into the data folder; the config keeps saying "toy"
        where = toy.model_dir(cfg.data.data_dir, "encoder", ds.texts[1:])
        rc = dataclasses.replace(rc, encoder=common.main_first(toy.build_encoder, ds.texts[1:], where))
    return rechead.Rechead(rc, ds.texts, DEVICE)


def rechead_step(net, head, opt, inputs, targets, idx, neg):
    """Eq. 6 on one global batch idx (B,) with negatives neg (B, k). Each rank takes a strided share;
    its loss is weighted by its share, so DDP's gradient average equals the global batch mean."""
    x, y, z = inputs
    mine, neg = idx[RANK::WORLD], neg[RANK::WORLD]
    h = net([x[i] for i in mine], [y[i] for i in mine], [z[i] for i in mine])  # (b, d)
    loss = head.loss(h, targets[mine].to(DEVICE), neg.to(DEVICE))
    opt.zero_grad(set_to_none=True)
    (loss * len(mine) * WORLD / len(idx)).backward()
    opt.step()
    return loss.item()


def evaluate_split(cfg, head, inputs, samples, ground=False):
    """Full ranking over all items, sharded over ranks and gathered back exactly. ground=True is the -I
    ablation: no Rechead; the answer (else the history) goes to the nearest items by encoder cosine."""
    x, y, z = inputs
    head.eval()

    def scores(chunk):
        idx = [s["i"] for s in chunk]
        if ground:
            return rechead.ground_scores(head.encode_frozen([z[i] or x[i] for i in idx]), head.item_vecs)
        return head.scores(head.user_vecs([x[i] for i in idx], [y[i] for i in idx], [z[i] for i in idx]))

    ranks = evaluate.full_ranking(scores, shard([dict(s, i=i) for i, s in enumerate(samples)]), cfg.eval.chunk,
                                  cfg.eval.mask_history)
    return evaluate.metrics(common.unshard(ranks, len(samples)), cfg.eval.ks)


def train_rechead(cfg, ds, head, inputs, splits, log, out):
    """Algorithm 1 lines 2-12: fresh uniform negatives per batch; keep the best valid NDCG@10."""
    rc = cfg.rechead
    gen = torch.Generator().manual_seed(cfg.run.seed)  # identical on every rank: same batches, same negatives
    opt = rechead.make_optimizer(head, rc.lr)  # Adam; SparseAdam for the row-sparse tables
    net = torch.nn.parallel.DistributedDataParallel(head, broadcast_buffers=False) if DISTRIBUTED else head
    targets = torch.tensor([s["target"] for s in splits["train"]])
    best, best_state, bad = -1.0, None, 0
    for epoch in range(rc.epochs):
        head.train()
        losses, perm = [], torch.randperm(len(targets), generator=gen)
        with common.measure({"phase": "rechead_epoch", "samples": len(targets)}) as cost:  # training and valid
            for b in tqdm(range(0, len(perm), rc.batch_size), desc=f"rechead epoch {epoch}", leave=False,
                          disable=not MAIN):
                idx = perm[b:b + rc.batch_size]
                neg = rechead.sample_negatives(targets[idx], ds.n_items, rc.negatives, gen)  # (B, k)
                losses.append(rechead_step(net, head, opt, inputs["train"], targets, idx, neg))
            m = evaluate_split(cfg, head, inputs["valid"], splits["valid"])
        log({"stage": 1, "epoch": epoch, "loss": float(np.mean(losses)), "valid_hr@10": m["hr@10"],
             "valid_ndcg@10": m["ndcg@10"], **cost, "samples_s": common.rate(len(targets), cost["s"])})
        if not math.isfinite(float(np.mean(losses))):
            fail(f"the Rechead loss is {np.mean(losses)} in epoch {epoch}; lower --rechead.lr. rechead.pt keeps "
                 f"the best epoch so far")
        if m["ndcg@10"] > best:
            best, bad, best_state = m["ndcg@10"], 0, copy.deepcopy(head.state_dict())
            if MAIN:  # not finished until Stage I's metrics are saved (checkpoint.finish_stage1)
                common.save_torch(os.path.join(out, "rechead.pt"), {"state": best_state, "epoch": epoch,
                                                                    "config": dataclasses.asdict(cfg)})
        else:
            bad += 1
            if bad >= rc.patience:
                break
    head.load_state_dict(best_state)
    return head


def stage1(cfg, ds, head, model, tok, splits, log, out):
    """Algorithm 1 lines 1-12: reasoning for every split, then the Rechead; returns its metrics and the
    popularity and transition baselines."""
    log.restart(1)
    reasoning = {}
    for k, v in splits.items():
        cost = {"stage": 1, "phase": "reasoning", "split": k}
        reasoning[k] = generate_reasoning(cfg, ds, model, tok, k, v, cost=cost)
        if model is not None:
            log({**cost, "parse_rate": reasoning[k][1]})
    inputs = {k: rechead_inputs(cfg, ds, splits[k], rs) for k, (rs, _) in reasoning.items()}
    texts = [t or "" for x, y, z in inputs.values() for t in (*x, *y, *z)]
    checkpoint.embed_frozen(head, texts, os.path.join(cfg.data.data_dir, "embeddings"))
    head.tokenise_all(texts)
    if cfg.run.ablate != "I":
        train_rechead(cfg, ds, head, inputs, splits, log, out)
    metrics = {"stage1": {}}
    for k in ("valid", "test"):
        m = evaluate_split(cfg, head, inputs[k], splits[k], cfg.run.ablate == "I")
        metrics["stage1"][k] = m if model is None else {**m, "parse_rate": reasoning[k][1]}
    if cfg.run.official_eval and model is not None:  # the official protocol: valid averaged over 4 sampled CoTs
        runs = [score_split(cfg, ds, head, model, tok, "valid", splits["valid"], cfg.run.seed + 1000 + j)
                for j in range(4)]
        metrics["stage1"]["valid_official"] = evaluate.average_metrics(runs)
    args = (splits["train"], splits["test"], ds.n_items, cfg.eval)
    metrics["popularity"] = {"test": evaluate.popularity_metrics(*args)}
    metrics["transition"] = {"test": evaluate.transition_metrics(*args)}
    return metrics


# ----------------------------------------------------------------------------- Stage II: GRPO (eq. 7-11)
def reward_parts(cfg, ds, head, ref, tok, samples, texts, ro):
    """Section 2.2's rewards for B = N*G completions of N samples (groups contiguous): (r (B,), parts
    {name: (B,)}, CoT token counts (B,), summaries)."""
    rw, B = cfg.rewards, len(texts)
    owner = [samples[b // cfg.grpo.group_size] for b in range(B)]
    x, y, z = rechead_inputs(cfg, ds, owner, [rewards.split_reasoning(t) for t in texts])
    cot = torch.stack([rewards.cot_token_mask(ro.tokens[b], ro.mask[b], tok) for b in range(B)])  # (B, T)
    cand = torch.stack([rewards.candidates(s["i"], s["target"], ds.n_items, rw.negatives, rw.seed)
                        for s in samples]).repeat_interleave(cfg.grpo.group_size, 0)  # (B, k+1), one set per group
    with torch.no_grad():  # the target among k fixed negatives, scored by the frozen Rechead (eq. 5)
        scores = head.candidate_scores(head.user_vecs(x, y, z), cand.to(DEVICE)).cpu()  # (B, k+1)
    fmt = rewards.format_rewards(texts)
    # r_sim, r_comp need a summary: only where the total can be non-zero (eq. 7 multiplies by r_fmt)
    todo = [b for b in range(B) if y[b] and (fmt[b] > 0 or not rw.gate)]
    summaries, cos, lens = summarise(cfg, head, ref, tok, y, todo)
    parts = {"fmt": fmt,
             "clean": rewards.clean_rewards(texts, rw.kappa),
             "ndcg": rewards.ndcg_rewards(scores),
             "sim": rewards.similarity_rewards(cos, rw.delta),
             "comp": rewards.compression_rewards(*lens),
             "ent": rewards.entropy_rewards(ro.entropy.float().cpu(), cot, rw.rho)}
    return rewards.total_rewards(parts, rw.weights(), rw.gate), parts, cot.sum(1).float(), summaries


def summarise(cfg, head, ref, tok, y, todo):
    """The frozen reference model's greedy summaries y_hat of the CoTs y[b], b in todo, in one batched call:
    (summaries [B], cos(e(y), e(y_hat)) (B,) (-inf where none), (|y_hat|, |y|) in tokens, each (B,))."""
    B = len(y)
    summaries, cos, lens = [""] * B, torch.full((B,), -math.inf), torch.zeros(2, B, dtype=torch.long)
    if todo:
        scfg = dataclasses.replace(cfg.decode, greedy=True, max_new_tokens=cfg.rewards.summary_max_new_tokens,
                                   temperature=1.0, top_p=1.0, top_k=0)
        outs, _, _ = decode.complete(ref, tok, [rewards.summary_messages(y[b]) for b in todo], scfg, thinking=False)
        for b, o in zip(todo, outs):
            summaries[b] = o.strip()
        y_hat, cots = [summaries[b] for b in todo], [y[b] for b in todo]
        cos[todo] = torch.cosine_similarity(head.encode_frozen(cots), head.encode_frozen(y_hat), dim=-1).float().cpu()
        lens[:, todo] = torch.tensor([[len(t) for t in tok(texts, add_special_tokens=False).input_ids]
                                      for texts in (y_hat, cots)])  # (2, len(todo))
    return summaries, cos, (lens[0], lens[1])


def stage2(cfg, ds, head, model, tok, splits, log, out, stop):
    """Algorithm 1 lines 13-21: G rollouts per prompt, rewards from the frozen Rechead, GRPO updates, epochs
    over train until the valid curve stops improving. Step 0 (the Stage I backbone) is a candidate. On SIGTERM or
    Ctrl-C (stop: common.Preemption) the step in flight finishes, is checkpointed, and the run exits."""
    g, train = cfg.grpo, splits["train"]
    head.eval().requires_grad_(False)
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref (KL) and the summarizer of r_sim, r_comp
    model.float()  # fp32 master weights: a bf16 weight would round every lr=1e-6 update away; autocast computes in bf16
    if g.grad_checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    torch.manual_seed(cfg.run.seed + 1 + RANK)  # ranks sample different completions
    total = g.epochs * math.ceil(len(train) / g.prompts_per_step)
    total = min(total, g.steps) if g.steps else total
    st = {"step": 0, "best_step": 0, "best": -1.0, "bad": 0, "skips": 0, "stopped": False}
    if cfg.run.resume and checkpoint.recover(out):  # else Stage I just finished: Stage II starts at step 0
        st = {k: v for k, v in checkpoint.load(out, model, opt).items() if k in st}
    log.restart(2, st["step"])
    subset = common.eval_subset(splits["valid"], g.eval_samples, cfg.run.seed)
    roll = dataclasses.replace(cfg.decode, greedy=False, temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                               top_p=1.0, top_k=0)  # pi_old must be the distribution that sampled
    amp = DTYPE if DEVICE.type == "cuda" else None

    def validate(step):  # regenerate the subset's CoTs with the current policy; the frozen Rechead scores them
        model.eval()
        cost = {"phase": "stage2_eval"}
        with common.measure(cost):  # generation, scoring and the save of best/
            rs, parsed = generate_reasoning(cfg, ds, model, tok, f"valid{len(subset)}", subset, cost=cost)
            m = evaluate_split(cfg, head, rechead_inputs(cfg, ds, subset, rs), subset)
            if m["ndcg@10"] > st["best"]:
                st.update(best=m["ndcg@10"], best_step=step, bad=0)
                info = {"step": step, "valid_ndcg@10": m["ndcg@10"]}
                checkpoint.save_pretrained(os.path.join(out, "best"), model, tok, info)
            else:
                st["bad"] += 1
        log({"stage": 2, "step": step, "valid_hr@10": m["hr@10"], "valid_ndcg@10": m["ndcg@10"], "parse_rate": parsed,
             "best_step": st["best_step"], **cost})
        st["stopped"] = st["bad"] >= g.patience

    if st["step"] == 0:
        validate(0)
    for step in tqdm(range(st["step"], total), desc="grpo", initial=st["step"], total=total, disable=not MAIN):
        if st["stopped"]:
            break
        t0, cost = time.time(), {}
        order = common.step_batch(step, len(train), g.prompts_per_step, cfg.run.seed)
        samples = [dict(train[i], i=i) for i in shard(order)]
        messages = [data.build_messages(ds, s, cfg.data, cfg.run.prompt_suffix) for s in samples]
        p_ids, p_mask = decode.encode_prompts(tok, messages, cfg.run.thinking, DEVICE)
        model.eval()
        with common.measure(cost, "rollout_s"):
            ro = grpo.rollout(model, p_ids, p_mask, g.group_size, roll, decode.eos_ids(model, tok), tok.pad_token_id)
        with common.measure(cost, "rewards_s"):
            texts = tok.batch_decode(ro.tokens.masked_fill(~ro.mask, tok.pad_token_id), skip_special_tokens=True)
            r, parts, cot_len, summaries = reward_parts(cfg, ds, head, ref, tok, samples, texts, ro)
            head.forget()  # every step brings new CoTs: keep the frozen-embedding cache bounded
        adv = grpo.group_advantages(r, g.group_size, g.adv_eps)
        model.train()
        with common.measure(cost, "update_s"):
            up = grpo.update(model, ref, opt, grpo.make_batch(p_ids, p_mask, ro, adv.to(DEVICE), g.group_size), g, amp)
        tokens = int(common.all_sum(float(ro.mask.sum()))[0])
        zero, groups = common.all_sum(grpo.zero_spread_groups(r, g.group_size), len(samples))
        passes = {f"{k}_p{j + 1}": p[k] for j, p in enumerate(up["passes"]) for k in ("kl", "clip_low", "clip_high")
                  } if g.iterations > 1 else {}
        means = {k: common.mean_all(v) for k, v in {"reward": r, **parts}.items()}
        log({"stage": 2, "step": step + 1, **means, "kl": up["kl"], "entropy": common.mean_all(ro.entropy[ro.mask]),
             "clip_low": up["clip_low"], "clip_high": up["clip_high"], **passes, "kept": up["kept"], "loss": up["loss"],
             "grad_norm": up["grad_norm"], "zero_std_groups": zero / groups, "len": common.mean_all(ro.mask.sum(1)),
             "cot_len": common.mean_all(cot_len), "skipped": up["skipped"], "phase": "grpo_step", **cost,
             "tokens": tokens, "tok_s": common.rate(tokens, cost["rollout_s"]), "s": round(time.time() - t0, 2)})
        st["skips"] = st["skips"] + 1 if up["skipped"] else 0
        if up["skipped"]:
            tqdm.write(f"warning: step {step + 1} skipped, nothing reached the weights: {up['skipped']}")
            if st["skips"] >= g.max_skips:
                fail(f"{st['skips']} GRPO steps in a row had non-finite values ({up['skipped']}). "
                     + checkpoint.restart_advice(cfg, "Lower --grpo.lr or check the rewards"))
        elif not grpo.finite_outputs(model, p_ids[:1], p_mask[:1], amp):  # checked before anything is saved
            fail(f"step {step + 1}'s update broke the weights: every gradient was finite, the policy's outputs are not "
                 f"(--grpo.lr {g.lr:g} far too high?). " + checkpoint.restart_advice(cfg, "Lower --grpo.lr"))
        if MAIN and g.sample_every and (step + 1) % g.sample_every == 0:
            tqdm.write(f"--- step {step + 1} sample (reward {r[0]:.3f}; target: {ds.titles[samples[0]['target']]})\n"
                       f"{texts[0][:1500]}\n--- its summary: {summaries[0][:300]}")
        if (step + 1) % g.eval_every == 0 or step + 1 == total:
            validate(step + 1)
        st["step"] = step + 1
        halt = stop.requested()
        if (g.save_every and st["step"] % g.save_every == 0) or st["step"] == total or st["stopped"] or halt:
            with common.measure({"stage": 2, "step": st["step"], "phase": "checkpoint"}) as cost:
                checkpoint.save(out, model, tok, opt, st)
            log(cost)
        if halt:
            stop.stop(out, st["step"], total)
    return st


# ----------------------------------------------------------------------------- evaluation and main
def score_split(cfg, ds, head, model, tok, split, samples, seed=None, cost=None):
    """Metrics of one split with CoTs sampled by `model`, plus their parse rate."""
    rs, parsed = generate_reasoning(cfg, ds, model, tok, split, samples, seed, cost)
    m = evaluate_split(cfg, head, rechead_inputs(cfg, ds, samples, rs), samples)
    return m if parsed is None else {**m, "parse_rate": parsed}


def main(argv):
    t_start = time.time()
    cfg = parse_config(argv)  # every check runs before any work or write
    common.init_distributed(cfg.run.dist_backend)
    common.seed_all(cfg.run.seed)
    out, log = cfg.run.out, common.Logger(cfg.run.out)
    if MAIN:
        config.start_run(cfg, Config())  # the run lock, config.json, and the config in a few lines
    with common.plain_errors():  # a bad table, a failed download, --rechead.heads not dividing the encoder's width
        ds = common.main_first(data.load_dataset, cfg.data)
        config.check_data(cfg, ds)
        head = make_head(cfg, ds)  # the small model first: its checks come before the backbone loads
    splits = {k: v[:cfg.run.limit or None] for k, v in ds.splits.items()}
    model, tok = load_backbone(cfg, ds)
    if MAIN and toy.notice(cfg.run.model):
        print(toy.notice(cfg.run.model))
    if MAIN and model is not None:
        s = decode.resolve_sampling(cfg.decode, model)
        print("reasoning: " + ("greedy" if s.greedy else f"sampled, temperature {s.temperature} top_p {s.top_p} "
                               f"top_k {s.top_k}"))
    mpath = os.path.join(out, "metrics.json")
    metrics = common.load_json(mpath, "delete it; each stage you run writes its own") if os.path.exists(mpath) else {}
    metrics.pop("cost", None)  # recomputed from log.jsonl
    checkpoint.keep_for_recommend(cfg, ds, head, model, tok)

    def save_metrics():  # the metrics so far and the cost of every phase logged in this run folder
        if MAIN:
            metrics["cost"] = common.cost_summary(log.records())
            common.save_json(mpath, metrics)

    if cfg.run.stage == "1" or (cfg.run.stage == "both" and not cfg.run.resume):
        metrics.update(stage1(cfg, ds, head, model, tok, splits, log, out))
        save_metrics()
        if MAIN:
            checkpoint.finish_stage1(out)  # Stage II takes only a finished Stage I
            print(f"stage 1 done after {time.time() - t_start:.0f} s")
    else:  # Stage II alone, or resumed: the finished Stage I's Rechead, copied into this folder
        config.restore_rechead(head, cfg.run.init or out, out)
    if cfg.run.stage in ("2", "both") and cfg.run.ablate not in ("I", "II"):
        with common.Preemption() as stop:  # SIGTERM or Ctrl-C: finish the step, checkpoint it, exit
            st = stage2(cfg, ds, head, model, tok, splits, log, out, stop)
        checkpoint.load_best(out, model).eval()  # the best valid step's backbone reasons again
        metrics["stage2"] = {"step": st["best_step"]}
        log.restart("final")  # a resumed run evaluates again: its lines replace the last ones
        for k in ("valid", "test"):
            cost = {"stage": "final", "phase": "final_eval", "split": k}
            with common.measure(cost):  # generation and scoring
                metrics["stage2"][k] = score_split(cfg, ds, head, model, tok, k, splits[k], cost=cost)
            log(cost)
        save_metrics()
        if MAIN:
            common.plot_stage2(out, log.records(), rewards.TERMS)
            print(f"stage 2 done after {time.time() - t_start:.0f} s; best valid step {st['best_step']}")
    log({"stage": "run", "phase": "run", "s": round(time.time() - t_start, 2)})  # an invocation that got here
    save_metrics()
    if MAIN:
        common.print_metrics(metrics)  # and the cost of each phase
        print(f"run folder: {out}")
    if DISTRIBUTED:
        dist.destroy_process_group()
    common.unlock_run(out)
    return metrics


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
