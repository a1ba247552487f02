#!/usr/bin/env bash
# The GPU runs behind docs/performance.md and docs/footprint.md (issue #14), on one H200, from the repository root
# after installing the wheels the machine lacks (../shared/gpu/README.md). Results go to $OUT.
#   bash docs/bench/issue14-gpu.sh a   # Mistral-7B shape: baseline vs qlora (100 steps), banking77-like short rows
#   bash docs/bench/issue14-gpu.sh b   # Llama-3-8B shape: baseline vs qlora; footprint check of compiled layers
#   bash docs/bench/issue14-gpu.sh c   # NF4 dequantized in the compiled graph (third session): Mistral-7B shape
#   bash docs/bench/issue14-gpu.sh d   # the same on the Llama-3-8B shape
#   bash docs/bench/issue14-gpu.sh e   # Mistral-7B: compile_nf4 off vs on, same run (what the change alone does)
#   bash docs/bench/issue14-gpu.sh f   # gradient checkpoint inside the compiled layers (transformers 5.23+'s way,
#     # commit 6cc0368's code in bench-inside/: git archive 6cc0368 qlora_cli scripts recipes | tar -x -C bench-inside)
#     # vs around them (qlora's), 2-layer Mistral-7B-width model; then the Mistral-7B shape, around
#   bash docs/bench/issue14-gpu.sh g   # Mistral-7B: baseline, qlora, qlora recomputing the down projection (sixth
#     # session's change off), one run, two steps of each profiled; GPU idle gaps of qlora's timeline
#   bash docs/bench/issue14-gpu.sh h   # Llama-3-8B: baseline vs qlora; then Mistral-7B with lora_dropout 0
#   bash docs/bench/issue14-gpu.sh i   # Mistral-7B: baseline vs qlora, both logging every 5 steps (as runs do)
#   bash docs/bench/issue14-gpu.sh j   # the same on the Llama-3-8B shape
#   bash docs/bench/issue14-gpu.sh k   # seventh session: the paged optimizer step without its prefetches and its
#     # final wait, logging every 10 steps as the recipes do: optimizer table; Mistral-7B baseline, qlora, and
#     # qlora at commit 0dff7a0 (the sixth session's code, in bench-old/:
#     # git archive 0dff7a0 qlora_cli scripts recipes | tar -x -C bench-old), same checkpoint and data
#   bash docs/bench/issue14-gpu.sh l   # seventh session: Llama-3-8B baseline vs qlora logging every 10 steps;
#     # Mistral-7B qlora collating in a DataLoader worker
#   bash docs/bench/issue14-gpu.sh m   # eighth session: step ends read back a step late again (now that the paged
#     # optimizer no longer waits): Mistral-7B baseline, qlora, qlora with lora_dropout 0, and qlora at commit
#     # dfd4e80 (in bench-old/: git archive dfd4e80 qlora_cli scripts recipes | tar -x -C bench-old), logging every 10
#   bash docs/bench/issue14-gpu.sh n   # eighth session: Llama-3-8B baseline vs qlora, logging every 10
#   bash docs/bench/issue14-gpu.sh o   # LoRA dropout alone, one projection: compiled vs dropout 0 vs fused Triton (tuned)
#     # kernels (scripts/bench_lora_dropout.py; needs only torch and triton, so no wheels to install first)
#   (p-s ran in the ninth session, when training.fused_lora_dropout was off by default; it is now on where the
#   layers are compiled, so these modes name `false` for peft's dropout and plain `qlora` is the fused variant)
#   bash docs/bench/issue14-gpu.sh p   # Mistral-7B: baseline, qlora with peft's dropout, qlora with the fused dropout
#   bash docs/bench/issue14-gpu.sh q   # Llama-3-8B: baseline, qlora with peft's dropout, qlora with the fused dropout
#   bash docs/bench/issue14-gpu.sh r   # Mistral-7B: qlora with peft's dropout and with the fused one, two steps of each
#     # profiled (logging every 10); the GPU's idle gaps in each timeline (what is left between the steps)
#   bash docs/bench/issue14-gpu.sh s   # Llama-3-8B again: baseline, qlora with the fused dropout before qlora without
#     # it (the other order from q), 50 timed steps
#   bash docs/bench/issue14-gpu.sh t   # tenth session: Llama-3-8B and Mistral-7B qlora, two steps of each profiled
#     # (logging every 10): where Llama's extra ~70 ms a step go; the LM head alone (scripts/bench_lm_head.py)
#   bash docs/bench/issue14-gpu.sh u   # tenth session: the loss head alone, TRL's vs qlora's; Llama-3-8B baseline,
#     # qlora, and qlora with TRL's loss head (training.lm_head_grad_in_forward=false)
#   bash docs/bench/issue14-gpu.sh v   # tenth session: Mistral-7B baseline, qlora, qlora with TRL's loss head; then
#     # Llama-3-8B qlora with two steps profiled (CPU and GPU tables, timeline, idle gaps: tarred)
#   bash docs/bench/issue14-gpu.sh w   # tenth session, batches copied to the GPU without waiting: Llama-3-8B baseline
#     # and qlora; then Mistral-7B qlora alone (against mode v's run)
#   bash docs/bench/issue14-gpu.sh x   # not run yet: Llama-3-8B baseline vs qlora with 30 warm-up steps (the baseline
#     # is still speeding up 10-30 steps in, docs/performance.md, tenth session), 30 timed; ~5 min
#   bash docs/bench/issue14-gpu.sh y   # the same for Mistral-7B
#   bash docs/bench/issue14-gpu.sh z   # eleventh session: the LoRA-dropout op as a triton_op (inductor launches its
#     # kernels): kernel check eager and compiled; Llama-3-8B qlora at commit e22b629 (in bench-old/:
#     # git archive e22b629 qlora_cli scripts recipes | tar -x -C bench-old) and now, logging every 10
#     # (the same call ran the first version of scripts/bench_dropout_masks.py: lora-dropout-masks-h200.txt)
#   bash docs/bench/issue14-gpu.sh aa  # eleventh session: Llama-3-8B qlora, two steps profiled (tarred, as in mode v)
#   bash docs/bench/issue14-gpu.sh ab  # what drawing the dropout masks costs the fused kernels (no wheels needed)
#   bash docs/bench/issue14-gpu.sh ad  # twelfth session: hashed dropout masks (kernel check, mask costs), then mode x
#   bash docs/bench/issue14-gpu.sh ae  # twelfth session: mode y, then Mistral-7B qlora at commit 6ffc220 (bench-old/:
#     # git archive 6ffc220 qlora_cli scripts recipes | tar -x -C bench-old), 30 warm-up and 30 timed steps
#   bash docs/bench/issue14-gpu.sh af  # twelfth session: Llama-3-8B baseline, qlora dequantizing again in backward
#     # (training.keep_dequantized=false), qlora; 30 warm-up and 30 timed steps each
#   bash docs/bench/issue14-gpu.sh ag  # thirteenth session: flex attention alone at the 7-8B layer shape on packed
#     # rows: inductor's default kernel configuration vs max-autotune's pick, with and without TMA (torch only)
#   bash docs/bench/issue14-gpu.sh ah  # thirteenth session: flex attention with qlora's forward tiles against the default
#     # and other backward tiles, on the usual packed rows and on rows of one document; then mode x
#   bash docs/bench/issue14-gpu.sh ai  # thirteenth session: flex attention's tiles again (2 s of calls before timing each
#     # variant: mode ah's figures moved with the GPU's clocks); Llama-3-8B qlora without and with the forward tiles
#     # (training.flex_tiles, removed after this run showed no gain: run at commit bf3d371), 30 warm-up and 30 timed
#     # steps each
#   bash docs/bench/issue14-gpu.sh aj  # not run yet (fourteenth session, no GPU lent): LoRA's B folded into the frozen
#     # product (training.fold_lora_b): one 7-8B MLP alone (scripts/bench_lora_fold.py), the dropout masks' cost
#     # with a fifth candidate, one hash per two inputs (scripts/bench_dropout_masks.py, ~20 s), then Llama-3-8B
#     # qlora without and with the fold, 30 warm-up and 30 timed steps each (~7 min); since the fifteenth session
#     # also scripts/bench_optimizer.py (bitsandbytes' step, qlora's per tensor, qlora's one call a group; ~1 min)
#   bash docs/bench/issue14-gpu.sh ak  # not run (mode am measured the fold first: no gain): Llama-3-8B baseline vs qlora with training.fold_lora_b (as mode x)
#   bash docs/bench/issue14-gpu.sh al  # not run (as ak): the same for Mistral-7B (as mode y)
#   bash docs/bench/issue14-gpu.sh am  # fifteenth session (ran: llama3-8b-warm30-fold3-h200.json): Llama-3-8B baseline, qlora and qlora with
#     # training.fold_lora_b in one run, 30 warm-up and 30 timed steps each (~8 min): the fold's A/B and item 4's
#     # ratio from one call; run it first, then al
#   bash docs/bench/issue14-gpu.sh an  # fifteenth session (ran: llama3-8b-warm30-{8b577f5,onecall}-h200.json): Llama-3-8B qlora at commit 8b577f5 (before
#     # 8-bit AdamW's one-call update; bench-old/: git archive 8b577f5 qlora_cli scripts recipes | tar -x -C bench-old,
#     # carried with .gpu) and qlora now, 30 warm-up and 30 timed steps each (~5 min)
#   bash docs/bench/issue14-gpu.sh ao  # sixteenth session: the memo kernel checked against the plain one
#     # (scripts/bench_lora_dropout.py --check), then Llama-3-8B baseline, qlora without and with
#     # training.keep_lora_a_outputs in one run, 30 warm-up and 30 timed steps each (~8 min)
#   bash docs/bench/issue14-gpu.sh ap  # sixteenth session: the same three variants for Mistral-7B (~7 min)
#   bash docs/bench/issue14-gpu.sh ac  # eleventh session: Mistral-7B qlora, full garbage collections counted in the
#     # timed steps, without and with gc.freeze() after the first step (training.freeze_gc). The figures on file
#     # (mistral7b-log10-gc*-h200.json) ran before freeze_gc existed, as `qlora` and `qlora --gc-freeze` (the flag
#     # then froze every variant); now that qlora freezes by default, this is the same comparison in one run
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
W=/tmp/qlora-bench
log10() {  # SHAPE VARIANTS TAG [DIR]: one bench_train run logging every 10 steps as the recipes do (modes k-n),
  # from this checkout or from DIR (an older commit's code, e.g. bench-old/)
  (cd "${4:-.}" && python3 scripts/bench_train.py --shape "$1" --steps 30 --warmup 10 --log-every 10 --docs 3000 \
    --workdir $W --variants "$2" --out "$OUT/$1-log10-$3-h200.json" 2>&1 | tee "$OUT/$1-$3.log")
}
need_old() { [ -f bench-old/scripts/bench_train.py ] || { echo "no bench-old/: make it here and carry it (see the top)"; exit 1; }; }
OLD_BANKING="qlora-data.packing=false;data.max_length=256;training.per_device_train_batch_size=16;training.gradient_accumulation_steps=2"
if [ "$1" = a ]; then
  python3 scripts/bench_train.py --shape mistral7b --steps 100 --baseline-steps 25 --warmup 4 --docs 3000 \
    --workdir $W --variants baseline,qlora --out "$OUT/mistral7b-h200.json" 2>&1 | tee "$OUT/mistral7b.log"
  python3 scripts/bench_train.py --shape mistral7b --data-kind intents --docs 40000 --micro-batch 1 --seq-len 2048 \
    --steps 25 --warmup 3 --workdir $W --variants "$OLD_BANKING,qlora" --out "$OUT/banking-mistral7b-h200.json" \
    2>&1 | tee "$OUT/banking.log"
elif [ "$1" = b ]; then
  python3 scripts/bench_train.py --shape llama3-8b --steps 30 --baseline-steps 25 --warmup 4 --docs 3000 \
    --workdir $W --variants baseline,qlora --out "$OUT/llama3-8b-h200.json" 2>&1 | tee "$OUT/llama3-8b.log"
  rm -rf $W/ckpt-llama3-8b
  timeout 240 python3 scripts/validate_footprint.py --group c --out "$OUT/footprint" --work /tmp/qlora-validate \
    --jobs 2 --time-limit 120 2>&1 | tee "$OUT/footprint.log"
  # the shipped banking77 recipe's micro-batch 1 measured 4,912 tokens/s in run a: micro-batch 4 packed rows
  timeout 120 python3 scripts/bench_train.py --shape mistral7b --data-kind intents --docs 40000 --micro-batch 4 \
    --seq-len 2048 --steps 25 --warmup 3 --workdir $W --variants qlora --out "$OUT/banking-mb4-mistral7b-h200.json" \
    2>&1 | tee "$OUT/banking-mb4.log"
elif [ "$1" = c ] || [ "$1" = d ]; then
  shape=$([ "$1" = c ] && echo mistral7b || echo llama3-8b)
  python3 scripts/bench_train.py --shape $shape --steps 30 --baseline-steps 25 --warmup 4 --docs 3000 \
    --workdir $W --variants "baseline,qlora,qlora-lora.lora_dropout=0" --out "$OUT/$shape-nf4-h200.json" \
    2>&1 | tee "$OUT/$shape.log"
elif [ "$1" = e ]; then
  python3 scripts/bench_train.py --shape mistral7b --steps 30 --warmup 4 --docs 3000 --workdir $W \
    --variants "qlora-training.compile_nf4=false,qlora" --out "$OUT/mistral7b-nf4-ab-h200.json" \
    2>&1 | tee "$OUT/nf4-ab.log"
elif [ "$1" = f ]; then
  python3 - <<'PY'
import sys
sys.path.insert(0, "scripts")
from pathlib import Path
import bench_train as b
b.make_checkpoint("mistral7b", Path("/tmp/d/ckpt"), "cuda", layers=2)
b.write_data(Path("/tmp/d/data.jsonl"), 3000)
PY
  ARGS="--child qlora --ckpt /tmp/d/ckpt --data /tmp/d/data.jsonl --micro-batch 4 --seq-len 2048 --steps 8 --warmup 2
        --device cuda --data-kind text"
  mkdir -p /tmp/d/a /tmp/d/d
  (cd bench-inside && timeout 110 python3 scripts/bench_train.py $ARGS --workdir /tmp/d/a > "$OUT/a-inside.log" 2>&1)
  timeout 110 python3 scripts/bench_train.py $ARGS --workdir /tmp/d/d > "$OUT/d-around.log" 2>&1
  grep -h RESULT "$OUT/a-inside.log" "$OUT/d-around.log" | cut -c1-300
  python3 scripts/bench_train.py --shape mistral7b --steps 30 --warmup 4 --docs 3000 --workdir $W --variants qlora \
    --out "$OUT/mistral7b-around-h200.json" 2>&1 | tee "$OUT/full.log"
elif [ "$1" = g ]; then
  python3 scripts/bench_train.py --shape mistral7b --steps 30 --baseline-steps 25 --warmup 4 --docs 3000 \
    --workdir $W --variants "baseline,qlora,qlora-training.recompute_down_proj=true" --profile-dir /tmp/prof \
    --out "$OUT/mistral7b-defer-h200.json" 2>&1 | tee "$OUT/mistral7b.log"
  python3 scripts/gpu_gaps.py /tmp/prof/trace-qlora.json.gz > "$OUT/gaps-qlora.txt"
  python3 scripts/gpu_gaps.py /tmp/prof/trace-qlora-training.recompute_down_proj_true.json.gz > "$OUT/gaps-recompute.txt"
  cp /tmp/prof/profile-qlora.txt /tmp/prof/trace-qlora.json.gz "$OUT/"
  cp /tmp/prof/profile-qlora-training.recompute_down_proj_true.txt "$OUT/profile-qlora-recompute.txt"
elif [ "$1" = h ]; then
  python3 scripts/bench_train.py --shape llama3-8b --steps 27 --baseline-steps 25 --warmup 4 --docs 3000 \
    --workdir $W --variants baseline,qlora --out "$OUT/llama3-8b-defer-h200.json" 2>&1 | tee "$OUT/llama3-8b.log"
  python3 scripts/bench_train.py --shape mistral7b --steps 30 --warmup 4 --docs 3000 --workdir $W \
    --variants "qlora-lora.lora_dropout=0" --out "$OUT/mistral7b-dropout0-defer-h200.json" 2>&1 | tee "$OUT/dropout0.log"
elif [ "$1" = i ] || [ "$1" = j ]; then
  shape=$([ "$1" = i ] && echo mistral7b || echo llama3-8b)
  python3 scripts/bench_train.py --shape $shape --steps 30 --baseline-steps 25 --warmup 5 --log-every 5 \
    --docs 3000 --workdir $W --variants baseline,qlora --out "$OUT/$shape-log5-h200.json" 2>&1 | tee "$OUT/$shape.log"
elif [ "$1" = k ]; then
  need_old
  python3 scripts/bench_optimizer.py --shape mistral7b --steps 30 2>&1 | tee "$OUT/optimizer.txt"
  log10 mistral7b baseline,qlora now
  log10 mistral7b qlora 0dff7a0 bench-old
elif [ "$1" = l ]; then
  log10 llama3-8b baseline,qlora now
  rm -rf $W/ckpt-llama3-8b
  log10 mistral7b "qlora-training.sft_args.dataloader_num_workers=1" worker
elif [ "$1" = m ]; then
  need_old
  log10 mistral7b baseline,qlora,qlora-lora.lora_dropout=0 now
  log10 mistral7b qlora dfd4e80 bench-old
elif [ "$1" = n ]; then
  log10 llama3-8b baseline,qlora now
elif [ "$1" = o ]; then
  python3 scripts/bench_lora_dropout.py --check 2>&1 | tee "$OUT/lora-dropout.txt"
elif [ "$1" = p ]; then
  log10 mistral7b baseline,qlora-training.fused_lora_dropout=false,qlora fused
elif [ "$1" = q ]; then
  log10 llama3-8b baseline,qlora-training.fused_lora_dropout=false,qlora fused
elif [ "$1" = s ]; then
  python3 scripts/bench_train.py --shape llama3-8b --steps 50 --warmup 10 --log-every 10 --docs 3000 --workdir $W \
    --variants "baseline,qlora,qlora-training.fused_lora_dropout=false" --out "$OUT/llama3-8b-log10-fused50-h200.json" \
    2>&1 | tee "$OUT/llama3-8b-fused50.log"
elif [ "$1" = r ]; then
  python3 scripts/bench_train.py --shape mistral7b --steps 30 --warmup 10 --log-every 10 --docs 3000 --workdir $W \
    --variants "qlora-training.fused_lora_dropout=false,qlora" --profile-dir /tmp/prof \
    --out "$OUT/mistral7b-profiled-h200.json" 2>&1 | tee "$OUT/mistral7b.log"
  python3 scripts/gpu_gaps.py /tmp/prof/trace-qlora.json.gz > "$OUT/gaps-fused.txt"
  python3 scripts/gpu_gaps.py /tmp/prof/trace-qlora-training.fused_lora_dropout_false.json.gz > "$OUT/gaps-peft-dropout.txt"
  cp /tmp/prof/profile-qlora.txt "$OUT/profile-qlora-fused.txt"
  cp /tmp/prof/profile-qlora-training.fused_lora_dropout_false.txt "$OUT/profile-qlora-peft-dropout.txt"
elif [ "$1" = t ]; then
  python3 scripts/bench_lm_head.py 2>&1 | tee "$OUT/lm-head.txt"
  for shape in llama3-8b mistral7b; do
    python3 scripts/bench_train.py --shape $shape --steps 30 --warmup 10 --log-every 10 --docs 3000 --workdir $W \
      --variants qlora --profile-dir /tmp/prof-$shape --out "$OUT/$shape-profiled-h200.json" 2>&1 | tee "$OUT/$shape.log"
    python3 scripts/gpu_gaps.py /tmp/prof-$shape/trace-qlora.json.gz > "$OUT/gaps-$shape.txt"
    cp /tmp/prof-$shape/profile-qlora.txt "$OUT/profile-$shape.txt"
    cp /tmp/prof-$shape/trace-qlora.json.gz "$OUT/trace-$shape.json.gz"
    rm -rf $W/ckpt-$shape
  done
elif [ "$1" = u ]; then
  python3 scripts/bench_lm_head.py 2>&1 | tee "$OUT/lm-head.txt"
  log10 llama3-8b baseline,qlora,qlora-training.lm_head_grad_in_forward=false head
elif [ "$1" = v ]; then
  log10 mistral7b baseline,qlora,qlora-training.lm_head_grad_in_forward=false head
  rm -rf $W/ckpt-mistral7b
  python3 scripts/bench_train.py --shape llama3-8b --steps 16 --warmup 10 --log-every 10 --docs 3000 --workdir $W \
    --variants qlora --profile-dir /tmp/prof --out "$OUT/llama3-8b-profiled-h200.json" 2>&1 | tee "$OUT/llama3-8b-prof.log"
  python3 scripts/gpu_gaps.py /tmp/prof/trace-qlora.json.gz > /tmp/prof/gaps-qlora.txt
  tar -C /tmp/prof -czf "$OUT/prof-llama3-8b.tgz" .
elif [ "$1" = w ]; then
  log10 llama3-8b baseline,qlora nonblocking
  rm -rf $W/ckpt-llama3-8b
  log10 mistral7b qlora nonblocking
elif [ "$1" = z ]; then
  need_old
  python3 scripts/bench_lora_dropout.py --check 2>&1 | tee "$OUT/lora-dropout.txt"
  log10 llama3-8b qlora e22b629 bench-old
  log10 llama3-8b qlora tritonop
elif [ "$1" = ac ]; then
  log10 mistral7b "qlora-training.freeze_gc=false,qlora" gc
elif [ "$1" = ab ]; then
  python3 scripts/bench_dropout_masks.py 2>&1 | tee "$OUT/masks.txt"
elif [ "$1" = aa ]; then
  python3 scripts/bench_train.py --shape llama3-8b --steps 16 --warmup 10 --log-every 10 --docs 3000 --workdir $W \
    --variants qlora --profile-dir /tmp/prof --out "$OUT/llama3-8b-profiled-h200.json" 2>&1 | tee "$OUT/llama3-8b-prof.log"
  python3 scripts/gpu_gaps.py /tmp/prof/trace-qlora.json.gz > /tmp/prof/gaps-qlora.txt
  tar -C /tmp/prof -czf "$OUT/prof-llama3-8b.tgz" .
elif [ "$1" = ad ]; then
  python3 scripts/bench_lora_dropout.py --check 2>&1 | tee "$OUT/lora-dropout.txt" || exit 1
  python3 scripts/bench_dropout_masks.py 2>&1 | tee "$OUT/masks.txt"
  bash docs/bench/issue14-gpu.sh x
elif [ "$1" = ae ]; then
  need_old
  bash docs/bench/issue14-gpu.sh y
  (cd bench-old && python3 scripts/bench_train.py --shape mistral7b --steps 30 --warmup 30 --log-every 10 --docs 3000 \
    --workdir $W --variants qlora --out "$OUT/mistral7b-warm30-6ffc220-h200.json" 2>&1 | tee "$OUT/mistral7b-old.log")
elif [ "$1" = af ]; then
  python3 scripts/bench_train.py --shape llama3-8b --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants "baseline,qlora-training.keep_dequantized=false,qlora" --out "$OUT/llama3-8b-warm30-keep-h200.json" \
    2>&1 | tee "$OUT/llama3-8b-keep.log"
elif [ "$1" = ag ]; then
  python3 scripts/bench_flex_attention.py --json "$OUT/flex-attention-h200.json" 2>&1 | tee "$OUT/flex-attention.txt"
elif [ "$1" = ah ]; then
  F='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4'
  bwd() { echo "\"bwd_BLOCK_M1\": $1, \"bwd_BLOCK_N1\": $2, \"bwd_BLOCK_M2\": $2, \"bwd_BLOCK_N2\": $1, \"bwd_num_stages\": $3, \"bwd_num_warps\": $4"; }
  python3 scripts/bench_flex_attention.py --variants default,qlora,b32-64,b64-64,b64-128-w4,f64-128 --options "qlora={$F}" \
    --options "b32-64={$F, $(bwd 32 64 3 4)}" --options "b64-64={$F, $(bwd 64 64 3 4)}" \
    --options "b64-128-w4={$F, $(bwd 64 128 3 4)}" \
    --options 'f64-128={"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_stages": 3, "fwd_num_warps": 4}' \
    --json "$OUT/flex-tiles-h200.json" 2>&1 | tee "$OUT/flex-tiles.txt"
  python3 scripts/bench_flex_attention.py --variants default,qlora --options "qlora={$F}" --tokens-per-word 10 \
    --json "$OUT/flex-tiles-long-h200.json" 2>&1 | tee "$OUT/flex-tiles-long.txt"
  bash docs/bench/issue14-gpu.sh x
elif [ "$1" = ai ]; then
  F='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4'
  B='"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_stages": 3, "bwd_num_warps": 4'
  python3 scripts/bench_flex_attention.py --variants default,qlora,bwd32,qlora-bwd32,default2 \
    --options "qlora={$F}" --options "bwd32={$B}" --options "qlora-bwd32={$F, $B}" --options "default2={}" \
    --json "$OUT/flex-tiles2-h200.json" 2>&1 | tee "$OUT/flex-tiles2.txt"
  python3 scripts/bench_train.py --shape llama3-8b --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants "qlora-training.flex_tiles=false,qlora" --out "$OUT/llama3-8b-warm30-tiles-h200.json" \
    2>&1 | tee "$OUT/llama3-8b-tiles.log"
elif [ "$1" = aj ]; then
  python3 scripts/bench_lora_fold.py --json "$OUT/lora-fold-h200.json" 2>&1 | tee "$OUT/lora-fold.txt"
  python3 scripts/bench_dropout_masks.py 2>&1 | tee "$OUT/lora-dropout-masks-hash2-h200.txt"
  python3 scripts/bench_optimizer.py --shape llama3-8b 2>&1 | tee "$OUT/optimizer-one-call-h200.txt"
  python3 scripts/bench_train.py --shape llama3-8b --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants "qlora,qlora-training.fold_lora_b=true" --out "$OUT/llama3-8b-warm30-fold-ab-h200.json" \
    2>&1 | tee "$OUT/llama3-8b-fold-ab.log"
elif [ "$1" = ak ] || [ "$1" = al ]; then
  shape=$([ "$1" = ak ] && echo llama3-8b || echo mistral7b)
  python3 scripts/bench_train.py --shape $shape --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants "baseline,qlora-training.fold_lora_b=true" --out "$OUT/$shape-warm30-fold-h200.json" \
    2>&1 | tee "$OUT/$shape-warm30-fold.log"
elif [ "$1" = an ]; then
  need_old
  (cd bench-old && python3 scripts/bench_train.py --shape llama3-8b --steps 30 --warmup 30 --log-every 10 --docs 3000 \
    --workdir $W --variants qlora --out "$OUT/llama3-8b-warm30-8b577f5-h200.json" 2>&1 | tee "$OUT/llama3-8b-old.log")
  python3 scripts/bench_train.py --shape llama3-8b --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants qlora --out "$OUT/llama3-8b-warm30-onecall-h200.json" 2>&1 | tee "$OUT/llama3-8b-onecall.log"
elif [ "$1" = am ]; then
  python3 scripts/bench_train.py --shape llama3-8b --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants "baseline,qlora,qlora-training.fold_lora_b=true" --out "$OUT/llama3-8b-warm30-fold3-h200.json" \
    2>&1 | tee "$OUT/llama3-8b-warm30-fold3.log"
elif [ "$1" = ao ]; then
  python3 scripts/bench_lora_dropout.py --check --widths 4096 --steps 5 --warmup 2 2>&1 | tee "$OUT/lora-dropout-memo-check-h200.txt"
  python3 scripts/bench_train.py --shape llama3-8b --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants "baseline,qlora-training.keep_lora_a_outputs=false,qlora" --out "$OUT/llama3-8b-warm30-memo-h200.json" \
    2>&1 | tee "$OUT/llama3-8b-warm30-memo.log"
elif [ "$1" = ap ]; then
  python3 scripts/bench_train.py --shape mistral7b --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants "baseline,qlora-training.keep_lora_a_outputs=false,qlora" --out "$OUT/mistral7b-warm30-memo-h200.json" \
    2>&1 | tee "$OUT/mistral7b-warm30-memo.log"
elif [ "$1" = x ] || [ "$1" = y ]; then
  shape=$([ "$1" = x ] && echo llama3-8b || echo mistral7b)
  python3 scripts/bench_train.py --shape $shape --steps 30 --warmup 30 --log-every 10 --docs 3000 --workdir $W \
    --variants baseline,qlora --out "$OUT/$shape-warm30-h200.json" 2>&1 | tee "$OUT/$shape-warm30.log"
fi
