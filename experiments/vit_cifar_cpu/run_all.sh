#!/usr/bin/env bash
# Issue 12 on a 2-core CPU: every analysis of the seed study and ours on the CPU ViT's FP
# checkpoint (experiment=vit_cifar_cpu). Each step is its own named run directory under
# $HAWQ_RUNS and is skipped when it finished before (marker run_all.done), so a killed run_all.sh
# resumes where it stopped; inside a run, finished stages skip and QAT resumes from qat_state.pt.
# Env: HAWQ_DATA (CIFAR-10 folder, required), HAWQ_RUNS (default runs), FP (the FP checkpoint,
# default $HAWQ_RUNS/vit_cifar_cpu/model.pt), FP_SEEDS (extra FP seeds to train last, default
# "1 2"; empty to skip). Extra Hydra overrides as arguments go to every run.
# Times (README.md) are for 2 otherwise idle cores; the whole script is ~4 h plus ~2 h of seeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${HAWQ_DATA:?set HAWQ_DATA to the CIFAR-10 folder (cifar-10-batches-py or the npz shards)}"
export HAWQ_RUNS=${HAWQ_RUNS:-runs}
RUNS=$HAWQ_RUNS
FP=${FP:-$RUNS/vit_cifar_cpu/model.pt}
FP_SEEDS=${FP_SEEDS-1 2}

run() {  # run <name> <overrides...>: one run directory, skipped once finished
  local name=$1; shift
  if [ -f "$RUNS/$name/run_all.done" ]; then echo "run_all: $name finished before, skipped"; return; fi
  echo "run_all: $name ($(date -u +%H:%M) UTC)"
  python -m hawq.run name="$name" data.download=false "$@"
  touch "$RUNS/$name/run_all.done"
}
CK=("paths.checkpoint=$FP")

# 0. the FP model (trained by the lead's run: skipped when model.pt exists) and its test accuracy
run vit_cifar_cpu experiment=vit_cifar_cpu stages='[train,evaluate]' "$@"

# 1. curvature (cost to rank of the Hessian order: this stage's wall time), ~10 min
run vit_cifar_cpu_hessian experiment=vit_cifar_cpu_hessian "${CK[@]}" "$@"

# 2. the seed's protocol, bit-exact: all-INT4 PTQ; measured single-op ranking on 5,000 held-out
#    train images (38 + 1 evaluations, timed); INT4 curves in Hessian / measured / 5 random
#    orders; INT2 on the 6 least sensitive ops (both picks); all-INT2. ~60 min
run vit_cifar_cpu_seed_method experiment=vit_cifar_cpu_seed_method "${CK[@]}" \
    curve.hessian="$RUNS/vit_cifar_cpu_hessian/hessian.json" "$@"

# 3. ours: INT4 curve in the Hessian order with our PTQ, INT2 on the 6 least sensitive by
#    Hessian, all-INT2, ~15 min; all-INT4 PTQ + 3 epochs LSQ QAT, ~20 min
run vit_cifar_cpu_curve_ours experiment=vit_cifar_cpu_curve_ours "${CK[@]}" \
    curve.hessian="$RUNS/vit_cifar_cpu_hessian/hessian.json" "$@"
run vit_cifar_cpu_w4a4 experiment=vit_cifar_cpu_w4a4 "${CK[@]}" "$@"
#    the same QAT distilled from the FP model (KL to its logits), ~30 min
run vit_cifar_cpu_w4a4_kd experiment=vit_cifar_cpu_w4a4 qat.distill=1.0 "${CK[@]}" "$@"
#    the same QAT for 8 epochs, ~80 min
run vit_cifar_cpu_w4a4_kd8 experiment=vit_cifar_cpu_w4a4 qat.distill=1.0 qat.epochs=8 "${CK[@]}" "$@"
#    block reconstruction PTQ (AdaRound rounding + learned activation steps/biases, unit by unit
#    against the FP model on the 2,048 calibration images), ~15 min; then the distilled QAT from it
run vit_cifar_cpu_w4a4_rec experiment=vit_cifar_cpu_w4a4 stages='[ptq,integer]' quant.reconstruct.enabled=true \
    "${CK[@]}" "$@"
run vit_cifar_cpu_w4a4_rec_s1 experiment=vit_cifar_cpu_w4a4 stages='[ptq]' quant.reconstruct.enabled=true \
    quant.reconstruct.seed=1 "${CK[@]}" "$@"
run vit_cifar_cpu_w4a4_rec_kd experiment=vit_cifar_cpu_w4a4 stages='[qat]' qat.distill=1.0 \
    qat.init="$RUNS/vit_cifar_cpu_w4a4_rec/ptq_model.pt" "${CK[@]}" "$@"
#    reconstruction with 5,000 steps per unit (the FP-1.5 row), ~30 min alone; integer-only after it
run vit_cifar_cpu_w4a4_rec5k experiment=vit_cifar_cpu_w4a4 stages='[ptq,integer]' quant.reconstruct.enabled=true \
    quant.reconstruct.iters=5000 "${CK[@]}" "$@"
#    QAT as continued training: 10 epochs at lr 3e-4 (1 warm-up epoch, cosine), labels with
#    smoothing 0.1 + KL to the FP model at weight 0.5 (the >= FP row), ~60 min alone
run vit_cifar_cpu_w4a4_long experiment=vit_cifar_cpu_w4a4 qat.epochs=10 qat.lr=3e-4 qat.warmup_epochs=1 \
    qat.label_smoothing=0.1 qat.distill=0.5 qat.grad_clip=1.0 "${CK[@]}" "$@"
run vit_cifar_cpu_w4a4_long_s1 experiment=vit_cifar_cpu_w4a4 seed=1 qat.epochs=10 qat.lr=3e-4 \
    qat.warmup_epochs=1 qat.label_smoothing=0.1 qat.distill=0.5 qat.grad_clip=1.0 "${CK[@]}" "$@"
#    PTQ variants tried for the FP-1.5 target (~2 min each): LayerNorm -> Linear channel
#    equalization, other calibrators, and the diagnosis run (one activation at 8 bits)
run vit_cifar_cpu_w4a4_eq1.0 experiment=vit_cifar_cpu_w4a4 stages='[ptq]' quant.equalize=1.0 "${CK[@]}" "$@"
run vit_cifar_cpu_w4a4_eq0.5 experiment=vit_cifar_cpu_w4a4 stages='[ptq]' quant.equalize=0.5 "${CK[@]}" "$@"
for c in percentile entropy; do
  run "vit_cifar_cpu_w4a4_$c" experiment=vit_cifar_cpu_w4a4 stages='[ptq]' \
      quant.default.calibrator="$c" "${CK[@]}" "$@"
done
run vit_cifar_cpu_w4a4_diag_fc2a8 experiment=vit_cifar_cpu_w4a4 stages='[ptq]' \
    quant.plan=experiments/vit_cifar_cpu/w4a4_fc2_0_a8.yaml "${CK[@]}" "$@"

# 4. Hessian-ILP mixed 4/8 plans at 0.25 / 0.5 / 0.75 of the BOPs range, PTQ, ~2 min each
for f in 0.25 0.5 0.75; do
  b=$(python -m hawq.report budget "$RUNS/vit_cifar_cpu_hessian/hessian.json" --kind bops \
      --fraction "$f")
  run "vit_cifar_cpu_hawq_bops$f" experiment=vit_cifar_cpu_hawq "${CK[@]}" alloc.bops="$b" \
      alloc.hessian="$RUNS/vit_cifar_cpu_hessian/hessian.json" "$@"
done

# 5. all-INT2 by progressive QAT 8 -> 4 -> 3 -> 2 (re-fit at every drop), ~30 min
run vit_cifar_cpu_w2a2_progressive experiment=vit_cifar_cpu_w2a2_progressive "${CK[@]}" "$@"

#    distilled, 4 -> 3 -> 2 with 6 epochs at 2 bits, ~80 min (qat.reconstruct_on_drop=true
#    quant.reconstruct.iters=1000 adds block reconstruction after each re-fit: RESULTS.md notes)
run vit_cifar_cpu_w2a2_prog_kd experiment=vit_cifar_cpu_w2a2_progressive qat.distill=1.0 \
    qat.epochs=8 'qat.schedule=[4,3,2]' "${CK[@]}" "$@"

# 6. the two extra FP seeds (mean +- std of the FP row), ~60 min each
for s in $FP_SEEDS; do
  run "vit_cifar_cpu_s$s" experiment=vit_cifar_cpu seed="$s" stages='[train,evaluate]' "$@"
done

# 7. the table (the lead writes it to experiments/vit_cifar_cpu/RESULTS.md)
python -m hawq.report table experiments/vit_cifar_cpu/rows.yaml --runs "$RUNS"
