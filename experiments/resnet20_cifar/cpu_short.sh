#!/usr/bin/env bash
# run_all.sh at a CPU budget (2 cores, ~2 h): the same experiment files on the real CIFAR-10 with
# a short FP schedule (15 epochs instead of 200), a cheaper Hessian (traces only, <= 100
# samples), PTQ for every plan and 2-epoch QAT for the two 4-bit-activation headline rows.
# Numbers from it are real measurements of a weaker model, not the issue's targets (those need
# run_all.sh on a GPU); the table goes to RESULTS_cpu.md.
# Env: HAWQ_RUNS (default runs_cpu), HAWQ_DATA (CIFAR-10 folder); extra overrides as args.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HAWQ_RUNS=${HAWQ_RUNS:-runs_cpu}
RUNS=$HAWQ_RUNS
run() { python -m hawq.run paths.runs="$RUNS" data.download=false "$@"; }
HESS=(hessian.top_k=0 hessian.max_samples=100 hessian.batch_size=128 hessian.density=false)
QAT=(qat.epochs=2 qat.freeze_bn_epoch=1)

run experiment=resnet20_cifar train.epochs=15 stages='[train,evaluate]' "$@"
run experiment=resnet20_cifar "${HESS[@]}" stages='[hessian]' "$@"

run experiment=resnet20_cifar_w8a8 stages='[ptq,integer]' "$@"
run experiment=resnet20_cifar_w4a4 "${QAT[@]}" stages='[ptq,qat,integer]' "$@"

# mixed 4/8 at fractions of the BOPs range: Hessian (HAWQ-V3) against random sensitivities
for f in 0.25 0.5 0.75; do
  b=$(python -m hawq.report budget "$RUNS/resnet20_cifar/hessian.json" --kind bops --fraction "$f")
  for m in hawq_v3 random; do
    run experiment=resnet20_cifar_mixed alloc.method="$m" "alloc.bops=$b" stages='[alloc,ptq]' \
        name="resnet20_mixed_${m}_bops$f" "$@"
  done
done

run experiment=resnet20_cifar_hawq_a4 "${QAT[@]}" qat.schedule=null stages='[alloc,ptq,qat,integer]' "$@"

python -m hawq.report table experiments/resnet20_cifar/rows_cpu.yaml --runs "$RUNS"
