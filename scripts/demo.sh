#!/usr/bin/env bash
# The demo: trains all three CMD stages on the built-in synthetic dataset with the tiny configs (CPU is
# enough), then samples videos of every class and measures them: autoencoder health (motion-swap gap, PSNR
# against the static baseline) and the built-in classifier metric (evals/synthetic_quality.py) on generated and
# motion-only videos. About 7 minutes on 2 CPU cores. Output: $OUT (demo_output/).
#
#   bash scripts/demo.sh --text   # text-to-video: both diffusion models conditioned on the dataset's captions
#                                 # ("a red disc moving left") through a tiny random CLIP text encoder; videos are
#                                 # sampled for prompts and judged by the class their prompt names. Output:
#                                 # demo_text_output/. AE_CKPT=... reuses an autoencoder (e.g. the class demo's).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh
TEXT=0
if [ "${1:-}" = "--text" ]; then TEXT=1; elif [ -n "${1:-}" ]; then echo "usage: $0 [--text]" >&2; exit 2; fi
CONFIGS=configs/tiny
if [ "$TEXT" = 1 ]; then CONFIGS=configs/tiny_text; OUT=${OUT:-demo_text_output}; fi
OUT=${OUT:-demo_output}
AE_STEPS=${AE_STEPS:-650}
MOTION_STEPS=${MOTION_STEPS:-3000}
CONTENT_STEPS=${CONTENT_STEPS:-2800}
# One thread per process: these tiny models gain little from a second thread, and two processes that each
# spin two OpenMP threads on two cores slow each other down many times over.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -e "$OUT" ]; then
  echo "removing the previous demo output in $OUT"
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
stage() { echo; printf "=== %s  [%d:%02d]\n" "$1" $((SECONDS / 60)) $((SECONDS % 60)); }

NUM_VIDEOS=${NUM_VIDEOS:-64}
stage "1/4 autoencoder (${AE_CKPT:-$AE_STEPS steps}; the quality classifier trains beside it)"
# The classifier that judges the samples is trained once and cached ($CMD_CACHE_DIR or ~/.cache/cmd).
"$PYTHON" -m evals.synthetic_quality --prepare --resolution 32 32 --frames 8 --num-classes 4 > "$OUT/classifier.log" 2>&1 &
classifier_pid=$!
if [ -n "${AE_CKPT:-}" ]; then
  AE=$AE_CKPT
else
  OMP_NUM_THREADS=${AE_THREADS:-2} "$PYTHON" train_ae.py --config configs/tiny/autoencoder.yaml --results-dir "$OUT/runs" \
    --exp-name autoencoder --max-steps "$AE_STEPS"
  AE=$OUT/runs/autoencoder/checkpoints/last.pt
fi
TEXT_FLAGS=()
if [ "$TEXT" = 1 ]; then
  "$PYTHON" scripts/make_tiny_sd.py "$OUT/tiny_sd" > /dev/null  # its random CLIP text encoder and tokenizer
  TEXT_FLAGS=(--text-encoder "$OUT/tiny_sd")
fi

# The two diffusion stages only need the autoencoder: they train side by side, one core each. The class demo's
# motion-only samples (real content frames, generated motion) need no content model: they follow the motion
# model on its core while the content model finishes.
MODELS=(--ae-ckpt "$AE" --motion-ckpt "$OUT/runs/motion/checkpoints/last.pt")
stage "2/4 motion and content diffusion ($MOTION_STEPS / $CONTENT_STEPS steps, in parallel; motion log: $OUT/motion.log)"
(
  "$PYTHON" train_motion_diffusion.py --config "$CONFIGS/motion.yaml" --results-dir "$OUT/runs" --exp-name motion \
    --ae-ckpt "$AE" --max-steps "$MOTION_STEPS" "${TEXT_FLAGS[@]}"
  if [ "$TEXT" = 0 ]; then
    "$PYTHON" sample.py "${MODELS[@]}" --real-content \
      --num-videos "$NUM_VIDEOS" --out-dir "$OUT/motion_only" --npz "$OUT/motion_only/samples.npz" --quiet
  fi
) > "$OUT/motion.log" 2>&1 &
motion_pid=$!
"$PYTHON" train_content_diffusion.py --config "$CONFIGS/content.yaml" --results-dir "$OUT/runs" --exp-name content \
  --ae-ckpt "$AE" --max-steps "$CONTENT_STEPS" "${TEXT_FLAGS[@]}"
if ! wait "$motion_pid"; then
  echo "motion training or its motion-only sampling failed; the log's end:"; tail -n 20 "$OUT/motion.log"; exit 1
fi
grep -E "step [0-9]+ \|" "$OUT/motion.log" | tail -n 1 | sed 's/^/motion: /'

if [ "$TEXT" = 1 ]; then
  stage "3/4 sampling $NUM_VIDEOS videos for the prompts in $OUT/prompts.txt"
  # One prompt per class, with no colour: "a square moving right", ...
  "$PYTHON" -c "from datasets.synthetic import caption_for_label; print(*map(caption_for_label, range(4)), sep='\n')" \
    > "$OUT/prompts.txt"
  "$PYTHON" sample.py "${MODELS[@]}" --content-ckpt "$OUT/runs/content/checkpoints/last.pt" --prompts "$OUT/prompts.txt" \
    --num-videos "$NUM_VIDEOS" --out-dir "$OUT/samples" --npz "$OUT/samples/samples.npz" --quiet
  NPZS=(--npz "$OUT/samples/samples.npz")
else
  stage "3/4 sampling $NUM_VIDEOS videos ($NUM_VIDEOS motion-only videos were sampled after the motion model)"
  grep "^wrote" "$OUT/motion.log" || true
  # Both cores are free again: two threads.
  OMP_NUM_THREADS=2 "$PYTHON" sample.py "${MODELS[@]}" --content-ckpt "$OUT/runs/content/checkpoints/last.pt" \
    --num-videos "$NUM_VIDEOS" --out-dir "$OUT/samples" --npz "$OUT/samples/samples.npz" --quiet
  NPZS=(--npz "$OUT/samples/samples.npz" --npz "$OUT/motion_only/samples.npz")
fi

stage "4/4 what the models learned"
if ! wait "$classifier_pid"; then
  echo "training the quality classifier failed; its log:"; tail -n 20 "$OUT/classifier.log"; exit 1
fi
grep -h "summary (EMA" "$(dirname "$(dirname "$AE")")/log.txt" | sed 's/^\[[^]]*\] /autoencoder /' || true
OMP_NUM_THREADS=2 "$PYTHON" -m evals.synthetic_quality "${NPZS[@]}" --json "$OUT/quality.json" 2> "$OUT/quality.log" | sed "s|$OUT/||"

echo
printf "Done in %d:%02d. Open these:\n" $((SECONDS / 60)) $((SECONDS % 60))
echo "  generated videos:      $OUT/samples/videos/*.mp4"
echo "  grid of all samples:   $OUT/samples/grid.mp4  (first frame: $OUT/samples/grid.png)"
if [ "$TEXT" = 1 ]; then echo "  videos with prompts:   $OUT/samples/grid_captions.png"; fi
echo "  AE reconstructions:    $OUT/runs/autoencoder/eval/ (left original, right reconstruction)"
echo "  motion on real frames: $OUT/runs/motion/samples/   content frames: $OUT/runs/content/samples/"
echo "  training curves:       tensorboard --logdir $OUT/runs"
