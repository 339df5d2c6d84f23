"""Seeded choices: a rerun, a resumed run and every rank draw the same batches, subsets and CoTs."""
import functools
import hashlib
import random

import numpy as np
import torch


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def row_seed(seed, split, key):
    """The sampling seed of one generated row (decode.generate's row_seeds), in [0, 2**63): a function of the run's
    seed, the split (or "recommend") and the sample's own identity (its index, or the history it is asked about),
    so a rerun, a resume or another batch size draws the same CoT for it."""
    return int(hashlib.sha1(f"{seed}|{split}|{key}".encode()).hexdigest()[:16], 16) >> 1


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

