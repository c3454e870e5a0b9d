#!/bin/sh
# edgetrain's entrypoint in every image (and on a host: the same script, tested there).
#   (no arguments)     fit the embedded digits data for $EDGETRAIN_DEVICE (full images), or
#                      fine-tune $EDGETRAIN_ARTIFACTS when the image has no torch (runtime image)
#   finetune-default   fine-tune $EDGETRAIN_ARTIFACTS on $EDGETRAIN_DATA into $EDGETRAIN_OUT, resuming
#   anything else      passed to `edgetrain` as is (`fit ...`, `finetune ...`, `plan ...`)
set -eu

EDGETRAIN="${EDGETRAIN_BIN:-edgetrain}"
PYTHON="${EDGETRAIN_PYTHON:-python3}"
DEVICE="${EDGETRAIN_DEVICE:-cpu}"
WORK="${EDGETRAIN_WORK:-/work}"
ARTIFACTS="${EDGETRAIN_ARTIFACTS:-$WORK/artifacts}"
DATA="${EDGETRAIN_DATA:-digits}"
OUT="${EDGETRAIN_OUT:-$WORK/out}"

finetune_default() {
    if [ ! -f "$ARTIFACTS/manifest.json" ]; then
        echo "edgetrain-entrypoint: no artifacts in $ARTIFACTS (mount them, or set EDGETRAIN_ARTIFACTS)" >&2
        exit 2
    fi
    if [ -f "$OUT/progress.json" ]; then
        exec $EDGETRAIN finetune "$ARTIFACTS" --data "$DATA" --out "$OUT" --epochs "${EDGETRAIN_EPOCHS:-3}" --resume
    fi
    exec $EDGETRAIN finetune "$ARTIFACTS" --data "$DATA" --out "$OUT" --epochs "${EDGETRAIN_EPOCHS:-3}"
}

if [ "$#" -eq 0 ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        if [ -f "$OUT/checkpoint.pt" ]; then
            exec $EDGETRAIN fit --resume "$OUT"
        fi
        exec $EDGETRAIN fit --device "$DEVICE" --epochs "${EDGETRAIN_EPOCHS:-8}" --out "$OUT"
    fi
    finetune_default
fi
if [ "$1" = "finetune-default" ]; then
    finetune_default
fi
exec $EDGETRAIN "$@"
