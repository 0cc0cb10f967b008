#!/usr/bin/env bash
# The passkey recipe in one command on one GPU (about 13 minutes on an H100, compiled layers):
#
#     bash configs/experiments/passkey_run.sh [OUT_DIR]        (default runs/passkey)
#
# 1. Data: DOCS synthetic passkey documents of MIN_LEN..MAX_LEN tokens (default MAX_LEN / 8 ..
#    8192), each asking QUESTIONS times for its key (the last at the end), as byte-level shards (OUT/data);
#    the key digits of every answer weigh ANSWER_WEIGHT in the loss (1: unweighted); DATA_ARGS: more
#    make-data options (default --distractors 20 --near 0.5: other 5-digit numbers, never asked for,
#    and in half the documents a question just after the needle, so that the needle in the answer's
#    own segment stays learned through phase 3; docs/long-context.md). With
#    SHORT_MINUTES > 0 (the default), as many short ones too: SHORT_MIN_LEN..SHORT_MAX_LEN tokens
#    asking SHORT_QUESTIONS times, made with SHORT_DATA_ARGS (default --no-header --distractors 3:
#    without the prompt's 150-byte header, three other numbers each), in OUT/data_short. Distractors
#    teach the model to answer from a read that mixes in other numbers, which doubled the length to
#    which retrieval holds (docs/long-context.md).
# 2. A first phase on the short documents (SHORT_STEPS steps or SHORT_MINUTES, OUT/train_short,
#    exported to OUT/export_short) with SHORT_OVERRIDES after TRAIN_OVERRIDES (default: segments of
#    64, 64 lanes of 8 segments, LR 1e-3). Documents this short leave the memory a few hundred tokens
#    when the question is read, few enough for retrieval through it to be learned from scratch in a
#    few hundred steps (docs/long-context.md). The weights do not depend on the segment length, so the
#    second phase, on the long documents at the config's segment of 512, starts from them
#    (checkpoint.init_from) for the rest of TRAIN_MINUTES (its schedule of 1,000 steps, or fewer if the
#    budget runs out) and exports the model (OUT/export_main).
# 2b. A third phase on documents several windows long (LONG_MINUTES=0: none, and phase 2 exports to
#    OUT/export): LONG_DOCS documents of LONG_MIN_LEN..LONG_MAX_LEN tokens (default 16K..64K: 2-8
#    windows of 8K) asking QUESTIONS times, made with LONG_DATA_ARGS (default DATA_ARGS) in
#    OUT/data_long, trained from phase 2's model for LONG_STEPS steps (default 2,500) or LONG_MINUTES
#    (default 6; OUT/train_long) with LONG_OVERRIDES after TRAIN_OVERRIDES, and exported to
#    OUT/export. Phase 2's documents fit in one window, so nothing in its loss asks the memory to hold
#    a needle over later windows' writes. On an H100, 1,000 steps of phase 2 and 2,500 of phase 3
#    retrieved 99.6% and 100% over 1K-1M in two seeds; 4,000 of phase 2 alone, 52% at 1M
#    (docs/long-context.md). LONG_MIX (default 0) is the share of phase 3's documents drawn from phase
#    2's (OUT/data), so that a needle still shares its question's window often enough to stay learned;
#    at CPU size such a mix lost retrieval at 128K over 2,000 steps, where the long documents alone held it.
# 3. Passkey retrieval at LENGTHS x DEPTHS, TRIALS prompts each, with the memory and with the gates
#    forced local (OUT/passkey, OUT/passkey_ablated: JSON, markdown, heatmap); EVAL_ARGS go to both.
#    The memory is read as the model learned to (the config's model.learned_memory_scales); evaluation
#    scales on top of that (e.g. EVAL_ARGS="--memory-key-scale 2") are for experiments only.
# 4. OUT/RESULTS.md: both side by side, with the training settings, seeds and wall time.
#
# Finished stages are skipped when the command runs again (data, a phase's export, an evaluation), and a
# training phase stopped part-way resumes from its last checkpoint: under a time limit per command, run
# the same command again. The report gives wall time only for a command that ran every stage itself;
# its training minutes in steps count every run of the command.
#
# Every setting is an environment variable; TRAIN_OVERRIDES takes key=value overrides of the run
# config (every phase) and LAUNCH the launcher (e.g. "torchrun --nproc-per-node 2").
set -euo pipefail

OUT=${1:-runs/passkey}
CONFIG=${CONFIG:-configs/experiments/passkey.yaml}
DOCS=${DOCS:-24000}
MAX_LEN=${MAX_LEN:-8192}
MIN_LEN=${MIN_LEN:-}
QUESTIONS=${QUESTIONS:-2}
ANSWER_WEIGHT=${ANSWER_WEIGHT:-80}
DATA_ARGS=${DATA_ARGS:---distractors 20 --near 0.5}
TRAIN_MINUTES=${TRAIN_MINUTES:-14}
SHORT_MINUTES=${SHORT_MINUTES:-4}
SHORT_STEPS=${SHORT_STEPS:-1500}
SHORT_MIN_LEN=${SHORT_MIN_LEN:-256}
SHORT_MAX_LEN=${SHORT_MAX_LEN:-512}
SHORT_QUESTIONS=${SHORT_QUESTIONS:-2}
SHORT_DATA_ARGS=${SHORT_DATA_ARGS:---no-header --distractors 3}
SHORT_OVERRIDES=${SHORT_OVERRIDES:-model.segment_length=64 data.n_segments=8 data.global_lanes=64 \
parallel.micro_batch_lanes=64 optimizer.lr=1e-3 schedule.warmup_steps=50}
LONG_MINUTES=${LONG_MINUTES:-6}
LONG_STEPS=${LONG_STEPS:-2500}
LONG_DOCS=${LONG_DOCS:-2000}
LONG_MIN_LEN=${LONG_MIN_LEN:-16384}
LONG_MAX_LEN=${LONG_MAX_LEN:-65536}
LONG_MIX=${LONG_MIX:-0}
LONG_DATA_ARGS=${LONG_DATA_ARGS:-$DATA_ARGS}
LONG_OVERRIDES=${LONG_OVERRIDES:-}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
LAUNCH=${LAUNCH:-python}
LENGTHS=${LENGTHS:-1k,2k,4k,8k,16k,32k,64k,128k,256k,512k,1m}
DEPTHS=${DEPTHS:-0,25,50,75,100}
TRIALS=${TRIALS:-10}
BATCH=${BATCH:-50}
EVAL_ARGS=${EVAL_ARGS:-}

# Phase 3's documents, with LONG_MIX of them drawn from phase 2's; checked before anything runs.
long_sources="[{path: $OUT/data_long/shards}]"
if [ "$LONG_MIX" != 0 ]; then
    if ! python -c "import sys; sys.exit(not 0 < float(sys.argv[1]) < 1)" "$LONG_MIX" 2>/dev/null; then
        echo "LONG_MIX=$LONG_MIX: must be a share between 0 and 1 (0: phase 3 on its own documents only)" >&2
        exit 2
    fi
    long_sources="[{path: $OUT/data_long/shards, weight: $(python -c "print(1 - $LONG_MIX)")}, \
{path: $OUT/data/shards, weight: $LONG_MIX}]"
fi

started=$(date +%s)
resumed=false
if [ -f "$OUT/data/shards/index.json" ]; then
    resumed=true
else
    # shellcheck disable=SC2086  # DATA_ARGS is a word list
    python -m evals.passkey make-data --out "$OUT/data" --docs "$DOCS" ${MIN_LEN:+--min-len "$MIN_LEN"} \
        --max-len "$MAX_LEN" --questions "$QUESTIONS" --answer-weight "$ANSWER_WEIGHT" --seed 1 $DATA_ARGS
fi
init_from=""
long_minutes=$TRAIN_MINUTES
if [ "$SHORT_MINUTES" != 0 ]; then
    short_started=$(date +%s)
    if [ ! -f "$OUT/data_short/shards/index.json" ]; then
        # shellcheck disable=SC2086  # SHORT_DATA_ARGS is a word list
        python -m evals.passkey make-data --out "$OUT/data_short" --docs "$DOCS" --min-len "$SHORT_MIN_LEN" \
            --max-len "$SHORT_MAX_LEN" --questions "$SHORT_QUESTIONS" --answer-weight "$ANSWER_WEIGHT" --seed 2 \
            $SHORT_DATA_ARGS
    fi
    if [ ! -f "$OUT/export_short/model_config.yaml" ]; then
        # shellcheck disable=SC2086  # LAUNCH and the overrides are word lists
        $LAUNCH -m training.train --config "$CONFIG" "export.dir=$OUT/export_short" "schedule.max_minutes=$SHORT_MINUTES" \
            "run_dir=$OUT/train_short" "data.sources=[{path: $OUT/data_short/shards}]" "schedule.steps=$SHORT_STEPS" \
            checkpoint.resume=auto $TRAIN_OVERRIDES $SHORT_OVERRIDES
    fi
    init_from="checkpoint.init_from=$OUT/export_short"
    long_minutes=$(python -c "print(max($TRAIN_MINUTES - ($(date +%s) - $short_started) / 60, 0.5))")
fi
main_export="$OUT/export"
train_dirs=("$OUT/train_short" "$OUT/train")
if [ "$LONG_MINUTES" != 0 ]; then
    main_export="$OUT/export_main"
    train_dirs+=("$OUT/train_long")
fi
if [ ! -f "$main_export/model_config.yaml" ]; then
    # shellcheck disable=SC2086
    $LAUNCH -m training.train --config "$CONFIG" "export.dir=$main_export" "schedule.max_minutes=$long_minutes" \
        "run_dir=$OUT/train" "data.sources=[{path: $OUT/data/shards}]" checkpoint.resume=auto $init_from \
        $TRAIN_OVERRIDES
fi
if [ "$LONG_MINUTES" != 0 ] && [ ! -f "$OUT/export/model_config.yaml" ]; then
    if [ ! -f "$OUT/data_long/shards/index.json" ]; then
        # shellcheck disable=SC2086  # LONG_DATA_ARGS is a word list
        python -m evals.passkey make-data --out "$OUT/data_long" --docs "$LONG_DOCS" --min-len "$LONG_MIN_LEN" \
            --max-len "$LONG_MAX_LEN" --questions "$QUESTIONS" --answer-weight "$ANSWER_WEIGHT" --seed 3 $LONG_DATA_ARGS
    fi
    # shellcheck disable=SC2086
    $LAUNCH -m training.train --config "$CONFIG" "export.dir=$OUT/export" "schedule.max_minutes=$LONG_MINUTES" \
        "run_dir=$OUT/train_long" "data.sources=$long_sources" "schedule.steps=$LONG_STEPS" \
        checkpoint.resume=auto "checkpoint.init_from=$main_export" $TRAIN_OVERRIDES $LONG_OVERRIDES
fi
trained=$(date +%s)
for variant in memory ablated; do
    flag=""; dir="$OUT/passkey"
    if [ "$variant" = ablated ]; then flag="--ablate-memory"; dir="$OUT/passkey_ablated"; fi
    [ -f "$dir/passkey.json" ] && continue
    # shellcheck disable=SC2086
    python -m evals.passkey --model "$OUT/export" --lengths "$LENGTHS" --depths "$DEPTHS" \
        --trials "$TRIALS" --batch-size "$BATCH" --out "$dir" $flag $EVAL_ARGS
done
wall=()
if [ "$resumed" = false ]; then
    wall=(--train-seconds $((trained - started)) --total-seconds $(($(date +%s) - started)))
fi
python -m evals.passkey report --memory "$OUT/passkey" --ablated "$OUT/passkey_ablated" \
    --model "$OUT/export" --train-dirs "${train_dirs[@]}" "${wall[@]}" --out "$OUT/RESULTS.md"
echo "done in $(( ($(date +%s) - started) / 60 )) min: $OUT/RESULTS.md"
