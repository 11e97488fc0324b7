#!/usr/bin/env bash
# Issue 31, second study: a ViT hawq did not write (PyTorch's nn.TransformerEncoderLayer,
# model=torch_vit_cifar, prepared through hawq.models.own), on real CIFAR-10, 2-core CPU.
# Every step is its own run directory under $HAWQ_RUNS, skipped once finished (marker
# run_all.done), so a killed script resumes where it stopped. Env: HAWQ_DATA (required),
# HAWQ_RUNS (default runs), DRAWS (random-sensitivity seeds, default "0 1 2 3 4").
# Extra Hydra overrides as arguments go to every run. Times are for 2 otherwise idle cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${HAWQ_DATA:?set HAWQ_DATA to the CIFAR-10 folder (cifar-10-batches-py or the npz shards)}"
export HAWQ_RUNS=${HAWQ_RUNS:-runs}
RUNS=$HAWQ_RUNS
DRAWS=${DRAWS-0 1 2 3 4}
FP=$RUNS/torch_vit_cifar/model.pt
E=experiment=torch_vit_cifar
CK=("paths.checkpoint=$FP")

run() {  # run <name> <overrides...>: one run directory, skipped once finished
  local name=$1; shift
  if [ -f "$RUNS/$name/run_all.done" ]; then echo "run_all: $name finished before, skipped"; return; fi
  echo "run_all: $name ($(date -u +%H:%M) UTC)"
  python -m hawq.run name="$name" data.download=false "$@"
  touch "$RUNS/$name/run_all.done"
}

# 0. the FP model, 20 epochs (~31 min alone) and its test accuracy
run torch_vit_cifar $E stages='[train,evaluate]' "$@"

# 1. curvature: per-op weight and activation traces, <= 100 Hutchinson samples (~10 min)
run torch_vit_cifar_hessian $E stages='[hessian]' "${CK[@]}" hessian.batch_size=128 \
    hessian.max_samples=100 hessian.top_k=0 hessian.density=false "$@"
H=$RUNS/torch_vit_cifar_hessian/hessian.json
#    the first-order alternative (issue 32): empirical Fisher traces from per-sample gradients
run torch_vit_cifar_fisher $E stages='[hessian]' "${CK[@]}" hessian.method=fisher \
    hessian.batch_size=128 "$@"
HF=$RUNS/torch_vit_cifar_fisher/hessian.json

# 2. uniform PTQ: W8A8 (+ integer-only inference) and all-INT4 (~2 min each)
Q=(quant.default.granularity=per_channel quant.default.calibrator=mse quant.default.a_symmetric=false)
run torch_vit_cifar_w8a8 $E stages='[ptq,integer]' "${CK[@]}" "${Q[@]}" "$@"
run torch_vit_cifar_w4a4 $E stages='[ptq]' "${CK[@]}" "${Q[@]}" quant.default.w_bits=4 \
    quant.default.a_bits=4 "$@"

# 3. mixed 4/8 at 0.25 / 0.5 / 0.75 of the BOPs range: Hessian ILP, then random sensitivities
#    (same ILP, same budgets), draw by draw (~2 min per run)
B=()
for f in 0.25 0.5 0.75; do B+=("$f=$(python -m hawq.report budget "$H" --kind bops --fraction "$f")"); done
A() { echo alloc.int4_share=null "alloc.bops=${1#*=}" "alloc.hessian=${2:-$H}"; }
for fb in "${B[@]}"; do
  run "torch_vit_cifar_hawq_bops${fb%%=*}" $E stages='[alloc,ptq]' "${CK[@]}" "${Q[@]}" $(A "$fb") "$@"
done
for fb in "${B[@]}"; do  # the same ILP on the Fisher ranking
  run "torch_vit_cifar_fisher_bops${fb%%=*}" $E stages='[alloc,ptq]' "${CK[@]}" "${Q[@]}" \
      $(A "$fb" "$HF") "$@"
done
for s in $DRAWS; do
  for fb in "${B[@]}"; do
    run "torch_vit_cifar_random${s}_bops${fb%%=*}" $E stages='[alloc,ptq]' "${CK[@]}" "${Q[@]}" \
        $(A "$fb") alloc.method=random alloc.seed="$s" "$@"
  done
done

# 4. all-INT4 with block reconstruction (~15 min alone)
run torch_vit_cifar_w4a4_rec $E stages='[ptq]' "${CK[@]}" "${Q[@]}" quant.default.w_bits=4 \
    quant.default.a_bits=4 quant.reconstruct.enabled=true "$@"

#    the same with 5,000 steps per unit (the recipe that met FP-1.5 on the CPU ViT; ~2.5 h on 2
#    shared cores): resumable unit by unit (ptq_reconstruct_state.pt), so a stopped run goes on
run torch_vit_cifar_w4a4_rec5k $E stages='[ptq]' "${CK[@]}" "${Q[@]}" quant.default.w_bits=4 \
    quant.default.a_bits=4 quant.reconstruct.enabled=true quant.reconstruct.iters=5000 "$@"

# 5. the table
python -m hawq.report table experiments/torch_vit_cifar/rows.yaml --runs "$RUNS"
