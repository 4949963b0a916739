#!/usr/bin/env bash
# The demo: trains all three CMD stages on the built-in synthetic dataset with the tiny configs (CPU is
# enough), then samples videos of every class and measures them: autoencoder health (motion-swap gap, PSNR
# against the static baseline) and the built-in classifier metric (evals/synthetic_quality.py) on generated and
# motion-only videos. About 11 minutes on 2 CPU cores. Output: $OUT (demo_output/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh
OUT=${OUT:-demo_output}
AE_STEPS=${AE_STEPS:-800}
MOTION_STEPS=${MOTION_STEPS:-3000}
CONTENT_STEPS=${CONTENT_STEPS:-1500}
# One thread per process: these tiny models gain little from a second thread, and two processes that each
# spin two OpenMP threads on two cores slow each other down many times over.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -e "$OUT" ]; then
  echo "removing the previous demo output in $OUT"
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
stage() { echo; echo "=== $1"; }

NUM_VIDEOS=${NUM_VIDEOS:-64}
stage "1/4 autoencoder ($AE_STEPS steps; the quality classifier trains beside it)"
# The classifier that judges the samples is trained once and cached ($CMD_CACHE_DIR or ~/.cache/cmd).
"$PYTHON" -m evals.synthetic_quality --prepare --resolution 32 32 --frames 8 --num-classes 4 > "$OUT/classifier.log" 2>&1 &
classifier_pid=$!
OMP_NUM_THREADS=${AE_THREADS:-2} "$PYTHON" train_ae.py --config configs/tiny/autoencoder.yaml --results-dir "$OUT/runs" --exp-name autoencoder \
  --max-steps "$AE_STEPS"
AE=$OUT/runs/autoencoder/checkpoints/last.pt

# The two diffusion stages only need the autoencoder: they train side by side, one core each.
stage "2/4 motion and content diffusion ($MOTION_STEPS / $CONTENT_STEPS steps, in parallel; motion log: $OUT/motion.log)"
"$PYTHON" train_motion_diffusion.py --config configs/tiny/motion.yaml --results-dir "$OUT/runs" --exp-name motion \
  --ae-ckpt "$AE" --max-steps "$MOTION_STEPS" > "$OUT/motion.log" 2>&1 &
motion_pid=$!
"$PYTHON" train_content_diffusion.py --config configs/tiny/content.yaml --results-dir "$OUT/runs" --exp-name content \
  --ae-ckpt "$AE" --max-steps "$CONTENT_STEPS"
if ! wait "$motion_pid"; then
  echo "motion training failed; its log:"; tail -n 20 "$OUT/motion.log"; exit 1
fi
grep -E "step [0-9]+ \|" "$OUT/motion.log" | tail -n 1 | sed 's/^/motion: /'

stage "3/4 sampling $NUM_VIDEOS videos, and $NUM_VIDEOS motion-only videos (real content frames, generated motion)"
# The two sample sets are independent: one core each.
"$PYTHON" sample.py --ae-ckpt "$AE" --motion-ckpt "$OUT/runs/motion/checkpoints/last.pt" --real-content \
  --num-videos "$NUM_VIDEOS" --out-dir "$OUT/motion_only" --npz "$OUT/motion_only/samples.npz" --quiet &
motion_only_pid=$!
"$PYTHON" sample.py --ae-ckpt "$AE" --motion-ckpt "$OUT/runs/motion/checkpoints/last.pt" \
  --content-ckpt "$OUT/runs/content/checkpoints/last.pt" --num-videos "$NUM_VIDEOS" --out-dir "$OUT/samples" \
  --npz "$OUT/samples/samples.npz" --quiet
wait "$motion_only_pid"

stage "4/4 what the models learned"
if ! wait "$classifier_pid"; then
  echo "training the quality classifier failed; its log:"; tail -n 20 "$OUT/classifier.log"; exit 1
fi
grep -h "summary (EMA" "$OUT/runs/autoencoder/log.txt" | sed 's/^\[[^]]*\] /autoencoder /'
"$PYTHON" -m evals.synthetic_quality --npz "$OUT/samples/samples.npz" --npz "$OUT/motion_only/samples.npz" \
  --json "$OUT/quality.json" 2> "$OUT/quality.log" | sed "s|$OUT/||"

echo
echo "Done. Open these:"
echo "  generated videos:      $OUT/samples/videos/*.mp4"
echo "  grid of all samples:   $OUT/samples/grid.mp4  (first frame: $OUT/samples/grid.png)"
echo "  AE reconstructions:    $OUT/runs/autoencoder/eval/ (left original, right reconstruction)"
echo "  motion on real frames: $OUT/runs/motion/samples/   content frames: $OUT/runs/content/samples/"
echo "  training curves:       tensorboard --logdir $OUT/runs"
