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


def batch_seed(seed, split, first):
    """The sampling seed of one generation batch: a rerun draws the same CoTs."""
    return int(hashlib.sha1(f"{seed}|{split}|{first}".encode()).hexdigest()[:8], 16)


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

