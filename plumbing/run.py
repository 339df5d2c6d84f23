"""A run folder and the bookkeeping around Algorithm 1, so that rporec.py shows the method alone (as cleanrl
marks what a reader may skip): the run's processes and seeds, its lock and config.json, log.jsonl, metrics.json
with the cost of every phase, the Rechead's early stopping (rechead.pt), and Stage II's loop with its resume,
checkpoints, preemption, best/ and the step lines. Each run folder holds config.json, log.jsonl, rechead.pt,
ckpt/, best/, metrics.json, stage2.png, run.lock, and what recommend.py reads (items.json, encoder/, backbone/).
"""
import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from plumbing import checkpoint, config
from plumbing.cost import cost_summary, measure, rate
from plumbing.errors import fail
from plumbing.files import load_json, save_bytes, save_json, unlock_run, writing
from plumbing.processes import DISTRIBUTED, MAIN, RANK, all_sum, init_distributed, mean_all, set_threads
from plumbing.report import plot_stage2, print_metrics, progress, quiet_library_bars
from plumbing.seeds import seed_all


class Run:
    """One invocation of the train script on its run folder, from the start (processes, seeds, lock,
    config.json) to close (the run's cost line, metrics.json, the metric lines)."""

    def __init__(self, cfg, default):
        self.t0, self.cfg, self.out = time.time(), cfg, cfg.run.out
        set_threads(cfg.run.threads)
        quiet_library_bars()
        init_distributed(cfg.run.dist_backend)
        seed_all(cfg.run.seed)
        self.log = Logger(self.out)
        self.new_folder = not os.path.exists(self.out)
        self.new_config = not os.path.exists(os.path.join(self.out, "config.json"))
        if MAIN:
            config.start_run(cfg, default)  # the run lock, config.json, and the config in a few lines
        self.metrics_path = os.path.join(self.out, "metrics.json")
        self.metrics = load_json(self.metrics_path, "delete it; each stage you run writes its own") \
            if os.path.exists(self.metrics_path) else {}
        self.metrics.pop("cost", None)  # recomputed from log.jsonl

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        """However the run ends, its folder's lock goes with it (close() releases it on success)."""
        unlock_run(self.out)

    @contextlib.contextmanager
    def starting(self):
        """The start (data, models, their checks): when it fails, what this invocation wrote goes again (the
        folder it made, or its config.json and run.lock), so the same command with the fix runs there."""
        try:
            yield
        except BaseException:
            if MAIN:
                unlock_run(self.out)
                if self.new_folder:
                    shutil.rmtree(self.out, ignore_errors=True)
                elif self.new_config:
                    os.remove(os.path.join(self.out, "config.json"))
            raise

    @property
    def runs_stage1(self):
        """Whether this invocation trains Stage I (a resumed run continues its Stage II)."""
        return self.cfg.run.stage == "1" or (self.cfg.run.stage == "both" and not self.cfg.run.resume)

    @property
    def lost_stage1(self):
        """Whether a resumed run misses its own Stage I's metrics (metrics.json was deleted)."""
        own = not self.cfg.run.init or os.path.realpath(self.cfg.run.init) == os.path.realpath(self.out)
        return self.cfg.run.resume and own and "stage1" not in self.metrics

    def save_metrics(self, new=None):
        """metrics.json: the metrics so far, updated by new, and the cost of every phase in log.jsonl."""
        self.metrics.update(new or {})
        if MAIN:
            self.metrics["cost"] = cost_summary(self.log.records())
            save_json(self.metrics_path, self.metrics)

    def finish_stage1(self, metrics):
        """Stage I's metrics saved, then rechead.pt marked finished: Stage II takes only a finished Stage I."""
        self.save_metrics(metrics)
        if MAIN:
            checkpoint.finish_stage1(self.out)
            print(f"stage 1 done after {time.time() - self.t0:.0f} s")

    def finish_stage2(self, metrics, terms):
        self.save_metrics(metrics)
        if MAIN:
            plot_stage2(self.out, self.log.records(), terms)
            print(f"stage 2 done after {time.time() - self.t0:.0f} s; best valid step {metrics['stage2']['step']}")

    @contextlib.contextmanager
    def phase(self, rec):
        """Measures the block into rec (its wall seconds, peak memory), then logs rec."""
        with measure(rec):
            yield rec
        self.log(rec)

    def close(self):
        """The invocation's own cost line, metrics.json, the metric lines; the folder's lock is released."""
        self.log({"stage": "run", "phase": "run", "s": round(time.time() - self.t0, 2)})  # an invocation that got here
        self.save_metrics()
        if MAIN:
            print_metrics(self.metrics)  # and the cost of each phase
            print(f"run folder: {self.out}")
        if DISTRIBUTED:
            dist.destroy_process_group()
        unlock_run(self.out)
        return self.metrics

    # ------------------------------------------------------------------------- Stage I: the Rechead's epochs
    def rechead_epochs(self, head, n_train):
        """Epochs of Algorithm 1 lines 2-12: yields each epoch, measured. After it (end_epoch gave its losses and
        how to score valid) it stops on a non-finite loss or score, logs the epoch, keeps the best epoch
        in rechead.pt and stops after --rechead.patience epochs without a better valid NDCG@10. At the end the
        best epoch's weights are back in head."""
        epochs, patience = self.cfg.rechead.epochs, self.cfg.rechead.patience
        best, best_state, bad = -1.0, None, 0
        for epoch in range(epochs):
            with measure({"phase": "rechead_epoch", "samples": n_train}) as cost:  # training and valid
                yield epoch
                losses, valid = self.epoch
                try:
                    if not math.isfinite(float(np.mean(losses))):
                        raise FloatingPointError(f"mean loss {np.mean(losses)}")
                    m = valid()
                except FloatingPointError as e:  # a NaN loss, or NaN scores of weights that diverged
                    fail(f"the Rechead diverged in epoch {epoch} ({e}); lower --rechead.lr. rechead.pt keeps the "
                         "best epoch so far")
            self.log({"stage": 1, "epoch": epoch, "loss": float(np.mean(losses)), "valid_hr@10": m["hr@10"],
                      "valid_ndcg@10": m["ndcg@10"], **cost, "samples_s": rate(n_train, cost["s"])})
            if m["ndcg@10"] > best:
                best, bad, best_state = m["ndcg@10"], 0, copy.deepcopy(head.state_dict())
                if MAIN:
                    checkpoint.save_rechead(self.out, best_state, epoch, self.cfg)
            else:
                bad += 1
                if bad >= patience:
                    break
        head.load_state_dict(best_state)

    def batches(self, perm, size, epoch):
        """The epoch's mini-batches of train indices (line 3), with a progress bar."""
        return progress(perm.split(size), desc=f"rechead epoch {epoch}", leave=False, disable=not MAIN)

    def end_epoch(self, losses, valid):
        """The epoch's training losses, and valid() its valid metrics, for rechead_epochs."""
        self.epoch = losses, valid

    # ------------------------------------------------------------------------- Stage II
    def grpo_loop(self, model, tok, opt, n_train, titles, validate):
        return GRPOLoop(self, model, tok, opt, n_train, titles, validate)


class GRPOLoop:
    """Stage II's bookkeeping around Algorithm 1 lines 13-21. Iterating gives the step numbers to run: epochs over
    the train set (--grpo.epochs, capped by --grpo.steps), from a checkpoint with --resume, until --grpo.patience
    evaluations without a better valid NDCG@10. After each step it checkpoints (every --grpo.save_every steps, at
    the end, on a stop) and, on SIGTERM or Ctrl-C, stops once the step is saved. `validate` keeps best/."""

    def __init__(self, run, model, tok, opt, n_train, titles, validate):
        cfg, g = run.cfg, run.cfg.grpo
        torch.manual_seed(cfg.run.seed + 1 + RANK)  # ranks sample different completions
        self.run, self.g, self.model, self.tok, self.opt, self.valid, self.titles = run, g, model, tok, opt, \
            validate, titles
        total = g.epochs * math.ceil(n_train / g.prompts_per_step)
        self.total = min(total, g.steps) if g.steps else total
        self.state = {"step": 0, "best_step": 0, "best": -1.0, "bad": 0, "skips": 0, "stopped": False}
        if cfg.run.resume and checkpoint.recover(run.out):  # else Stage I just finished: Stage II starts at step 0
            self.state = {k: v for k, v in checkpoint.load(run.out, model, opt).items() if k in self.state}
        run.log.restart(2, self.state["step"])

    @property
    def best_step(self):
        return self.state["best_step"]

    def __iter__(self):
        state, g, out = self.state, self.g, self.run.out
        with Preemption() as stop:  # SIGTERM or Ctrl-C: finish the step, checkpoint it, exit
            if state["step"] == 0:
                self.validate(0)
            for step in progress(range(state["step"], self.total), desc="grpo", initial=state["step"], total=self.total,
                             disable=not MAIN):
                if state["stopped"]:
                    break
                self.t0, self.cost = time.time(), {}
                yield step
                state["step"] = step + 1
                halt = stop.requested()
                due = g.save_every and state["step"] % g.save_every == 0
                if due or state["step"] == self.total or state["stopped"] or halt:
                    with self.run.phase({"stage": 2, "step": state["step"], "phase": "checkpoint"}):
                        checkpoint.save(out, self.model, self.tok, self.opt, state)
                if halt:
                    stop.stop(out, state["step"], self.total)

    @contextlib.contextmanager
    def timed(self, part):
        """Measures a part of the step (rollout, rewards, update) into its line. A rollout that meets
        non-finite probabilities (grpo.rollout) stops the run: an earlier update broke the weights in a way
        guard's check on the prompts it had did not show."""
        with measure(self.cost, f"{part}_s"):
            try:
                yield
            except FloatingPointError as e:
                done = self.state["step"]
                fail(f"step {done}'s update broke the weights: at step {done + 1}'s {part}, {e} (--grpo.lr "
                     f"{self.g.lr:g} far too high?). "
                     + checkpoint.restart_advice(self.run.cfg, "Lower --grpo.lr"))

    def log(self, step, samples, scored, rollout, stats, adv):
        """The step's line: every reward part, KL, entropy, clip fractions, lengths and cost; and now and then a
        sampled completion with its summary. zero_std_groups counts the prompts whose G rewards were all equal:
        eq. 8 gives them advantages of exactly 0, and no other group has only zeros."""
        g, r = self.g, scored.total
        tokens = int(all_sum(float(rollout.mask.sum()))[0])
        zero = int((adv.view(-1, g.group_size) == 0).all(1).sum())
        zero, groups = all_sum(zero, len(samples))
        passes = {f"{k}_p{j + 1}": p[k] for j, p in enumerate(stats["passes"]) for k in ("kl", "clip_low", "clip_high")
                  } if g.iterations > 1 else {}
        means = {k: mean_all(v) for k, v in {"reward": r, **scored.parts}.items()}
        self.run.log({"stage": 2, "step": step + 1, **means, "kl": stats["kl"],
                      "entropy": mean_all(rollout.entropy[rollout.mask]), "clip_low": stats["clip_low"],
                      "clip_high": stats["clip_high"], **passes, "kept": stats["kept"], "loss": stats["loss"],
                      "grad_norm": stats["grad_norm"], "zero_std_groups": zero / groups,
                      "len": mean_all(rollout.mask.sum(1)), "cot_len": mean_all(scored.cot_len),
                      "skipped": stats["skipped"], "phase": "grpo_step", **self.cost, "tokens": tokens,
                      "tok_s": rate(tokens, self.cost["rollout_s"]), "s": round(time.time() - self.t0, 2)})
        if MAIN and g.sample_every and (step + 1) % g.sample_every == 0:
            tqdm.write(f"--- step {step + 1} sample (reward {r[0]:.3f}; target: {self.titles[samples[0]['target']]})\n"
                       f"{scored.texts[0][:1500]}\n--- its summary: {scored.summaries[0][:300]}")

    def guard(self, step, stats, outputs_finite):
        """Non-finite values never reach a checkpoint: a step that update() stopped before any pass stepped is
        counted and, after --grpo.max_skips in a row, stops the run; after a step whose passes (all, or the
        ones before a stop) reached the weights, the policy's outputs (outputs_finite(), called only then)
        must be finite, or the run stops before saving anything."""
        state, g, cfg = self.state, self.g, self.run.cfg
        stepped = len(stats["passes"])  # --grpo.iterations > 1 may stop after some passes went through
        state["skips"] = state["skips"] + 1 if stats["skipped"] and not stepped else 0
        if stats["skipped"]:
            went = f"{stepped} pass(es) before it reached the weights" if stepped else "nothing reached the weights"
            tqdm.write(f"warning: step {step + 1} stopped, {went}: {stats['skipped']}")
            if state["skips"] >= g.max_skips:
                fail(f"{state['skips']} GRPO steps in a row had non-finite values ({stats['skipped']}). "
                     + checkpoint.restart_advice(cfg, "Lower --grpo.lr or check the rewards"))
        if (stepped or not stats["skipped"]) and not outputs_finite():
            finite = "" if stats["skipped"] else "every gradient was finite, "
            fail(f"step {step + 1}'s update broke the weights: {finite}the policy's outputs are not "
                 f"(--grpo.lr {g.lr:g} far too high?). " + checkpoint.restart_advice(cfg, "Lower --grpo.lr"))

    def eval_due(self, step):
        return step % self.g.eval_every == 0 or step == self.total

    def validate(self, step):
        """Scores the valid subset with the current policy (the loop's validate(cost)); a better valid NDCG@10
        than every earlier evaluation keeps this step's backbone in best/. --grpo.patience evaluations without
        one stop the loop."""
        state = self.state
        cost = {"phase": "stage2_eval"}
        with measure(cost):  # generation, scoring and the save of best/
            m = self.valid(cost)
            if m["ndcg@10"] > state["best"]:
                state.update(best=m["ndcg@10"], best_step=step, bad=0)
                info = {"step": step, "valid_ndcg@10": m["ndcg@10"]}
                checkpoint.save_pretrained(os.path.join(self.run.out, "best"), self.model, self.tok, info)
            else:
                state["bad"] += 1
        self.run.log({"stage": 2, "step": step, "valid_hr@10": m["hr@10"], "valid_ndcg@10": m["ndcg@10"],
                      "parse_rate": m["parse_rate"], "best_step": state["best_step"], **cost})
        state["stopped"] = state["bad"] >= self.g.patience


class Preemption:
    """While active (a `with` block): the first SIGTERM (a scheduler's notice before it kills a job) or Ctrl-C
    only asks the loop to stop at its next step boundary (`requested`, agreed by every rank); a second one stops
    at once."""

    def __init__(self):
        self.signum, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping "
                   "(send it again to stop at once)")

    def requested(self):
        return all_sum(float(self.signum is not None))[0] > 0

    def stop(self, out, step, total):
        """Exit after the checkpoint of `step` is saved, with how to go on; 128 + the signal, as a killed job."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        if MAIN:
            print(f"stopped by {name} after step {step} of {total}; {out}/ckpt holds it. To go on, rerun the same "
                  f"command with --out {out} --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))


class Logger:
    """One fixed-key line per record on stdout, and the same record appended to log.jsonl."""

    def __init__(self, out):
        self.path = os.path.join(out, "log.jsonl")

    def __call__(self, rec):
        if MAIN:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def records(self):
        """Every record of log.jsonl. A last line cut short (an append that met a full disk) is left out."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines()
        out = []
        for k, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                if k < len(lines) - 1:
                    raise SystemExit(f"error: {self.path} is corrupt on line {k + 1}; delete that line") from None
        return out

    def restart(self, stage, step=0):
        """Before a stage runs (again) from `step`: drop that stage's lines logged after step (all of them at
        step 0), so a rerun or a resume logs no line twice; a line cut short goes too."""
        if MAIN and os.path.exists(self.path):
            keep = [r for r in self.records() if r["stage"] != stage or (step and r.get("step", 0) <= step)]
            save_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
