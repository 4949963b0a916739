#!/usr/bin/env bash
# The demo: trains all three CMD stages on the built-in synthetic dataset with the tiny configs (CPU is
# enough), then samples videos of every class. About 10 minutes on 2 CPU cores. Output: $OUT (demo_output/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh
OUT=${OUT:-demo_output}
AE_STEPS=${AE_STEPS:-600}
MOTION_STEPS=${MOTION_STEPS:-400}
CONTENT_STEPS=${CONTENT_STEPS:-400}
if [ -e "$OUT" ]; then
  echo "removing the previous demo output in $OUT"
  rm -rf "$OUT"
fi
run() { echo; echo "=== $1"; shift; "$PYTHON" "$@"; }

run "1/4 autoencoder ($AE_STEPS steps)" train_ae.py --config configs/tiny/autoencoder.yaml \
  --results-dir "$OUT/runs" --exp-name autoencoder --max-steps "$AE_STEPS"
AE=$OUT/runs/autoencoder/checkpoints/last.pt
# The two diffusion stages only need the autoencoder; on a multi-core machine they could run side by side.
run "2/4 motion diffusion ($MOTION_STEPS steps)" train_motion_diffusion.py --config configs/tiny/motion.yaml \
  --results-dir "$OUT/runs" --exp-name motion --ae-ckpt "$AE" --max-steps "$MOTION_STEPS"
run "3/4 content diffusion ($CONTENT_STEPS steps)" train_content_diffusion.py --config configs/tiny/content.yaml \
  --results-dir "$OUT/runs" --exp-name content --ae-ckpt "$AE" --max-steps "$CONTENT_STEPS"
run "4/4 sampling" sample.py --ae-ckpt "$AE" --motion-ckpt "$OUT/runs/motion/checkpoints/last.pt" \
  --content-ckpt "$OUT/runs/content/checkpoints/last.pt" --num-videos 16 --content-steps 50 --motion-steps 50 \
  --out-dir "$OUT/samples" --npz "$OUT/samples/samples.npz"

echo
echo "Done. Open these:"
echo "  generated videos:      $OUT/samples/videos/*.mp4"
echo "  grid of all samples:   $OUT/samples/grid.mp4  (first frame: $OUT/samples/grid.png)"
echo "  AE reconstructions:    $OUT/runs/autoencoder/eval/ (left original, right reconstruction)"
echo "  motion on real frames: $OUT/runs/motion/samples/   content frames: $OUT/runs/content/samples/"
echo "  training curves:       tensorboard --logdir $OUT/runs"
