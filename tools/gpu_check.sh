#!/usr/bin/env bash
# The GPU check of the decoder and bench.py, for a lent card: `OUT=/some/dir bash tools/gpu_check.sh`. Each part writes
# its result under $OUT as soon as it ends, so a timeout still leaves the parts that finished.
# TRL is not in the GPU image: put its wheels in .whl/ first (pip download --no-deps trl==1.16.0
# datasets==5.2.0 dill multiprocess xxhash -d .whl, and the binary ones again with --only-binary=:all:
# --python-version 3.10 / 3.12 / 3.13; pip download --no-deps pandas python-dateutil pytz tzdata six -d .whl/extra,
# pandas for each Python too) and carry .whl; they are installed with --no-deps.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())" \
  > "$OUT/versions.txt" 2>&1
# only on the card: a CPU dry run leaves this machine's packages alone. pandas (which datasets imports) and its
# pure-Python deps come from .whl/extra only when the image lacks it, so an image's own pandas is never replaced
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && ls .whl/*.whl > /dev/null 2>&1; then
  # --find-links: pip picks the wheel that fits the image's Python among those carried (cp310-cp313)
  python -V > "$OUT/pip.txt" 2>&1
  python -m pip install -q --no-deps --no-index --find-links .whl trl datasets dill multiprocess xxhash \
    >> "$OUT/pip.txt" 2>&1
  python -c "import pandas" 2>/dev/null || python -m pip install -q --no-deps --no-index --find-links .whl/extra \
    pandas python-dateutil pytz tzdata six >> "$OUT/pip.txt" 2>&1
fi
python -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)" >> "$OUT/pip.txt" 2>&1
# 1. the decode tests and the graph-replay test, on CUDA
python -m pytest -q tests/test_decode.py tests/test_graph_replay.py > "$OUT/tests.txt" 2>&1
echo "exit $?" >> "$OUT/tests.txt"
# 2-5. ms/step at batch 1, 64, 128 against HF generate; the bf16 greedy prefix; one GRPO step as rporec runs it
# (G 8, 8 prompts, 512 tokens) with s/step, completions/s and peak memory; TRL's GRPOTrainer at the same setting
python -m tools.bench --out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "exit $?" >> "$OUT/bench.txt"
# 6. where a decode step's time goes (graph vs eager step time, kernel time and count per step, top kernels)
python -m tools.profile_decode --out "$OUT/profile.txt" > "$OUT/profile_stdout.txt" 2>&1
echo "exit $?" >> "$OUT/profile_stdout.txt"
