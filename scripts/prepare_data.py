"""Fetch the benchmark data into the local cache and print what is there.

    python -m scripts.prepare_data [--only NAME ...]

Sources and layout are described in `refdecode.bench.data`; the cache root is `$REFDECODE_DATA`
(default ~/.cache/refdecode/data). Already fetched sources are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refdecode.bench import data

# source name -> (what is counted, reader)
COUNTS = {
    "aclsum": ("papers", data.aclsum_pairs),
    "python_docs": ("reST files", data.python_docs_files),
    "sharegpt": ("conversations", data.sharegpt_conversations),
    "chitchat": ("dialogs", data.chitchat_dialogs),
    "humaneval": ("problems", data.humaneval_problems),
    "code_edits": ("changed file pairs", data.code_edit_pairs),
}


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summarize(names: list[str]) -> None:
    print(f"data root: {data.data_root()}")
    for name in names:
        what, reader = COUNTS[name]
        size_mb = folder_size(data.data_root() / name) / 1e6
        line = f"  {name:12s} {len(reader()):6d} {what:20s} {size_mb:8.1f} MB"
        if name == "python_docs":
            line += f"   ({len(data.faq_pairs())} FAQ questions)"
        print(line)
    try:
        print(
            f"  {'spec_bench':12s} {len(data.spec_bench_questions()):6d} questions            "
            f"({data.spec_bench_path()})"
        )
    except FileNotFoundError as e:
        print(f"  spec_bench: {e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch refdecode's benchmark data into the local cache.")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(data.SOURCES),
        metavar="NAME",
        help=f"fetch only these sources ({', '.join(data.SOURCES)})",
    )
    parser.add_argument("--quiet", action="store_true", help="do not report each step on stderr")
    args = parser.parse_args(argv)
    names = args.only or list(data.SOURCES)
    try:
        data.fetch_all(progress=not args.quiet, names=names)
        summarize(names)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
