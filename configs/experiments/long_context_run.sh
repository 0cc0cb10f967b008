#!/usr/bin/env bash
# The equal-compute long-context comparison in one command on one GPU (docs/comparison.md):
#
#     bash configs/experiments/long_context_run.sh [OUT_DIR]        (default runs/long_context)
#
# 1. Data: the Debian corpus's train.jsonl.xz and heldout.jsonl.xz in CORPUS (default data/corpus; 9.8
#    MiB, written by `python -m data_pipeline.corpus fetch`, docs/corpus.md) become byte-level shard sets
#    OUT/shards/train and OUT/shards/heldout (no network needed).
# 2. Training: each run of RUNS (default: every run of RUNS_FILE, configs/experiments/long_context_runs.yaml)
#    is CONFIG (configs/experiments/long_context.yaml) with TRAIN_OVERRIDES, then the run's own
#    overrides: Infini-attention, the same without memory, full causal attention; the same shape,
#    steps and tokens, FLOPs per token within 5%. Each trains in OUT/RUN/train from scratch and
#    exports OUT/RUN/export.
# 3. Evaluation: loss and perplexity by token position (BUCKETS edges, default 2k,8k,32k,128k: buckets
#    0-2K, 2K-8K, 8K-32K, 32K-128K, 128K+) on the first EVAL_MAX_TOKENS tokens (default 262,144) of
#    EVAL_DOCS held-out documents (default 4, all of them), each streamed through the model a window at a
#    time (evals.perplexity; EVAL_ARGS go to it): OUT/RUN/perplexity. A model without memory sees the
#    tokens before it in its own segment (its window, for full attention); the Infini model is scored
#    a second time with its memory ablated. Past each document's first segment the loss is also cut by
#    where a token sits in its segment, SEGMENT_BINS parts (default 8; 0: not).
# 4. OUT/comparison.json and OUT/comparison.md (costs, training, perplexity by position side by side),
#    and OUT/comparison.png if matplotlib is installed (else the command to draw it elsewhere).
#
# Finished steps are skipped when the command runs again (shards, a run's export, its evaluation), and
# a run stopped part-way resumes from its last checkpoint: under a time limit per command, run the
# same command again; RUNS="infini local" (say) trains and evaluates only those, and the report waits
# until every run is done. LAUNCH is the launcher (e.g. "torchrun --nproc-per-node 2").
#
# SEEDS="1234 2 3" trains and evaluates every run once a seed (the config's `seed`: the initial weights;
# the documents and their order stay those of data.seed), in OUT/seed-<seed>/RUN, and the report gives
# each bucket's perplexity over the seeds (exp of the mean loss) with the lowest and highest seed's. At
# small budgets the initial weights alone can move a run by more than the runs differ. Without SEEDS,
# each run trains once with the config's seed, in OUT/RUN.
#
# CONFIG=configs/experiments/long_context_small.yaml RUNS_FILE=configs/experiments/long_context_small_runs.yaml
# runs the comparison at 19.7M parameters on 6.7 tokens a parameter, where the seeds agree within 2%.
set -euo pipefail

OUT=${1:-runs/long_context}
CORPUS=${CORPUS:-data/corpus}
CONFIG=${CONFIG:-configs/experiments/long_context.yaml}
RUNS_FILE=${RUNS_FILE:-configs/experiments/long_context_runs.yaml}
ALL_RUNS=$(python -m evals.long_context runs --runs "$RUNS_FILE")
RUNS=${RUNS:-$ALL_RUNS}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
LAUNCH=${LAUNCH:-python}
BUCKETS=${BUCKETS:-2k,8k,32k,128k}
EVAL_DOCS=${EVAL_DOCS:-4}
EVAL_MAX_TOKENS=${EVAL_MAX_TOKENS:-262144}
EVAL_ARGS=${EVAL_ARGS:-}
SEGMENT_BINS=${SEGMENT_BINS:-8}
SEEDS=$(python -m evals.long_context seeds "${SEEDS:-}")

started=$(date +%s)
if [ ! -f "$OUT/shards/heldout/index.json" ]; then
    python -m data_pipeline.corpus shards --text "$CORPUS" --out "$OUT/shards" --overwrite
fi
# A seed's runs go to OUT/seed-<seed>, trained with `seed=<seed>` after TRAIN_OVERRIDES; without SEEDS,
# to OUT with the config's seed.
seed_root() { if [ "$1" = default ]; then echo "$OUT"; else echo "$OUT/seed-$1"; fi; }
declare -A run_overrides
for run in $RUNS; do
    run_overrides[$run]=$(python -m evals.long_context overrides "$run" --runs "$RUNS_FILE")
done
for seed in ${SEEDS:-default}; do
    root=$(seed_root "$seed")
    seed_override=""
    [ "$seed" = default ] || seed_override="seed=$seed"
    for run in $RUNS; do
        name=${root#"$OUT"}/$run
        if [ ! -f "$root/$run/export/model_config.yaml" ]; then
            echo "== training ${name#/}: ${seed_override:+$seed_override }${run_overrides[$run]}"
            # shellcheck disable=SC2086  # LAUNCH and the overrides are word lists
            $LAUNCH -m training.train --config "$CONFIG" "run_dir=$root/$run/train" "export.dir=$root/$run/export" \
                "data.sources=[{path: $OUT/shards/train}]" checkpoint.resume=auto $TRAIN_OVERRIDES $seed_override \
                ${run_overrides[$run]}
        fi
        if [ ! -f "$root/$run/perplexity/perplexity.json" ]; then
            echo "== evaluating ${name#/}"
            # shellcheck disable=SC2086  # EVAL_ARGS is a word list
            python -m evals.perplexity --model "$root/$run/export" --shards "$OUT/shards/heldout" \
                --buckets "$BUCKETS" --max-docs "$EVAL_DOCS" --max-doc-tokens "$EVAL_MAX_TOKENS" \
                --segment-bins "$SEGMENT_BINS" --out "$root/$run/perplexity" $EVAL_ARGS
        fi
    done
done
left=""
for seed in ${SEEDS:-default}; do
    root=$(seed_root "$seed")
    for run in $ALL_RUNS; do
        name=${root#"$OUT"}/$run
        [ -f "$root/$run/perplexity/perplexity.json" ] || left="$left ${name#/}"
    done
done
if [ -n "$left" ]; then
    echo "not yet trained and evaluated:$left (RUNS=\"$RUNS\"); the report follows once every run is done"
    exit 0
fi
python -m evals.long_context report "$OUT" --runs "$RUNS_FILE" --seeds "$SEEDS"
if python -c "import matplotlib" 2>/dev/null; then
    python -m evals.long_context plot "$OUT/comparison.json"
else
    echo "matplotlib is not installed here: draw the plot where it is with" \
        "python -m evals.long_context plot $OUT/comparison.json"
fi
echo "done in $(( ($(date +%s) - started) / 60 )) min: $OUT/comparison.md"
