#!/usr/bin/env bash
# The whole product on a fresh clone: venv -> synthetic COCO dataset -> shards -> 2-process training -> mIoU.
#   launch/demo.sh                       # ~10 minutes on a 2-core CPU machine, first run included
#   launch/demo.sh train.max_steps=50    # extra arguments are config overrides for the training run
# Knobs (environment): DEMO_DATA (default data/demo), DEMO_RUN (runs/demo), DEMO_IMAGES (300),
# DEMO_VAL_IMAGES (60), DEMO_SIZE (224), DEMO_NPROC (GPU count, or 2 on CPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
DATA="${DEMO_DATA:-$REPO/data/demo}"
RUN="${DEMO_RUN:-$REPO/runs/demo}"
IMAGES="${DEMO_IMAGES:-300}"; VAL_IMAGES="${DEMO_VAL_IMAGES:-60}"; SIZE="${DEMO_SIZE:-224}"
NPROC="${DEMO_NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
SYNTH="$DATA/synth-$IMAGES-$VAL_IMAGES-$SIZE"

if [ ! -f "$SYNTH/val.json" ]; then
    echo "[demo] 1/3 writing a synthetic COCO dataset to $SYNTH"
    dist-seg synth --out "$SYNTH" --images "$IMAGES" --val-images "$VAL_IMAGES" --size "$SIZE" --seed 0
else
    echo "[demo] 1/3 reusing the synthetic dataset in $SYNTH"
fi
for split in train val; do
    if [ ! -f "$SYNTH/shards/$split/manifest.json" ]; then
        echo "[demo] 2/3 converting $split to shards"
        dist-seg convert --coco "$SYNTH/$split.json" --images "$SYNTH/images" --out "$SYNTH/shards/$split" \
            --min-shards 4 --workers 2 --quiet
    else
        echo "[demo] 2/3 reusing shards in $SYNTH/shards/$split"
    fi
done

echo "[demo] 3/3 training on $NPROC processes (torchrun); run directory $RUN"
rm -rf "$RUN"  # a fresh run each time; the data above is reused
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
torchrun --standalone --nproc_per_node="$NPROC" -m dist_seg.train --config configs/demo.yaml \
    data.train_shards="$SYNTH/shards/train" data.val_shards="$SYNTH/shards/val" train.out_dir="$RUN" "$@"
echo
echo "[demo] done. Watch the run with:  tensorboard --logdir $RUN"
