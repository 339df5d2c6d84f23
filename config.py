"""The run config's one story: flags over presets over defaults (flags.parse_flags), the derived fields, and
every check that can fail, before any work or any write. A flag that contradicts another is an error; the
Stage II Rechead config comes from its --init folder; a run folder refuses another config (common)."""
import dataclasses
import os
import time

import checkpoint
import common
import data
import flags as flags_lib  # `flags` names the parsed {key: value} below
import rechead
from common import WORLD, fail

# may differ between runs sharing a folder: how far Stage II goes, where Stage I came from, speed knobs
RERUN_OK = {"run.stage", "run.init", "run.resume", "run.gen_batch", "run.dist_backend", "grpo.steps", "grpo.epochs",
            "grpo.save_every", "grpo.sample_every", "grpo.micro_batch", "grpo.logit_chunk", "eval.chunk",
            "rechead.encode_batch", "decode.backend", "decode.cuda_graph", "decode.kv_bucket", "decode.sync_every",
            "decode.prefill_rows"}


LOWER_BOUNDS = {"run.gen_batch": 1, "grpo.group_size": 2, "grpo.prompts_per_step": 1, "grpo.micro_batch": 1,
                "grpo.iterations": 1, "grpo.eval_every": 1, "grpo.eval_samples": 1, "grpo.patience": 1,
                "grpo.epochs": 1, "grpo.steps": 0, "grpo.save_every": 0, "grpo.max_new_tokens": 1, "grpo.max_skips": 1,
                "rechead.batch_size": 1, "rechead.epochs": 1, "rechead.negatives": 1, "rechead.history_items": 0,
                "rewards.negatives": 1, "decode.max_new_tokens": 1, "eval.chunk": 1}


def parse(cfg, presets, argv, doc):
    """Defaults (cfg) < presets[dataset] < flags, then the derived fields and every check (resolve)."""
    if "--help" in argv or "-h" in argv:
        print(doc + "\nFlags (--section.field VALUE; run fields also bare; a bare boolean flag means true):")
        print(flags_lib.help_text(cfg))
        raise SystemExit(0)
    flags = flags_lib.parse_flags(cfg, argv)
    dataset = flags.get("run.dataset", cfg.run.dataset)
    if dataset not in presets:
        raise SystemExit(f"error: unknown dataset {dataset!r}; choose one of {sorted(presets)}")
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
    if WORLD > 1 and cfg.rechead.sparse:  # DistributedDataParallel averages dense gradients only
        if "rechead.sparse" in flags:
            fail("--rechead.sparse true does not work under torchrun (DDP); drop it")
        cfg.rechead.sparse = False
    for name, value, choices in (("stage", r.stage, ("1", "2", "both")), ("ablate", r.ablate, ("", "cot", "I", "II")),
                                 ("grpo.old_logp", g.old_logp, ("policy", "rollout"))):
        if value not in choices:
            fail(f"--{name} must be one of {choices}, got {value!r}")
    if 10 not in cfg.eval.ks:
        fail(f"--eval.ks {cfg.eval.ks} must include 10: model selection uses valid NDCG@10")
    for key, low in LOWER_BOUNDS.items():
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) < low:
            fail(f"--{key} must be >= {low}, got {getattr(getattr(cfg, sec), name)}")
    for name, value in (("grpo.rho", g.rho), ("rewards.rho", cfg.rewards.rho)):
        if not 0 < value <= 1:
            fail(f"--{name} must be in (0, 1], got {value}; 0.2 keeps the top 20%")
    for key, value in (("rechead.batch_size", cfg.rechead.batch_size), ("grpo.prompts_per_step", g.prompts_per_step)):
        if value % WORLD:
            fail(f"--{key} {value} does not divide by {WORLD} processes")
    if g.temperature <= 0 or g.lr <= 0 or g.beta < 0 or g.eps <= 0:
        fail("--grpo.temperature, --grpo.lr and --grpo.eps must be > 0 and --grpo.beta >= 0")
    try:
        cfg.rewards.dropped()
        data.check_config(cfg.data)
    except ValueError as e:
        fail(str(e))
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
        saved = load_rechead_file(r.init)["config"]["rechead"]
        clash = [f"--{k} {v!r} (the Rechead has {saved.get(k[8:])!r})" for k, v in flags.items()
                 if k.startswith("rechead.") and saved.get(k[8:]) != v]
        if clash:
            fail(f"--rechead.* flags do not apply to --stage 2: the Rechead and its config come from --init: "
                 f"{', '.join(clash)}")
        cfg.rechead = rechead.RecheadConfig(**saved)
    if r.resume and checkpoint.whole_copy(os.path.join(r.out, "ckpt"), checkpoint.CKPT_MARKER) is None:
        fail(f"--resume but no checkpoint in {r.out}/ckpt; drop --resume to start afresh")
    ok = set(RERUN_OK)  # a folder that holds only Stage I takes any Stage II settings
    ok |= {f"{s}.{f.name}" for s in ("grpo", "rewards") for f in dataclasses.fields(getattr(cfg, s))}
    common.refuse_other_config(r.out, dataclasses.asdict(cfg), RERUN_OK, ok)
    return cfg


def _ancestors(path):
    """path, its parent, ..., up to the root."""
    path = os.path.abspath(path)
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def load_rechead_file(folder):
    path = os.path.join(folder, "rechead.pt")
    saved = common.load_torch(path, "Rechead checkpoint (rechead.pt of a Stage I run)",
                              f"Pass --init a Stage I run folder, or rerun Stage I into {folder}.")
    if not isinstance(saved, dict) or not {"state", "config"} <= set(saved):
        fail(f"{path} lacks the Rechead state or its config; rerun Stage I into {folder}")
    return saved
