"""torchrun with 2 gloo processes on the CPU gives what 1 process gives on the same global batch, and a
2-process Stage II resumed from its checkpoint equals the run that was never stopped."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def run(n, tmp_path):
    out = tmp_path / f"world{n}.pt"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(HERE, "dist_worker.py"), str(out), str(tmp_path / f"data{n}")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_processes_match_one(tmp_path):
    one, two = run(1, tmp_path), run(2, tmp_path)
    for part in ("rechead", "grpo"):
        assert one[part].keys() == two[part].keys()
        for k in one[part]:
            torch.testing.assert_close(one[part][k], two[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}: {k}")
    assert one["eval"] == two["eval"]  # the uneven 7-sample split: gathered exactly, nothing twice
    assert one["eval"]["n"] == 7
    assert one["reasoning"] == two["reasoning"] and len(one["reasoning"]) == 9  # shards merged, none lost


def test_nccl_without_gpus_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        return
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    res = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "rporec.py"), "--dist_backend", "nccl",
                          "--out", str(tmp_path / "r")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "nccl needs CUDA GPUs" in res.stderr


def torchrun(n, flags):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(os.path.dirname(HERE), "rporec.py"), "--dist_backend", "gloo", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_resume_equals_straight_run(tmp_path):
    from test_rporec import small
    from transformers import AutoModelForCausalLM
    steps = lambda n: ["--grpo.steps", str(n), "--grpo.save_every", "2", "--grpo.beta", "0.01"]
    res = torchrun(2, small(tmp_path / "a", *steps(4)))
    assert res.returncode == 0, res.stderr[-3000:]
    cut = tmp_path / "b"
    res = torchrun(2, small(cut, *steps(2)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(f.name for f in (cut / "run" / "ckpt").glob("rng*.pt")) == ["rng0.pt", "rng1.pt"]
    resume = small(cut, *steps(4), "--stage", "2", "--init", str(cut / "run"), "--resume")
    import rporec
    with pytest.raises(SystemExit, match="written by 2 processes"):  # a checkpoint of 2 processes: not in 1
        rporec.main(resume)
    res = torchrun(2, resume)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (AutoModelForCausalLM.from_pretrained(p / "run" / "ckpt").state_dict() for p in (tmp_path / "a", cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [json.loads(line)["step"] for line in open(cut / "run" / "log.jsonl") if '"reward"' in line]
    assert steps_logged == [1, 2, 3, 4]
