"""RPORec, the one train script (arXiv 2605.21967, Algorithm 1).

    python rporec.py                          # toy preset: small models built in code, CPU, offline
    python rporec.py --dataset cds            # the paper run (Qwen3-0.6B)
    torchrun --nproc_per_node 4 rporec.py --dataset cds
    python rporec.py --help                   # every flag, its default, its allowed values

Top to bottom: config, data and backbone, Stage I (Algorithm 1 lines 1-12: sampled reasoning, then
the Rechead of eq. 1-6), Stage II (lines 13-21: GRPO on Rechead rewards, eq. 7-11), evaluation,
main. A run's bookkeeping (its folder, log, metrics, checkpoints, resume, preemption) sits behind
plumbing.run.Run.
"""
from __future__ import annotations

import sys

from plumbing import flags

if __name__ == "__main__":  # --help and flag errors answer at once, before torch loads (flags.py)
    flags.answer_early("rporec", sys.argv[1:], __doc__)

import dataclasses
from dataclasses import dataclass, field

import torch

import data
import evaluate
import grpo
import rechead
import rewards
from plumbing import checkpoint, config, decode, seeds, toy
from plumbing.errors import plain_errors, run_main
from plumbing.flags import SEED, OneOf, Own, Range, Text, setting
from plumbing.processes import DEVICE, DTYPE, MAIN, RANK, WORLD, ddp, main_first, shard, unshard
from plumbing.run import Run

AMP = DTYPE if DEVICE.type == "cuda" else None  # autocast dtype of the GRPO forwards (bf16 on GPU)


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    dataset: str = setting("toy", Own("a key of PRESETS"))  # preset and data source (data.py)
    model: str = setting("toy", Text())  # backbone: hub id, local folder, "toy" (built in code),
    # "none" (no LLM) or "random:Qwen3-0.6B" (real size, random weights: times a run)
    stage: str = setting("both", OneOf("1", "2", "both"), rerun=True)  # 1 | 2 | both (Alg. 1)
    out: str = setting("", Own("a folder you can write to"), place=True)  # run folder; default
    # runs/<dataset>-<time>
    init: str = setting("", Own("a finished Stage I run folder"), rerun=True, place=True)
    # --stage 2: the Stage I run folder holding rechead.pt (required)
    resume: bool = setting(False, rerun=True)  # continue Stage II from <out>/ckpt
    ablate: str = setting("", OneOf("", "cot", "I", "II"))  # paper Fig. 2: -cot, -I, -II;
    # the reward terms' ablations are --rewards.drop
    thinking: bool = setting(True)  # Qwen3 chat template thinking mode
    prompt_suffix: str = setting("")  # appended to the paper's prompt, e.g. a <think>/<answer>
    # format hint for backbones without a thinking mode (SmolLM2); "" = the paper's prompt
    gen_batch: int = setting(64, Range(1), rerun=True)  # prompts per generation batch (Stage I
    # reasoning, evaluation); speed only: each sample draws from its own seed
    limit: int = setting(0, Range(0))  # > 0: only the first `limit` samples of each split
    seed: int = setting(0, SEED)  # seeds python, numpy, torch and every sampled CoT
    threads: int = setting(1, Range(0), rerun=True)  # torch's CPU threads; one keeps a CPU run's
    # numbers the same on any machine and load (0 = torch's default, one per core)
    dist_backend: str = setting("auto", OneOf("auto", "nccl", "gloo"), rerun=True)  # torchrun:
    # auto (nccl on GPUs, else gloo) | nccl | gloo
    official_eval: bool = setting(False)  # also the official protocol: valid only, 4 sampled
    # CoTs, metrics averaged

    def has_stage2(self) -> bool:
        """Whether the run has a Stage II: -I and -II have none, --stage 1 stops before it."""
        return self.stage != "1" and self.ablate not in ("I", "II")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: data.DataConfig = field(default_factory=data.DataConfig)
    rechead: rechead.RecheadConfig = field(default_factory=rechead.RecheadConfig)
    # Alg. 1 line 1 and evaluation: sampled as the backbone's own generation_config
    decode: decode.DecodeConfig = field(
        default_factory=lambda: decode.DecodeConfig(temperature=None, top_p=None, top_k=None))
    grpo: grpo.GRPOConfig = field(default_factory=grpo.GRPOConfig)
    rewards: rewards.RewardConfig = field(default_factory=rewards.RewardConfig)
    eval: evaluate.EvalConfig = field(default_factory=evaluate.EvalConfig)


QWEN = {"run.model": "Qwen/Qwen3-0.6B"}
PRESETS = {
    # the bookstore and small models built in code (plumbing/toy.py): the paper's pipeline, eq. 7's
    # r_fmt gate on, in two minutes on a CPU. The prompts show the newest two books, x all twenty;
    # a larger gamma lets eq. 4's reasoning branch weigh as much as the answer, which here names a
    # genre only; Stage II takes more prompts a step, 4 passes over each and a tiny model's lr
    "toy": {"run.model": "toy", "rechead.encoder": "toy",
            "data.max_history_chars": toy.HISTORY_CHARS,
            "rechead.history_chars": 20 * toy.HISTORY_CHARS, "rechead.gamma": 0.9,
            "rechead.layers": 1, "rechead.heads": 2, "rechead.batch_size": 64,
            "rechead.epochs": 40, "rechead.patience": 4, "decode.max_new_tokens": 24,
            "grpo.max_new_tokens": 24, "grpo.steps": 30, "grpo.prompts_per_step": 16,
            "grpo.iterations": 4, "grpo.lr": 3e-4, "grpo.save_every": 10, "grpo.sample_every": 10,
            "grpo.eval_every": 10, "rewards.summary_max_new_tokens": 12},
    "cds": QWEN, "instruments": QWEN, "games": QWEN, "ml-100k": QWEN, "ml-1m": QWEN,
    "custom": QWEN,
}


def parse_config(argv):
    """Defaults < PRESETS[dataset] < flags, then the derived fields and every check."""
    return config.parse(Config(), PRESETS, argv, __doc__)


# ----------------------------------------------------------------------------- data and backbone
def load(cfg, run):
    """The data, the Rechead, the backbone: in that order, each one's checks before slower loads."""
    with plain_errors():  # a bad table, a failed download, heads not dividing the encoder's width
        ds = main_first(data.load_dataset, cfg.data)
        config.check_data(cfg, ds)
        head = make_head(cfg, ds)
    model, tok = load_backbone(cfg, ds)
    if MAIN and toy.notice(cfg.run.model):
        print(toy.notice(cfg.run.model))
    if MAIN and model is not None:
        s = decode.resolve_sampling(cfg.decode, model)
        print("reasoning: " + ("greedy" if s.greedy else f"sampled, temperature {s.temperature} "
                                                         f"top_p {s.top_p} top_k {s.top_k}"))
    checkpoint.keep_for_recommend(cfg, ds, head, model, tok)  # what recommend.py reads
    return ds, head, model, tok


def load_backbone(cfg, ds):
    """(model, tokenizer) from a hub id, a local folder or a builder; (None, None) for none."""
    name = cfg.run.model
    if name == "toy":  # built once per item table into the data folder; taught the bookstore's ways
        train = ds.splits["train"][:cfg.run.limit or None]
        lessons = toy.lessons(ds, train, lambda s: data.build_messages(ds, s, cfg.data,
                                                                        cfg.run.prompt_suffix))
        where = toy.model_dir(cfg.data.data_dir, "backbone", [ds.texts[1:], lessons])
        name = main_first(toy.build_backbone, ds.texts[1:], where, 0, lessons)
    if name.startswith("random:"):  # real size, random weights; Qwen's tokenizer, cached
        return toy.build_standin(name[len("random:"):], DTYPE, DEVICE, cache_dir=cfg.data.data_dir)
    return (None, None) if name == "none" else decode.load_model(name, DTYPE, DEVICE)


def make_head(cfg, ds):
    head_cfg = cfg.rechead
    if head_cfg.encoder == "toy":  # built once per item table into the data folder
        where = toy.model_dir(cfg.data.data_dir, "encoder", ds.texts[1:])
        head_cfg = dataclasses.replace(head_cfg,
                                       encoder=main_first(toy.build_encoder, ds.texts[1:], where))
    return rechead.Rechead(head_cfg, ds.texts, DEVICE)


# ----------------------------------------------------------------------------- Stage I (eq. 1-6)
def generate_reasoning(cfg, ds, model, tok, split, samples, seed=None, cost=None):
    """Line 1: a sampled completion per sample as (y, z) (z None: not parsed); the parse rate."""
    if model is None:  # --model none: the history-only Rechead
        return [("", None)] * len(samples), None
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["history"]))  # batch alike
    texts = checkpoint.sample_cached(  # a resumable cache; a rerun draws the same CoTs
        cfg, model, tok, split, order,
        lambda i: data.build_messages(ds, samples[i], cfg.data, cfg.run.prompt_suffix),
        cfg.run.seed if seed is None else seed, {} if cost is None else cost,
        data.reasoning_key(cfg.data))
    rs = [rewards.split_reasoning(texts[i]) for i in range(len(samples))]
    return rs, sum(z is not None for _, z in rs) / max(len(rs), 1)


def rechead_step(net, head, opt, inputs, targets, idx, neg):
    """Lines 4 and 6 on a global batch idx (B,) with negatives neg (B, k). Each rank takes a strided
    share, its loss weighted by it, so DDP's gradient average is the global batch mean."""
    x, y, z = inputs
    mine, neg = idx[RANK::WORLD], neg[RANK::WORLD]
    h = net([x[i] for i in mine], [y[i] for i in mine], [z[i] for i in mine])  # (b, d), eq. 1-4
    loss = head.loss(h, targets[mine].to(DEVICE), neg.to(DEVICE))  # eq. 5-6
    opt.zero_grad(set_to_none=True)
    (loss * len(mine) * WORLD / len(idx)).backward()
    opt.step()
    return loss.item()


def train_rechead(cfg, ds, head, inputs, splits, run):
    """Lines 2-12: epochs of mini-batches with fresh negatives until valid NDCG@10 stops rising."""
    k, targets = cfg.rechead.negatives, torch.tensor([s["target"] for s in splits["train"]])
    gen = torch.Generator().manual_seed(cfg.run.seed)  # the same batches and negatives on each rank
    opt, net = rechead.make_optimizer(head, cfg.rechead.lr), ddp(head)
    for epoch in run.rechead_epochs(head, len(targets)):  # lines 8-12: rechead.pt keeps the best
        head.train()
        perm = torch.randperm(len(targets), generator=gen)
        losses = [rechead_step(net, head, opt, inputs["train"], targets, idx,  # line 5: negatives
                               rechead.sample_negatives(targets[idx], ds.n_items, k, gen))
                  for idx in run.batches(perm, cfg.rechead.batch_size, epoch)]  # line 3
        run.end_epoch(losses, lambda: evaluate_split(cfg, head, inputs["valid"], splits["valid"]))


def stage1(cfg, ds, head, model, tok, splits, run):
    """Algorithm 1 lines 1-12: reasoning for every split, once, then the Rechead."""
    run.log.restart(1)
    reasoning = {}
    for k, v in splits.items():  # line 1, once
        cost = {"stage": 1, "phase": "reasoning", "split": k}
        reasoning[k] = generate_reasoning(cfg, ds, model, tok, k, v, cost=cost)
        if model is not None:
            run.log({**cost, "parse_rate": reasoning[k][1]})
    inputs = {k: data.rechead_inputs(cfg, ds, splits[k], rs) for k, (rs, _) in reasoning.items()}
    head.prepare([t or "" for x, y, z in inputs.values() for t in (*x, *y, *z)], cfg.data.data_dir)
    if cfg.run.ablate != "I":  # -I: no Rechead, the answers go to the nearest items
        train_rechead(cfg, ds, head, inputs, splits, run)


# ----------------------------------------------------------------------------- Stage II (eq. 7-11)
def stage2(cfg, ds, head, model, tok, splits, run):
    """Algorithm 1 lines 13-21: GRPO on the frozen Rechead's rewards, epochs over train until the
    policy's valid NDCG@10 stops rising (step 0, the Stage I backbone, is a candidate)."""
    g, train = cfg.grpo, splits["train"]
    head.eval().requires_grad_(False)  # Theta_R* frozen: the verifier
    ref, opt = grpo.reference_and_optimizer(model, g)  # pi_ref: the KL, the summarizer of r_sim
    sampling = grpo.rollout_sampling(cfg.decode, g)
    loop = run.grpo_loop(model, tok, opt, len(train), ds.titles,  # resume, checkpoints, preemption
                         validation(cfg, ds, head, model, tok, splits["valid"]))
    for step in loop:  # lines 13-14: epochs of prompt batches
        batch = seeds.step_batch(step, len(train), g.prompts_per_step, cfg.run.seed)
        samples = [dict(train[i], i=i) for i in shard(batch)]
        messages = [data.build_messages(ds, s, cfg.data, cfg.run.prompt_suffix) for s in samples]
        ids, mask = decode.encode_prompts(tok, messages, cfg.run.thinking, DEVICE)
        with loop.timed("rollout"):  # line 15: y and z sampled by the policy, G per prompt
            out = grpo.rollout(model.eval(), ids, mask, g.group_size, sampling,
                               decode.eos_ids(model, tok), tok.pad_token_id)
        with loop.timed("rewards"):  # lines 16-18: the frozen Rechead's eq. 5, the rewards, eq. 7
            scored = rewards.score(cfg, ds, head, ref, tok, samples, out)
        adv = grpo.group_advantages(scored.total, g.group_size, g.adv_eps)  # eq. 8
        with loop.timed("update"):  # line 19: GRPO with the entropy mask, eq. 9-11
            batch = grpo.make_batch(ids, mask, out, adv.to(DEVICE), g.group_size)
            stats = grpo.update(model.train(), ref, opt, batch, g, AMP)
        loop.log(step, samples, scored, out, stats, adv)
        loop.guard(step, stats, lambda: grpo.finite_outputs(model, ids[:1], mask[:1], AMP))
        if loop.eval_due(step + 1):  # line 21: the valid curve; best/ keeps the best step
            loop.validate(step + 1)
    return loop.best_step


# ----------------------------------------------------------------------------- evaluation
def evaluate_split(cfg, head, inputs, samples, ground=False):
    """Full ranking over all items, sharded over ranks and gathered back exactly. ground=True is the
    -I ablation: no Rechead; the answer (else the history) goes to the nearest items by cosine."""
    x, y, z = inputs
    head.eval()

    def scores(chunk):
        idx = [s["i"] for s in chunk]
        if ground:
            answers = head.encode_frozen([z[i] or x[i] for i in idx])
            return rechead.ground_scores(answers, head.item_vecs)
        return head.scores(head.user_vecs([x[i] for i in idx], [y[i] for i in idx],
                                          [z[i] for i in idx]))

    ranks = evaluate.full_ranking(scores, shard([dict(s, i=i) for i, s in enumerate(samples)]),
                                  cfg.eval.chunk, cfg.eval.mask_history)
    return evaluate.metrics(unshard(ranks, len(samples)), cfg.eval.ks)


def score_split(cfg, ds, head, model, tok, split, samples, seed=None, cost=None, ground=False):
    """Metrics of one split with CoTs sampled by `model`, and their parse rate."""
    rs, parsed = generate_reasoning(cfg, ds, model, tok, split, samples, seed, cost)
    m = evaluate_split(cfg, head, data.rechead_inputs(cfg, ds, samples, rs), samples, ground)
    return m if parsed is None else {**m, "parse_rate": parsed}


def stage1_metrics(cfg, ds, head, model, tok, splits):
    """Stage I's valid and test metrics (their CoTs from the reasoning cache), the official protocol
    if asked, and the floors."""
    metrics = {k: score_split(cfg, ds, head, model, tok, k, splits[k], ground=cfg.run.ablate == "I")
               for k in ("valid", "test")}
    if cfg.run.official_eval and model is not None:
        metrics["valid_official"] = official_eval(cfg, ds, head, model, tok, splits["valid"])
    return {"stage1": metrics, **floors(cfg, ds, splits)}


def validation(cfg, ds, head, model, tok, valid):
    """Stage II's model selection: validation(cost) scores the policy's CoTs of a fixed, seeded
    valid subset, ranked by the frozen Rechead."""
    subset = seeds.eval_subset(valid, cfg.grpo.eval_samples, cfg.run.seed)
    return lambda cost: score_split(cfg, ds, head, model.eval(), tok, f"valid{len(subset)}", subset,
                                    cost=cost)


def official_eval(cfg, ds, head, model, tok, valid):
    """The official code's protocol: valid only, the metrics of 4 sampled CoTs averaged."""
    return evaluate.average_metrics([score_split(cfg, ds, head, model, tok, "valid", valid,
                                                 cfg.run.seed + 1000 + j) for j in range(4)])


def floors(cfg, ds, splits):
    """What a recommender must beat on test: train popularity and first-order transitions."""
    args = (splits["train"], splits["test"], ds.n_items, cfg.eval)
    return {"popularity": {"test": evaluate.popularity_metrics(*args)},
            "transition": {"test": evaluate.transition_metrics(*args)}}


def final_eval(cfg, ds, head, model, tok, splits, run, best):
    """The best valid step's backbone (best/) reasons again on valid and test; the Rechead ranks."""
    checkpoint.load_best(cfg.run.out, model).eval()
    run.log.restart("final")  # a resumed run evaluates again: its lines replace the last ones
    out = {"step": best}
    for k in ("valid", "test"):
        with run.phase({"stage": "final", "phase": "final_eval", "split": k}) as cost:
            out[k] = score_split(cfg, ds, head, model, tok, k, splits[k], cost=cost)
    return out


# ----------------------------------------------------------------------------- main
def main(argv):
    cfg = parse_config(argv)  # every check runs before any work or write
    with Run(cfg, Config()) as run:  # processes, seeds, the run folder: lock, config.json, log, metrics
        with run.starting():  # a failed start leaves nothing behind
            ds, head, model, tok = load(cfg, run)
        splits = {k: v[:cfg.run.limit or None] for k, v in ds.splits.items()}
        if run.runs_stage1:
            stage1(cfg, ds, head, model, tok, splits, run)
        else:  # Stage II alone, or resumed: the finished Stage I's Rechead, copied into this folder
            checkpoint.restore_rechead(head, cfg.run.init or cfg.run.out, cfg.run.out)
        if run.runs_stage1 or run.lost_stage1:  # a resume rebuilds what a deleted metrics.json lost
            run.finish_stage1(stage1_metrics(cfg, ds, head, model, tok, splits))
        if cfg.run.has_stage2():
            best = stage2(cfg, ds, head, model, tok, splits, run)
            run.finish_stage2({"stage2": final_eval(cfg, ds, head, model, tok, splits, run, best)},
                              cfg.rewards.labels())
        return run.close()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
