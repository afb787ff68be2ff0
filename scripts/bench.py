"""Benchmark refdecode against transformers greedy and prompt lookup: `python -m scripts.bench --quick`.

The same options as `refdecode bench` (see refdecode/bench/cli.py); results go to results/NAME (--out).
"""

import sys

from refdecode.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
