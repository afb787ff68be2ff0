#!/bin/bash
run() { cd $1; shift; local out=$1; shift; PYTHONPATH=$PWD /work/main/.venv/bin/python -m scripts.bench --model smollm2-135m --threads 2 --share-prefill --no-plots --out /tmp/runs/$out "$@" > /tmp/runs/$out.log 2>&1; }
S="--workloads code-edit-ref rag --n 3 --max-new-tokens 64 --methods greedy pld refdecode --seed 2"
run WORKTREE_TRIE_BANDS_2771e3e band-after $S
run WORKTREE_AFTER band-before $S
run WORKTREE_BEFORE band-old $S
touch /tmp/runs/band.done
#!/bin/bash
run() { cd $1; shift; local out=$1; shift; PYTHONPATH=$PWD /work/main/.venv/bin/python -m scripts.bench --model smollm2-135m --threads 2 --share-prefill --no-plots --out /tmp/runs/$out "$@" > /tmp/runs/$out.log 2>&1; }
S="--workloads code-edit-ref rag code-edit --n 3 --max-new-tokens 64 --methods greedy pld refdecode --seed 2"
run WORKTREE_DRAFT_DEPTH_1667d5e depth-after $S
run WORKTREE_BEFORE depth-old $S
touch /tmp/runs/depth.done
