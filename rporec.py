"""RPORec, the one train script (arXiv 2605.21967, Algorithm 1).

    python rporec.py                                  # toy preset: tiny random models, CPU, offline
    python rporec.py --dataset cds                    # the paper run (Qwen3-0.6B)
    torchrun --nproc_per_node 4 rporec.py --dataset cds
    python rporec.py --help                           # every flag, its default and what it means

Top to bottom: config, data and backbone, sampled reasoning (Alg. 1 line 1), Stage I (Rechead,
eq. 1-6, lines 2-12), Stage II (GRPO with Rechead rewards, eq. 7-11, lines 13-21, keeping the best
valid step), evaluation and main. Flag parsing and checks live in config.py; processes, files, caches and
checkpoints in common.py. Each run folder holds config.json, log.jsonl, rechead.pt, ckpt/, best/,
metrics.json and stage2.png.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import config
import data
import decode
import evaluate
import grpo
import rechead
import rewards
from common import DEVICE, DTYPE, MAIN, RANK, WORLD, fail, shard


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    dataset: str = "toy"      # preset and data source (PRESETS, data.py)
    model: str = "toy"        # backbone: hub id, local folder, "toy" (tiny random) or "none" (no LLM)
    stage: str = "both"       # 1 | 2 | both (Algorithm 1)
    out: str = ""             # run folder; default runs/<dataset>-<time>
    init: str = ""            # --stage 2: the Stage I run folder holding rechead.pt (required)
    resume: bool = False      # continue Stage II from <out>/ckpt
    ablate: str = ""          # "" | cot | I | II (paper Fig. 2); reward terms: --rewards.drop
    thinking: bool = True     # Qwen3 chat template thinking mode
    prompt_suffix: str = ""   # appended to the paper's prompt, e.g. a <think>/<answer> format hint for
                              # backbones without a thinking mode (SmolLM2); "" = the paper's prompt
    gen_batch: int = 64       # prompts per generation batch (Stage I reasoning, evaluation)
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
    """(model, tokenizer) from a hub id or local folder; (None, None) for --model none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = cfg.run.model
    if name == "none":
        return None, None
    if name == "toy":
        where = os.path.join(cfg.data.data_dir, "toy", "backbone")
        name = common.main_first(data.build_toy_backbone, ds.texts[1:], where)
    try:
        tok = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPE).to(DEVICE).eval()
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"could not load the backbone {name!r}: {e}\nPass a local folder with --model PATH, check the hub "
             "id and the network, or delete a corrupt local copy")
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def sampling(cfg, model):
    """The reasoning DecodeConfig: None fields take the backbone's generation_config (Qwen3-0.6B: temperature
    0.6, top_p 0.95, top_k 20; the official script samples with it), else temperature 1.0, top_p 0.95."""
    given = model.generation_config.to_diff_dict()  # only what the checkpoint sets
    fallback = {"temperature": 1.0, "top_p": 0.95, "top_k": 0}
    return dataclasses.replace(cfg.decode, **{k: given.get(k) or v for k, v in fallback.items()
                                              if getattr(cfg.decode, k) is None})


def user_messages(cfg, ds, sample):
    """The paper's prompt for one sample (data.build_messages) plus --prompt_suffix."""
    msgs = data.build_messages(ds, sample, cfg.data)
    if cfg.run.prompt_suffix:
        msgs[-1] = {**msgs[-1], "content": f"{msgs[-1]['content']}\n{cfg.run.prompt_suffix}"}
    return msgs


# ----------------------------------------------------------------------------- reasoning (Alg. 1, line 1)
def split_reasoning(text):
    """(y, z): the CoT, and the answer or None when it did not parse (eq. 2 falls back to history)."""
    think, answer = rewards.parse_completion(text)
    return (think if think is not None else text.split("<answer>")[0].strip()), (answer or None)


def cache_path(cfg, model, split, seed):
    """The reasoning cache of a split, keyed by the weights themselves (not the model's name), the prompt, the
    resolved sampling, the seed and the data: a key that changes with any of them cannot go stale."""
    key = json.dumps([common.weights_digest(model), cfg.run.thinking, cfg.run.prompt_suffix, data.PROMPT_VERSION,
                      dataclasses.asdict(sampling(cfg, model)), seed, cfg.data.max_history_chars,
                      data.cache_key(cfg.data)], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.data.data_dir, "reasoning", f"{cfg.data.dataset}-{digest}", f"{split}.jsonl")


def batch_seed(seed, split, first):
    """The sampling seed of one generation batch: a rerun draws the same CoTs."""
    return int(hashlib.sha1(f"{seed}|{split}|{first}".encode()).hexdigest()[:8], 16)


def generate_reasoning(cfg, ds, model, tok, split, samples, seed=None):
    """Sampled reasoning for every sample of a split, kept in a resumable JSONL cache (common.cached_map).
    Returns ([(y, z)] in sample order, the parse rate)."""
    if model is None:  # --model none: the history-only Rechead
        return [("", None)] * len(samples), None
    seed = cfg.run.seed if seed is None else seed
    dcfg = sampling(cfg, model)

    def generate(idx):
        with torch.random.fork_rng(devices=[DEVICE] if DEVICE.type == "cuda" else []):
            torch.manual_seed(batch_seed(seed, split, idx[0]))  # the rest of the run's RNG stays untouched
            messages = [user_messages(cfg, ds, samples[i]) for i in idx]
            texts, out = decode.complete(model, tok, messages, dcfg, cfg.run.thinking)
        return [{"i": i, "text": t} for i, t in zip(idx, texts)], int(out.mask.sum())

    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["history"]))  # similar lengths share a batch
    done = common.cached_map(cache_path(cfg, model, split, seed), order, cfg.run.gen_batch, generate,
                             f"reasoning {split}")
    rs = [split_reasoning(done[i]["text"]) for i in range(len(samples))]
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
    if rc.encoder == "toy":  # built once into the data folder; the config keeps saying "toy"
        where = os.path.join(cfg.data.data_dir, "toy", "encoder")
        path = common.main_first(data.build_toy_encoder, ds.texts[1:], where)
        rc = dataclasses.replace(rc, encoder=path)
    return rechead.Rechead(rc, ds.texts, DEVICE)


def embed_frozen(cfg, head, inputs):
    """Frozen encoders: embed every distinct text once, up front, and keep the embeddings on disk
    (<data_dir>/embeddings/, keyed by the encoder's weights) so that a rerun skips the work."""
    if head.cfg.trainable:
        return
    key = f"{common.weights_digest(head.item_encoder)}-{head.cfg.max_seq_length}"
    texts = list(dict.fromkeys(t or "" for x, y, z in inputs for t in (*x, *y, *z)))
    common.embed_cached(os.path.join(cfg.data.data_dir, "embeddings", f"{key}.pt"), texts, head,
                        16 * head.cfg.encode_batch)


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
    net = torch.nn.parallel.DistributedDataParallel(head, broadcast_buffers=False) if WORLD > 1 else head
    targets = torch.tensor([s["target"] for s in splits["train"]])
    best, best_state, bad = -1.0, None, 0
    for epoch in range(rc.epochs):
        head.train()
        t0, losses, perm = time.time(), [], torch.randperm(len(targets), generator=gen)
        for b in tqdm(range(0, len(perm), rc.batch_size), desc=f"rechead epoch {epoch}", leave=False, disable=not MAIN):
            idx = perm[b:b + rc.batch_size]
            neg = rechead.sample_negatives(targets[idx], ds.n_items, rc.negatives, gen)  # (B, k)
            losses.append(rechead_step(net, head, opt, inputs["train"], targets, idx, neg))
        m = evaluate_split(cfg, head, inputs["valid"], splits["valid"])
        log({"stage": 1, "epoch": epoch, "loss": float(np.mean(losses)), "valid_hr@10": m["hr@10"],
             "valid_ndcg@10": m["ndcg@10"], "epoch_s": round(time.time() - t0, 2)})
        if not math.isfinite(float(np.mean(losses))):
            fail(f"the Rechead loss is {np.mean(losses)} in epoch {epoch}; lower --rechead.lr. rechead.pt keeps "
                 f"the best epoch so far")
        if m["ndcg@10"] > best:
            best, bad, best_state = m["ndcg@10"], 0, copy.deepcopy(head.state_dict())
            if MAIN:
                common.save_torch(os.path.join(out, "rechead.pt"),
                                  {"state": best_state, "epoch": epoch, "config": dataclasses.asdict(cfg)})
        else:
            bad += 1
            if bad >= rc.patience:
                break
    head.load_state_dict(best_state)
    return head


# ----------------------------------------------------------------------------- Stage II: GRPO (eq. 7-11)
def reward_parts(cfg, ds, head, ref, tok, samples, texts, ro):
    """Section 2.2's rewards for B = N*G completions of N samples (groups contiguous): (r (B,), parts
    {name: (B,)}, CoT token counts (B,), summaries)."""
    rw, B = cfg.rewards, len(texts)
    owner = [samples[b // cfg.grpo.group_size] for b in range(B)]
    x, y, z = rechead_inputs(cfg, ds, owner, [split_reasoning(t) for t in texts])
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
    summaries, cos = [""] * B, torch.full((B,), -math.inf)
    summary_lens, cot_lens = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    if not todo:
        return summaries, cos, (summary_lens, cot_lens)
    scfg = dataclasses.replace(cfg.decode, greedy=True, max_new_tokens=cfg.rewards.summary_max_new_tokens,
                               temperature=1.0, top_p=1.0, top_k=0)
    outs, _ = decode.complete(ref, tok, [rewards.summary_messages(y[b]) for b in todo], scfg, thinking=False)
    outs = [o.strip() for o in outs]
    cos[todo] = torch.nn.functional.cosine_similarity(head.encode_frozen([y[b] for b in todo]),
                                                      head.encode_frozen(outs), dim=-1).float().cpu()
    for j, b in enumerate(todo):
        summaries[b] = outs[j]
        summary_lens[b] = len(tok(outs[j], add_special_tokens=False).input_ids)
        cot_lens[b] = len(tok(y[b], add_special_tokens=False).input_ids)
    return summaries, cos, (summary_lens, cot_lens)


@functools.lru_cache(maxsize=4)
def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_batch(step, n_train, per_step, seed):
    """Global train indices of one GRPO step: epoch-wise permutations, a pure function of the step,
    so a resumed run sees exactly the prompts it would have seen."""
    js = range(step * per_step, (step + 1) * per_step)
    return [int(_perm(n_train, seed + j // n_train)[j % n_train]) for j in js]


def eval_subset(valid, n, seed):
    """The fixed, seeded valid subset that Stage II's model selection scores."""
    idx = sorted(torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [valid[i] for i in idx]


def stage2(cfg, ds, head, model, tok, splits, log, out):
    """Algorithm 1 lines 13-21: G rollouts per prompt, rewards from the frozen Rechead, GRPO updates, epochs
    over train until the valid curve stops improving. Step 0 (the Stage I backbone) is a candidate."""
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
    if cfg.run.resume:
        st = {k: v for k, v in common.load_checkpoint(out, model, opt).items() if k in st}
    log.drop_after(st["step"])
    subset = eval_subset(splits["valid"], g.eval_samples, cfg.run.seed)
    roll = dataclasses.replace(cfg.decode, greedy=False, temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                               top_p=1.0, top_k=0)  # pi_old must be the distribution that sampled
    amp = DTYPE if DEVICE.type == "cuda" else None

    def validate(step):  # regenerate the subset's CoTs with the current policy; the frozen Rechead scores them
        model.eval()
        rs, parsed = generate_reasoning(cfg, ds, model, tok, f"valid{len(subset)}", subset)
        m = evaluate_split(cfg, head, rechead_inputs(cfg, ds, subset, rs), subset)
        if m["ndcg@10"] > st["best"]:
            st.update(best=m["ndcg@10"], best_step=step, bad=0)
            common.save_pretrained(os.path.join(out, "best"), model, tok, {"step": step, "valid_ndcg@10": m["ndcg@10"]})
        else:
            st["bad"] += 1
        log({"stage": 2, "step": step, "valid_hr@10": m["hr@10"], "valid_ndcg@10": m["ndcg@10"], "parse_rate": parsed,
             "best_step": st["best_step"]})
        st["stopped"] = st["bad"] >= g.patience

    if st["step"] == 0:
        validate(0)
    for step in tqdm(range(st["step"], total), desc="grpo", initial=st["step"], total=total, disable=not MAIN):
        if st["stopped"]:
            break
        t0 = time.time()
        samples = [dict(train[i], i=i) for i in shard(step_batch(step, len(train), g.prompts_per_step, cfg.run.seed))]
        p_ids, p_mask = decode.encode_prompts(tok, [user_messages(cfg, ds, s) for s in samples], cfg.run.thinking,
                                              DEVICE)
        model.eval()
        ro = grpo.rollout(model, p_ids, p_mask, g.group_size, roll, decode.eos_ids(model, tok), tok.pad_token_id)
        texts = tok.batch_decode(ro.tokens.masked_fill(~ro.mask, tok.pad_token_id), skip_special_tokens=True)
        r, parts, cot_len, summaries = reward_parts(cfg, ds, head, ref, tok, samples, texts, ro)
        head.forget()  # every step brings new CoTs: keep the frozen-embedding cache bounded
        adv = grpo.group_advantages(r, g.group_size, g.adv_eps)
        model.train()
        up = grpo.update(model, ref, opt, grpo.make_batch(p_ids, p_mask, ro, adv.to(DEVICE), g.group_size), g, amp)
        zero, groups = common.all_sum(grpo.zero_spread_groups(r, g.group_size), len(samples))
        passes = {f"{k}_p{j + 1}": p[k] for j, p in enumerate(up["passes"]) for k in ("kl", "clip_low", "clip_high")
                  } if g.iterations > 1 else {}
        log({"stage": 2, "step": step + 1, "reward": common.mean_all(r),
             **{k: common.mean_all(v) for k, v in parts.items()}, "kl": up["kl"],
             "entropy": common.mean_all(ro.entropy[ro.mask]), "clip_low": up["clip_low"], "clip_high": up["clip_high"],
             **passes, "kept": up["kept"], "loss": up["loss"], "grad_norm": up["grad_norm"],
             "zero_std_groups": zero / groups, "len": common.mean_all(ro.mask.sum(1)),
             "cot_len": common.mean_all(cot_len), "skipped": up["skipped"], "s": round(time.time() - t0, 2)})
        st["skips"] = st["skips"] + 1 if up["skipped"] else 0
        if up["skipped"]:
            tqdm.write(f"warning: step {step + 1} skipped, nothing reached the weights: {up['skipped']}")
            if st["skips"] >= g.max_skips:
                fail(f"{st['skips']} GRPO steps in a row had non-finite values ({up['skipped']}). ckpt/ and best/ "
                     "hold the last good weights; lower --grpo.lr or check the rewards, then --resume")
        if MAIN and g.sample_every and (step + 1) % g.sample_every == 0:
            tqdm.write(f"--- step {step + 1} sample (reward {r[0]:.3f}; target: {ds.titles[samples[0]['target']]})\n"
                       f"{texts[0][:1500]}\n--- its summary: {summaries[0][:300]}")
        if (step + 1) % g.eval_every == 0 or step + 1 == total:
            validate(step + 1)
        st["step"] = step + 1
        if (g.save_every and st["step"] % g.save_every == 0) or st["step"] == total or st["stopped"]:
            common.save_checkpoint(out, model, tok, opt, st)
    return st


# ----------------------------------------------------------------------------- evaluation and main
def plot_stage2(out, log):
    """Reward parts, KL, entropy, CoT length per step (cf. the paper's Fig. 4) and the valid curve: stage2.png."""
    recs = [r for r in log.records() if r["stage"] == 2]
    evals = [r for r in recs if "valid_ndcg@10" in r]
    common.plot_curves(os.path.join(out, "stage2.png"), [r for r in recs if "reward" in r],
                       ("reward", "fmt", "clean", "ndcg", "sim", "comp", "ent", "kl", "entropy", "cot_len"),
                       ("valid ndcg@10", [r["step"] for r in evals], [r["valid_ndcg@10"] for r in evals]))


def score_split(cfg, ds, head, model, tok, split, samples, seed=None, ground=False):
    """Metrics of one split with CoTs sampled by `model`, plus their parse rate."""
    rs, parsed = generate_reasoning(cfg, ds, model, tok, split, samples, seed)
    m = evaluate_split(cfg, head, rechead_inputs(cfg, ds, samples, rs), samples, ground)
    return m if parsed is None else {**m, "parse_rate": parsed}


def official_valid(cfg, ds, head, model, tok, valid, n=4):
    """The official code's protocol: valid metrics averaged over n sampled CoTs per sample."""
    return evaluate.average_metrics([score_split(cfg, ds, head, model, tok, "valid", valid, cfg.run.seed + 1000 + j)
                                     for j in range(n)])


def main(argv):
    t_start = time.time()
    cfg = parse_config(argv)  # every check runs before any work or write
    common.init_distributed(cfg.run.dist_backend)
    common.seed_all(cfg.run.seed)
    out, log = cfg.run.out, common.Logger(cfg.run.out)
    if MAIN:
        os.makedirs(out, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        common.save_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg))
    ds = common.main_first(data.load_dataset, cfg.data)
    splits = {k: v[:cfg.run.limit or None] for k, v in ds.splits.items()}
    model, tok = load_backbone(cfg, ds)
    if MAIN and cfg.run.model == "toy":
        print("toy preset: a tiny randomly initialised Qwen3 backbone and a random static-embedding encoder, both "
              "built in code (no download). Its reasoning is noise; the numbers only exercise the code.")
    if MAIN and model is not None:
        s = sampling(cfg, model)
        how = "greedy" if s.greedy else f"sampled, temperature {s.temperature} top_p {s.top_p} top_k {s.top_k}"
        print(f"reasoning: {how}")
    mpath = os.path.join(out, "metrics.json")
    metrics = json.load(open(mpath)) if os.path.exists(mpath) else {}
    head = make_head(cfg, ds)
    if cfg.run.stage in ("1", "both"):
        reasoning = {k: generate_reasoning(cfg, ds, model, tok, k, v) for k, v in splits.items()}
        inputs = {k: rechead_inputs(cfg, ds, splits[k], rs) for k, (rs, _) in reasoning.items()}
        if model is not None:
            log({"stage": 1, **{f"parse_rate_{k}": p for k, (_, p) in reasoning.items()}})
        embed_frozen(cfg, head, inputs.values())
        head.tokenise_all([t or "" for x, y, z in inputs.values() for t in (*x, *y, *z)])
        if cfg.run.ablate != "I":
            head = train_rechead(cfg, ds, head, inputs, splits, log, out)
        metrics["stage1"] = {k: evaluate_split(cfg, head, inputs[k], splits[k], cfg.run.ablate == "I")
                             for k in ("valid", "test")}
        if model is not None:
            for k in ("valid", "test"):
                metrics["stage1"][k]["parse_rate"] = reasoning[k][1]
        args = (splits["train"], splits["test"], ds.n_items, cfg.eval)
        metrics["popularity"] = {"test": evaluate.popularity_metrics(*args)}
        metrics["transition"] = {"test": evaluate.transition_metrics(*args)}
        if cfg.run.official_eval and model is not None:
            metrics["stage1"]["valid_official"] = official_valid(cfg, ds, head, model, tok, splits["valid"])
        if MAIN:
            print(f"stage 1 done after {time.time() - t_start:.0f} s")
    else:
        head.load_state_dict(config.load_rechead_file(cfg.run.init)["state"])
    if MAIN:
        common.save_json(mpath, metrics)
    if cfg.run.stage in ("2", "both") and cfg.run.ablate not in ("I", "II"):
        st = stage2(cfg, ds, head, model, tok, splits, log, out)
        from transformers import AutoModelForCausalLM  # the best valid step's backbone reasons again
        best = common.recover_dir(os.path.join(out, "best"), "info.json")
        if best is None:
            fail(f"{out}/best is missing; rerun Stage II (without --resume) to choose the best step again")
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(best, dtype=torch.float32).state_dict())
        metrics["stage2"] = {k: score_split(cfg, ds, head, model.eval(), tok, k, splits[k]) for k in ("valid", "test")}
        metrics["stage2"]["step"] = st["best_step"]
        if MAIN:
            common.save_json(mpath, metrics)
            plot_stage2(out, log)
            print(f"stage 2 done after {time.time() - t_start:.0f} s; best valid step {st['best_step']}")
    if MAIN:
        for name, m in metrics.items():
            for split, v in m.items():
                if isinstance(v, dict):
                    keys = ("hr@10", "ndcg@10", "hr@20", "parse_rate")
                    shown = "  ".join(f"{k}={v[k]:.4f}" for k in keys if v.get(k) is not None)
                    print(f"{name:>10} {split:>5}  {shown}")
        print(f"run folder: {out}")
    if WORLD > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(f"error: CUDA out of memory ({e}).\nFinished work is kept (reasoning cache, rechead.pt, "
                         "ckpt/): lower --gen_batch, --grpo.micro_batch or --grpo.logit_chunk, or turn on "
                         "--grpo.grad_checkpointing, then rerun (Stage II with --resume).") from e
