"""The run config's one story: flags over presets over defaults (flags.parse_flags), the derived fields, and
every check that can fail, before any work or any write: each field's allowed values (its setting()), each
section's own check(), and the checks across sections here. A flag that contradicts another is an error; the
Stage II Rechead config comes from its --init folder; a run folder refuses another config."""
import dataclasses
import os
import sys
import textwrap
import time

from plumbing import checkpoint, files, toy
from plumbing import flags as flags_lib  # `flags` names the parsed {key: value} below
from plumbing.errors import fail
from plumbing.processes import DISTRIBUTED, WORLD


def parse(cfg, presets, argv, doc, program="rporec"):
    """Defaults (cfg) < presets[dataset] < flags, then the derived fields and every check (resolve). The flag
    table that answers the next --help at once is written first, if it changed (flags.answer_early)."""
    header = "\nFlags (--section.field VALUE; run fields also bare; a bare boolean flag means true):"
    if flags_lib.load_table(program) is None:
        flags_lib.save_table(program, cfg, presets, sys.modules[type(cfg).__module__], header)
    if "--help" in argv or "-h" in argv:
        print(doc + header)
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
    if errors := flags_lib.problems(cfg, bare="run"):  # each field's allowed values, each section's check()
        fail(errors[0])
    if cfg.rechead.loss == "full" and "rechead.negatives" in flags:
        fail("--rechead.negatives sets eq. 6's sampled negatives, which --rechead.loss full does not use; drop one")
    for key, value in (("rechead.batch_size", cfg.rechead.batch_size), ("grpo.prompts_per_step", g.prompts_per_step)):
        if value % WORLD:
            fail(f"--{key} {value} does not divide by {WORLD} processes")
    if r.model.startswith("random:") and r.model[len("random:"):] not in toy.STANDINS:
        fail(f"--model {r.model}: no such stand-in; use random:NAME with NAME one of {', '.join(toy.STANDINS)}")
    if r.model == "none" and r.ablate != "cot":
        fail("--model none has no reasoning to read; add --ablate cot (the history-only Rechead)")
    stage2 = r.has_stage2()
    if r.stage == "2" and r.ablate in ("I", "II", "cot"):
        fail(f"--ablate {r.ablate} does not apply to --stage 2: -I and -II have no Stage II, and -cot is the "
             "Stage I run's choice (run Stage I with it and pass that folder to --init)")
    if stage2 and r.model == "none":
        fail("Stage II trains the backbone; pass --model (not none), or run --stage 1")
    if g.lr * g.weight_decay >= 1:
        fail(f"--grpo.weight_decay {g.weight_decay:g} with --grpo.lr {g.lr:g}: AdamW scales every weight by "
             "1 - lr * weight_decay each step, which must stay above 0; use lr * weight_decay < 1 (official: "
             "weight decay 0)")
    if r.init and r.stage != "2":
        fail(f"--init is read by --stage 2 alone (got --stage {r.stage}); drop --init, or add --stage 2")
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
        init = checkpoint.finished(checkpoint.load_rechead(r.init), r.init, "--init")["config"]
        other = flags_lib.config_diff({"data": init.get("data", {})}, {"data": dataclasses.asdict(cfg.data)},
                                     flags_lib.marked(cfg, "place"))
        if other:
            fail(f"--init {r.init} is a Stage I run on other data ({'; '.join(other[:4])}); pass --init a Stage I "
                 "run on this run's data")
        saved = init["rechead"]
        clash = [f"--{k} {v!r} (the Rechead has {saved.get(k[8:])!r})" for k, v in flags.items()
                 if k.startswith("rechead.") and saved.get(k[8:]) != v]
        if clash:
            fail(f"--rechead.* flags do not apply to --stage 2: the Rechead and its config come from --init: "
                 f"{', '.join(clash)}")
        cfg.rechead = type(cfg.rechead)(**saved)
    if r.resume and r.stage == "both":  # Stage I is not run again: it must have finished in this folder
        stage1 = os.path.join(r.out, "rechead.pt")
        if not os.path.exists(stage1):
            fail(f"--resume but no checkpoint in {r.out}/ckpt and no finished Stage I there; drop --resume to start "
                 "afresh")
        checkpoint.finished(checkpoint.load_rechead(r.out), r.out, "--resume")
    elif r.resume and checkpoint.whole_copy(os.path.join(r.out, "ckpt"), checkpoint.CKPT_MARKER) is None:
        fail(f"--resume but no checkpoint in {r.out}/ckpt; drop --resume to start afresh")
    same_run = flags_lib.marked(cfg, "rerun") | flags_lib.marked(cfg, "place")  # may differ in one run folder
    ok = same_run | {f"{s}.{f.name}" for s in ("grpo", "rewards") for f in dataclasses.fields(getattr(cfg, s))}
    refuse_other_config(r.out, cfg, same_run, ok)  # a Stage I folder takes any Stage II
    return cfg


def refuse_other_config(out, cfg, ok, ok_stage1=None):
    """A run folder never mixes results of two configs: stop if <out>/config.json differs from cfg outside
    the `ok` fields (outside `ok_stage1` when that run had no Stage II), naming the fields and the fix."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    old = files.load_json(path, "pass a new --out, or delete that folder")
    defaults = dataclasses.asdict(type(cfg)())  # a field the folder's config.json lacks came later: its
    old = {**old, **{sec: {**fields, **old.get(sec, {})} for sec, fields in defaults.items()}}  # default is
    # what that run did
    if ok_stage1 is not None:
        was = {k: old.get("run", {}).get(k) for k in ("stage", "ablate")}
        ok = ok if dataclasses.replace(cfg.run, **was).has_stage2() else ok_stage1
    diff = flags_lib.config_diff(old, dataclasses.asdict(cfg), ok)
    if diff:
        raise SystemExit(f"error: {out} holds a run with another config ({'; '.join(diff[:6])}). Pass a new --out, "
                         "or rerun with that folder's flags (add --resume to continue its Stage II)")


def check_data(cfg, ds):
    """The checks that need the data: run right after it loads, before any model loads."""
    size = " (--data.toy_users readers)" if cfg.data.dataset == "toy" else ""
    if ds.n_items < 2:
        fail(f"{ds.name} has {ds.n_items} item(s){size}; ranking needs at least 2: use more data")
    if cfg.run.has_stage2() and cfg.rewards.negatives > ds.n_items - 1:
        fail(f"{ds.name} has {ds.n_items} items{size}, and --rewards.negatives {cfg.rewards.negatives} asks "
             f"for that many distinct items besides the target: use more data, or at most "
             f"{ds.n_items - 1} negatives")


def _ancestors(path):
    """path, its parent, ..., up to the root."""
    path = os.path.abspath(path)
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def start_run(cfg, default):
    """On the main process, before any other write: take <out>'s run lock (a second run stops there, naming this
    one), write config.json, and print the fields set apart from `default`, a run's config in a few lines."""
    out = cfg.run.out
    files.lock_run(out)
    files.save_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg))
    print(f"config: {out}/config.json; set apart from the defaults:")
    print(textwrap.fill(" ".join(flags_lib.changed(cfg, default)), 110, initial_indent="  ", subsequent_indent="  "))