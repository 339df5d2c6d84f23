#!/usr/bin/env bash
# The card rehearsal of rporec.py: both stages end to end at real size on MovieLens-100K, with the stand-in
# backbone random:Qwen3-0.6B (Qwen3-0.6B's architecture and vocabulary, random weights) and the static-minilm-256
# encoder, at the paper's settings (768 tokens, G = 4, 8 prompts per step) capped to a few minutes; then the
# projection of the full paper runs from its measured cost; then a short run under torchrun with nccl.
#
#   OUT=DIR bash tools/gpu_rehearsal.sh              on a card (about 5 minutes on an H200)
#   SCALE=cpu OUT=DIR bash tools/gpu_rehearsal.sh    the same path on a CPU with tiny caps (gloo for torchrun)
#
# DATA holds MovieLens-100K as interactions.tsv and items.tsv (default .carry/ml-100k) and ENC the encoder
# (default .carry/static-minilm-256): copy them from ../shared/data/ml-100k and shared/tools/offline_models.sh.
# Each part writes under $OUT as soon as it ends, so a timeout keeps the parts that finished.
set -u
OUT=${OUT:-rehearsal_out}
DATA=${DATA:-.carry/ml-100k}
ENC=${ENC:-.carry/static-minilm-256}
WORK=${WORK:-$(mktemp -d /tmp/rporec-rehearsal.XXXX)}  # scratch of its own: two rehearsals never collide
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/main" "$WORK/dist" "$WORK/data/reasoning"  # fresh runs that generate (the data cache stays)
export PYTHONUNBUFFERED=1
{ nvidia-smi; python -c "import torch, transformers, sentence_transformers as st
print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__,
      'cuda', torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
RUN="--dataset custom --data.interactions $DATA/interactions.tsv --data.items $DATA/items.tsv --data.category movie
     --data.data_dir $WORK/data --model random:Qwen3-0.6B --rechead.encoder $ENC --rewards.drop fmt"
if [ "${SCALE:-card}" = cpu ]; then
  CAP="--limit 4 --gen_batch 4 --decode.max_new_tokens 4 --grpo.max_new_tokens 4 --rechead.epochs 2
       --grpo.prompts_per_step 1 --grpo.group_size 2 --grpo.micro_batch 2 --rewards.summary_max_new_tokens 4"
  MAIN="$CAP --grpo.steps 2 --grpo.eval_every 1 --grpo.eval_samples 4"
  DIST="$CAP --grpo.steps 1 --grpo.eval_every 1 --grpo.eval_samples 4 --dist_backend gloo"
else
  # Stage I: 3 x 320 samples; Stage II: 20 steps, evaluated at steps 0, 10 and 20 on 128 valid samples
  MAIN="--limit 320 --grpo.steps 20 --grpo.eval_every 10 --grpo.eval_samples 128"
  # a short run through the same path: what it must show is that every collective works
  DIST="--limit 64 --grpo.steps 2 --grpo.eval_every 1 --grpo.eval_samples 64 --decode.max_new_tokens 256
        --grpo.max_new_tokens 256 --dist_backend nccl"
fi
# 1. both stages; then the cost and the projection of the paper runs
python rporec.py $RUN $MAIN --out "$WORK/main" > "$OUT/main.txt" 2>&1
echo "exit $?" >> "$OUT/main.txt"
cp "$WORK/main/metrics.json" "$OUT/main_metrics.json"
cp "$WORK/main/log.jsonl" "$OUT/main_log.jsonl"
python -m tools.bench --project "$WORK/main" > "$OUT/projection.txt" 2>&1
echo "exit $?" >> "$OUT/projection.txt"
# 2. the same path under torchrun: the process group, DDP of the Rechead and the collectives of Stage II
torchrun --nproc_per_node 1 rporec.py $RUN $DIST --out "$WORK/dist" > "$OUT/dist.txt" 2>&1
echo "exit $?" >> "$OUT/dist.txt"
cp "$WORK/dist/metrics.json" "$OUT/dist_metrics.json"
cp "$WORK/dist/log.jsonl" "$OUT/dist_log.jsonl"
