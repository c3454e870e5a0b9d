#!/bin/sh
# edgetrain's entrypoint in every image (and on a host: the same script, tested there).
#   (no arguments)     fit the embedded digits data for $EDGETRAIN_DEVICE (full images), or
#                      fine-tune $EDGETRAIN_ARTIFACTS when the image has no torch (runtime image)
#   finetune-default   fine-tune $EDGETRAIN_ARTIFACTS on $EDGETRAIN_DATA into $EDGETRAIN_OUT, resuming
#   fleet-join         join the fleet at $EDGETRAIN_SUPERLINK (HOST:PORT) with $EDGETRAIN_DATA: on
#                      onnxruntime with $EDGETRAIN_ARTIFACTS when the image has no torch, else as a
#                      torch client planning for $EDGETRAIN_DEVICE; $EDGETRAIN_PARTITION=I/N takes
#                      part I of N of a shared set (tests, demos)
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

fleet_join() {
    if [ -z "${EDGETRAIN_SUPERLINK:-}" ]; then
        echo "edgetrain-entrypoint: set EDGETRAIN_SUPERLINK=HOST:PORT (where \`edgetrain fleet serve\` runs)" >&2
        exit 2
    fi
    mkdir -p "$OUT"
    set -- fleet join --superlink "$EDGETRAIN_SUPERLINK" --data "$DATA" --log "$OUT/fleet-node.log" \
        --max-wait "${EDGETRAIN_MAX_WAIT:-300}"
    if [ -n "${EDGETRAIN_PARTITION:-}" ]; then
        set -- "$@" --partition-id "${EDGETRAIN_PARTITION%/*}" --num-partitions "${EDGETRAIN_PARTITION#*/}"
    fi
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        exec $EDGETRAIN "$@" --device "$DEVICE"
    fi
    exec $EDGETRAIN "$@" --artifacts "$ARTIFACTS"
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
if [ "$1" = "fleet-join" ]; then
    fleet_join
fi
exec $EDGETRAIN "$@"
