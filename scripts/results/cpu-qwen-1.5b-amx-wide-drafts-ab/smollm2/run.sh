#!/bin/bash
run() { cd $1; shift; local out=$1; shift; PYTHONPATH=$PWD /work/main/.venv/bin/python -m scripts.bench --model smollm2-135m --threads 2 --share-prefill --no-plots --out /tmp/runs/$out "$@" > /tmp/runs/$out.log 2>&1; }
S="--workloads code-edit code-edit-ref rag chat --n 3 --max-new-tokens 64 --methods greedy pld refdecode --seed 2"
run WORKTREE_AFTER smol-wide-after $S
run WORKTREE_BEFORE smol-wide-before $S
touch /tmp/runs/smol-wide.done
