#!/bin/bash
# AB of drafts up to 128 (wt-wide) against 64 (wt-pad), run alone, in ABBA order.
run() { cd $1; shift; local out=$1; shift; PYTHONPATH=$PWD /work/main/.venv/bin/python -m scripts.bench --model qwen2.5-coder-1.5b --threads 2 --cost-max-width 16 --cost-reps 2 --share-prefill --no-plots --out /tmp/runs/$out "$@" > /tmp/runs/$out.log 2>&1; }
CE="--dtype bfloat16 --workloads code-edit --n 3 --max-new-tokens 96 --methods greedy pld refdecode"
run WORKTREE_AFTER wide-ce-s2-after $CE --seed 2
run WORKTREE_BEFORE wide-ce-s2-before $CE --seed 2
run WORKTREE_BEFORE wide-ce-s3-before $CE --seed 3
run WORKTREE_AFTER wide-ce-s3-after $CE --seed 3
L="--dtype bfloat16 --workloads code-edit --n 3 --max-new-tokens 192 --methods greedy pld refdecode --seed 4"
run WORKTREE_AFTER wide-ce192-after $L
run WORKTREE_BEFORE wide-ce192-before $L
F="--dtype float32 --workloads code-edit --n 3 --max-new-tokens 96 --methods greedy pld refdecode --seed 2"
run WORKTREE_BEFORE wide-f32-before $F
run WORKTREE_AFTER wide-f32-after $F
O="--dtype bfloat16 --workloads code-edit-ref rag summarize chat --n 2 --max-new-tokens 64 --methods greedy pld refdecode --seed 5"
run WORKTREE_AFTER wide-other-after $O
run WORKTREE_BEFORE wide-other-before $O
touch /tmp/runs/wide-ab.done
