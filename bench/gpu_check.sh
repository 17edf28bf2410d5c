#!/usr/bin/env bash
# The prepared GPU check: one call, under 8 minutes on one H100 or H200.
#
#   bash bench/gpu_check.sh [--cpu] [--out DIR]
#
# 1. smoke: a group of one under torchrun (NCCL on a GPU, gloo with --cpu); clip-nano on the digits
#    shards in bf16 under ZeRO 1, 2 and 3: train 4 steps, checkpoint, resume to 8 in a new process,
#    the loss falls and the resume picks up the step-4 checkpoint;
# 2. training throughput, vlp's step beside open_clip_train's train_one_epoch in the same process
#    (bench/train_throughput.py): ViT-B/16 at 224 px, bf16, batch 256, with model-FLOPs utilisation;
#    on a GPU the optimizer is torch's fused AdamW;
# 3. the data loader's images/s per worker on 224-px crops of web-sized JPEGs
#    (bench/data_pipeline.py; vlp alone where no package index is reachable for open_clip's venv).
#
# --cpu runs the same steps with sizes a CPU finishes in a few minutes (clip-nano, small batches);
# tests/test_gpu_check.py runs it so. The installed environment is used as it is (scripts/install.sh);
# nothing is downloaded. Results: OUT/summary.txt (default OUT: runs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
CPU=0
OUT=runs/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--cpu] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if [ "$CPU" = 0 ]; then
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu')"
  say "device: $(python3 -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)')"
else
  say "device: cpu (--cpu)"
fi

# 1. smoke
python3 -m vlp.data.build digits "$OUT/shards" --shard-size 200 --no-progress > /dev/null
for stage in 1 2 3; do
  run="$OUT/smoke_zero$stage"
  rm -rf "$run"
  common=(--config tests/configs/digits_nano.yaml "run_dir=$run" "data.train_shards=$OUT/shards/train.json"
          train.steps=8 train.checkpoint_every_n_steps=4 train.precision=bf16 "train.zero_stage=$stage"
          train.log_every_n_steps=1 "evals={}")
  launch=(python3 -m torch.distributed.run --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=$((29600 + stage)))
  "${launch[@]}" train.py "${common[@]}" train.stop_after_steps=4 > "$run.log" 2>&1 \
    || { tail -40 "$run.log"; say "smoke ZeRO-$stage: FAILED (train)"; exit 1; }
  "${launch[@]}" train.py "${common[@]}" --resume latest >> "$run.log" 2>&1 \
    || { tail -40 "$run.log"; say "smoke ZeRO-$stage: FAILED (resume)"; exit 1; }
  python3 - "$run" "$stage" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
run, stage = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
log = Path(str(run) + ".log").read_text()
assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in log, "the resume did not use step 4"
assert sorted(loss) == list(range(1, 9)), f"steps logged: {sorted(loss)}"
assert (run / "model.safetensors").is_file()
first, last = loss[1], (loss[7] + loss[8]) / 2
assert last < first, f"loss did not fall: step 1 {first:.3f}, steps 7-8 {last:.3f}"
print(f"smoke ZeRO-{stage} bf16: ok (loss {first:.3f} -> {last:.3f}, resumed at step 4)")
EOF
done

# 2. training throughput beside open_clip
if [ "$CPU" = 0 ]; then
  tp=(--preset ViT-B-16 --batch 256 --precision bf16 --steps 5 --rounds 3)
else
  tp=(--preset clip-nano --batch 16 --precision fp32 --steps 2 --rounds 1 --threads 1 --configs vlp open_clip)
fi
python3 bench/train_throughput.py "${tp[@]}" --json "$OUT/train_throughput.json" > "$OUT/train_throughput.log" 2>&1 \
  || { tail -40 "$OUT/train_throughput.log"; say "train throughput: FAILED"; exit 1; }
say "train throughput ($(echo "${tp[@]}")):"
grep -E "samples/s|ratio" "$OUT/train_throughput.log" | tee -a "$SUMMARY"

# 3. data loader per worker
peer=()
python3 -m pip download --help > /dev/null 2>&1 && python3 -c "import urllib.request as u; u.urlopen('https://pypi.org/simple/webdataset/', timeout=5)" 2>/dev/null \
  || peer=(--no-peer)
if [ "$CPU" = 0 ]; then dp=(--samples 800 --repeats 2); else dp=(--samples 200 --repeats 1); fi
python3 bench/data_pipeline.py "${dp[@]}" "${peer[@]}" --out "$OUT/data_pipeline" > "$OUT/data_pipeline.log" 2>&1 \
  || { tail -40 "$OUT/data_pipeline.log"; say "data pipeline: FAILED"; exit 1; }
say "data loader:"
grep -E "samples/s|ratio|JPEGs" "$OUT/data_pipeline.log" | tee -a "$SUMMARY"
say "gpu_check: all passed"
