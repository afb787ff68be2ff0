#!/bin/bash
run() { cd $1; shift; local out=$1; shift; PYTHONPATH=$PWD /work/main/.venv/bin/python -m scripts.bench --model qwen2.5-coder-1.5b --threads 2 --cost-max-width 16 --cost-reps 2 --share-prefill --no-plots --out /tmp/runs/$out "$@" > /tmp/runs/$out.log 2>&1; }
CE="--dtype bfloat16 --workloads code-edit --n 3 --max-new-tokens 96 --methods greedy pld refdecode --seed 2"
run WORKTREE_DRAFT_DEPTH_1667d5e depth15-after $CE
run WORKTREE_AFTER depth15-wide $CE
touch /tmp/runs/depth15.done
