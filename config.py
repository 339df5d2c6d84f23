"""The run config's one story: flags over presets over defaults (flags.parse_flags), the derived fields, and
every check that can fail, before any work or any write. A flag that contradicts another is an error; the
Stage II Rechead config comes from its --init folder; a run folder refuses another config (common)."""
import dataclasses
import os
import shutil
import textwrap
import time

import checkpoint
import common
import data
import flags as flags_lib  # `flags` names the parsed {key: value} below
import rechead
import toy
from common import DISTRIBUTED, WORLD, fail

# may differ between runs sharing a folder: how far Stage II goes, where Stage I came from, speed knobs
RERUN_OK = {"run.stage", "run.init", "run.resume", "run.gen_batch", "run.dist_backend", "grpo.steps", "grpo.epochs",
            "grpo.save_every", "grpo.sample_every", "grpo.micro_batch", "grpo.logit_chunk", "eval.chunk",
            "rechead.encode_batch", "decode.backend", "decode.cuda_graph", "decode.kv_bucket", "decode.kernels",
            "decode.sync_every", "decode.prefill_rows"}


PLACES = {"run.out", "run.init", "data.data_dir", "data.raw_dir", "data.force"}  # where, not what: no run identity

R, ONE, TEXT, ANY = flags_lib.Range, flags_lib.OneOf, flags_lib.Text(), flags_lib.ANY
SEED, RATE, POSITIVE = R(0, 2 ** 32 - 1), R(0, 1, open="low"), R(0, open="low")  # numpy seeds are 32-bit
RANGES = {  # every field's allowed values (flags.Range), checked first; data.RANGES holds the data section's
    "run.dataset": flags_lib.Own("a key of rporec.PRESETS"), "run.model": TEXT, "run.stage": ONE("1", "2", "both"),
    "run.out": flags_lib.Own("a folder you can write to"), "run.init": flags_lib.Own("a finished Stage I run folder"),
    "run.resume": ANY, "run.ablate": ONE("", "cot", "I", "II"), "run.thinking": ANY, "run.prompt_suffix": ANY,
    "run.gen_batch": R(1), "run.limit": R(0), "run.seed": SEED, "run.dist_backend": ONE("auto", "nccl", "gloo"),
    "run.official_eval": ANY,
    "rechead.encoder": TEXT, "rechead.trainable": ANY, "rechead.official": ANY, "rechead.use_cot": ANY,
    "rechead.gamma": R(0, 1, open="both"), "rechead.gate_shift": R(), "rechead.layers": R(1),
    "rechead.heads": R(1),  # and it divides the encoder dimension: checked when the encoder is loaded
    "rechead.dropout": R(0, 1, open="high"), "rechead.ffn_layers": R(0), "rechead.max_seq_length": R(0),
    "rechead.history_chars": R(0), "rechead.history_items": R(0), "rechead.item_ids": ANY, "rechead.sparse": ANY,
    "rechead.lr": POSITIVE, "rechead.batch_size": R(1), "rechead.negatives": R(1), "rechead.epochs": R(1),
    "rechead.patience": R(1), "rechead.encode_batch": R(1),
    "decode.max_new_tokens": R(1), "decode.temperature": R(0, open="low", none=True),
    "decode.top_p": R(0, 1, open="low", none=True), "decode.top_k": R(0, none=True), "decode.greedy": ANY,
    "decode.backend": ONE("auto", "hf", "fast"), "decode.cuda_graph": ANY, "decode.kv_bucket": R(1),
    "decode.sync_every": R(1), "decode.prefill_rows": R(1),
    "decode.dtype": ONE("auto", "float32", "bfloat16", "float16"), "decode.kernels": ONE("auto", "triton", "torch"),
    "grpo.group_size": R(2), "grpo.prompts_per_step": R(1), "grpo.temperature": POSITIVE, "grpo.max_new_tokens": R(1),
    "grpo.eps": R(0, 1, open="both"), "grpo.old_logp": ONE("policy", "rollout"), "grpo.iterations": R(1),
    "grpo.beta": R(0), "grpo.rho": RATE, "grpo.lr": POSITIVE, "grpo.max_grad_norm": POSITIVE,
    "grpo.weight_decay": R(0), "grpo.epochs": R(1), "grpo.steps": R(0), "grpo.eval_every": R(1),
    "grpo.eval_samples": R(1), "grpo.patience": R(1), "grpo.max_skips": R(1), "grpo.micro_batch": R(1),
    "grpo.logit_chunk": R(1), "grpo.grad_checkpointing": ANY, "grpo.head_fp32": ANY, "grpo.adv_eps": POSITIVE,
    "grpo.save_every": R(0), "grpo.sample_every": R(0),
    **{f"rewards.w_{t}": R(0) for t in ("fmt", "clean", "ndcg", "sim", "comp", "ent")},
    "rewards.kappa": POSITIVE, "rewards.delta": R(-1, 1), "rewards.negatives": R(1), "rewards.seed": SEED,
    "rewards.rho": RATE, "rewards.summary_max_new_tokens": R(1),
    "rewards.drop": flags_lib.Own("comma-separated reward terms"),
    "eval.ks": flags_lib.Own("cut-offs >= 1, 10 among them"), "eval.chunk": R(1), "eval.mask_history": ANY}


def parse(cfg, presets, argv, doc):
    """Defaults (cfg) < presets[dataset] < flags, then the derived fields and every check (resolve)."""
    if "--help" in argv or "-h" in argv:
        print(doc + "\nFlags (--section.field VALUE; run fields also bare; a bare boolean flag means true):")
        print(flags_lib.help_text(cfg))
        raise SystemExit(0)
    flags = flags_lib.parse_flags(cfg, argv)
    dataset = flags.get("run.dataset", cfg.run.dataset)
    if dataset not in presets:
        raise SystemExit(f"error: unknown dataset {dataset!r} (--dataset); choose one of {sorted(presets)}")
    flags_lib.apply(cfg, {**presets[dataset], **flags})
    return resolve(cfg, flags)


def resolve(cfg, flags):
    """Derived fields, from this one place, and every check that can fail before any work or write.
    A flag that contradicts another is an error, never silently overwritten."""
    r, g = cfg.run, cfg.grpo
    for key, derived in (("data.dataset", r.dataset), ("rechead.use_cot", r.ablate != "cot")):
        if key in flags and flags[key] != derived:
            fail(f"--{key} {flags[key]} contradicts --dataset {r.dataset} --ablate {r.ablate!r}; drop --{key}")
    cfg.data.dataset, cfg.rechead.use_cot = r.dataset, r.ablate != "cot"
    if DISTRIBUTED and cfg.rechead.sparse:  # DistributedDataParallel averages dense gradients only
        if "rechead.sparse" in flags:
            fail("--rechead.sparse true does not work under torchrun (DDP); drop it")
        cfg.rechead.sparse = False
    if errors := flags_lib.range_errors(cfg, RANGES, bare="run"):
        fail(errors[0])
    if 10 not in cfg.eval.ks or min(cfg.eval.ks) < 1:
        fail(f"--eval.ks {cfg.eval.ks} must be cut-offs >= 1, 10 among them: model selection uses valid NDCG@10")
    for key, value in (("rechead.batch_size", cfg.rechead.batch_size), ("grpo.prompts_per_step", g.prompts_per_step)):
        if value % WORLD:
            fail(f"--{key} {value} does not divide by {WORLD} processes")
    try:
        cfg.rewards.dropped()
    except ValueError as e:
        fail(f"--rewards.drop: {e}")
    try:
        data.check_config(cfg.data)
    except ValueError as e:
        fail(str(e))
    if r.model.startswith("random:") and r.model[len("random:"):] not in toy.STANDINS:
        fail(f"--model {r.model}: no such stand-in; use random:NAME with NAME one of {', '.join(toy.STANDINS)}")
    if r.model == "none" and r.ablate != "cot":
        fail("--model none has no reasoning to read; add --ablate cot (the history-only Rechead)")
    stage2 = r.stage != "1" and r.ablate not in ("I", "II")
    if r.stage == "2" and r.ablate in ("I", "II", "cot"):
        fail(f"--ablate {r.ablate} does not apply to --stage 2: -I and -II have no Stage II, and -cot is the "
             "Stage I run's choice (run Stage I with it and pass that folder to --init)")
    if stage2 and r.model == "none":
        fail("Stage II trains the backbone; pass --model (not none), or run --stage 1")
    if r.resume and not stage2:
        fail("--resume continues Stage II; this run has none (see --stage and --ablate)")
    r.out = r.out or f"runs/{r.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    for flag, path in (("--out", r.out), ("--data.data_dir", cfg.data.data_dir)):
        where = next(p for p in _ancestors(path) if os.path.exists(p))  # the folder that will hold it
        if not os.path.isdir(where):
            fail(f"{flag} {path}: {where} is a file, not a folder; pass a folder (it is created when missing)")
        if not os.access(where, os.W_OK | os.X_OK):
            fail(f"{flag} {path}: {where} is not writable; pass a folder you can write to")
    if r.stage == "2":
        if not r.init:
            fail("--stage 2 needs --init RUN_FOLDER, the Stage I run whose rechead.pt it uses")
        init = finished(load_rechead_file(r.init), r.init, "--init")["config"]
        other = flags_lib.config_diff({"data": init.get("data", {})}, {"data": dataclasses.asdict(cfg.data)}, PLACES)
        if other:
            fail(f"--init {r.init} is a Stage I run on other data ({'; '.join(other[:4])}); pass --init a Stage I "
                 "run on this run's data")
        saved = init["rechead"]
        clash = [f"--{k} {v!r} (the Rechead has {saved.get(k[8:])!r})" for k, v in flags.items()
                 if k.startswith("rechead.") and saved.get(k[8:]) != v]
        if clash:
            fail(f"--rechead.* flags do not apply to --stage 2: the Rechead and its config come from --init: "
                 f"{', '.join(clash)}")
        cfg.rechead = rechead.RecheadConfig(**saved)
    if r.resume and r.stage == "both":  # Stage I is not run again: it must have finished in this folder
        stage1 = os.path.join(r.out, "rechead.pt")
        if not os.path.exists(stage1):
            fail(f"--resume but no checkpoint in {r.out}/ckpt and no finished Stage I there; drop --resume to start "
                 "afresh")
        finished(load_rechead_file(r.out), r.out, "--resume")
    elif r.resume and checkpoint.whole_copy(os.path.join(r.out, "ckpt"), checkpoint.CKPT_MARKER) is None:
        fail(f"--resume but no checkpoint in {r.out}/ckpt; drop --resume to start afresh")
    ok = RERUN_OK | PLACES  # a folder that holds only Stage I takes any Stage II settings
    ok |= {f"{s}.{f.name}" for s in ("grpo", "rewards") for f in dataclasses.fields(getattr(cfg, s))}
    common.refuse_other_config(r.out, dataclasses.asdict(cfg), RERUN_OK | PLACES, ok)
    return cfg


def check_data(cfg, ds):
    """The checks that need the data: run right after it loads, before any model loads."""
    if ds.n_items < 2:
        fail(f"{ds.name} has {ds.n_items} item(s); ranking needs at least 2")
    stage2 = cfg.run.stage != "1" and cfg.run.ablate not in ("I", "II")
    if stage2 and cfg.rewards.negatives > ds.n_items - 1:
        fail(f"--rewards.negatives {cfg.rewards.negatives} asks for that many distinct items besides the target, but "
             f"{ds.name} has {ds.n_items} items: use at most {ds.n_items - 1}")


def _ancestors(path):
    """path, its parent, ..., up to the root."""
    path = os.path.abspath(path)
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def finished(saved, folder, flag):
    """saved (a rechead.pt's contents), if its Stage I finished; else the error and how to finish it."""
    if not saved.get("finished"):
        fail(f"{flag} {folder}: its Stage I did not finish (rechead.pt, from epoch {saved.get('epoch')}, is not "
             "marked finished: the run stopped before its end, or older code wrote it). Finish it with "
             f"`python rporec.py --stage 1 --out {folder}` and that run's other flags (its reasoning cache makes the "
             "rerun quick), then rerun this command")
    return saved


def restore_rechead(head, folder, out=None):
    """The finished Stage I's Rechead from <folder>/rechead.pt into head, and a copy into the run folder out, if
    given (which then holds the Rechead it ran with)."""
    try:
        head.load_state_dict(load_rechead_file(folder)["state"])
    except RuntimeError as e:  # another item table or encoder: the tables' shapes differ
        why = next((line.strip() for line in str(e).splitlines() if "mismatch" in line), str(e).splitlines()[0])
        fail(f"{folder}/rechead.pt does not fit this run's Rechead ({why[:200]}): it was trained on other data or "
             "with another encoder; pass --init a Stage I run on the same data")
    if out and common.MAIN and not os.path.samefile(folder, out):
        src = os.path.join(folder, "rechead.pt")
        common.atomic_write(os.path.join(out, "rechead.pt"), lambda tmp: shutil.copyfile(src, tmp))


def start_run(cfg, default):
    """On the main process, before any other write: take <out>'s run lock (a second run stops there, naming this
    one), write config.json, and print the fields set apart from `default`, a run's config in a few lines."""
    out = cfg.run.out
    common.lock_run(out)
    common.save_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg))
    print(f"config: {out}/config.json; set apart from the defaults:")
    print(textwrap.fill(" ".join(flags_lib.changed(cfg, default)), 110, initial_indent="  ", subsequent_indent="  "))


def load_rechead_file(folder):
    path = os.path.join(folder, "rechead.pt")
    saved = common.load_torch(path, "Rechead checkpoint (rechead.pt of a Stage I run)",
                              f"Pass --init a Stage I run folder, or rerun Stage I into {folder}.")
    if not isinstance(saved, dict) or not {"state", "config"} <= set(saved):
        fail(f"{path} lacks the Rechead state or its config; rerun Stage I into {folder}")
    return saved
