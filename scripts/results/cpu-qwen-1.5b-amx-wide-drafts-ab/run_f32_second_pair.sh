#!/bin/bash
run() { cd $1; shift; local out=$1; shift; PYTHONPATH=$PWD /work/main/.venv/bin/python -m scripts.bench --model qwen2.5-coder-1.5b --threads 2 --cost-max-width 16 --cost-reps 2 --share-prefill --no-plots --out $OUT/$out "$@" > /tmp/runs/$out.log 2>&1; }
F="--dtype float32 --workloads code-edit --n 3 --max-new-tokens 96 --methods greedy pld refdecode --seed 2"
run WORKTREE_AFTER wide-f32-after2 $F
run WORKTREE_BEFORE wide-f32-before2 $F
touch /tmp/runs/wide-f32b.done
