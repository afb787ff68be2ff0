"""`refdecode index build|info|search`: the corpus index commands, added to the main CLI's subparsers.

Each command function takes the parsed arguments and returns an exit code. Expected failures (a missing source,
an empty corpus, a non-UTF-8 file, a corrupt or truncated index, another tokenizer, an unknown format version, an
existing output without --force, an output that is not an index or overlaps a source) print one line to stderr
and return 1; an interrupted build returns 130. None prints a traceback: an unexpected exception is reported in
one line too, named as a bug. This module knows argument parsing and printing; the work is in index.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .embedding import EMBEDDERS, HASHED_DIM
from .passage_index import COMPRESSED_KINDS, FLAT_LIMIT_BYTES, parse_bytes

__all__ = ["add_index_commands", "cmd_index_build", "cmd_index_info", "cmd_index_search", "stage_lines"]

_EXPECTED = (ValueError, OSError, RuntimeError, ImportError)  # ImportError: an extra that is not installed


def _load_tokenizer(name: str):
    from ..models import load_tokenizer

    return load_tokenizer(name)


def _fail(err: BaseException) -> int:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not isinstance(err, _EXPECTED):  # a bug of ours: still one line, but say so
        message = f"unexpected {type(err).__name__} (please report this): {message}"
    print(f"refdecode index: error: {message}", file=sys.stderr)
    return 1


def cmd_index_build(args: argparse.Namespace) -> int:
    from .index import build_index

    try:
        t0 = time.perf_counter()
        tokenizer = _load_tokenizer(args.model)
        out = build_index(
            args.sources,
            args.out,
            tokenizer=tokenizer,
            model_name=args.model,
            field=args.field,
            chunk_tokens=args.chunk_tokens,
            dedup_threshold=args.dedup_threshold,
            force=args.force,
            progress=not args.quiet,
            embedder=args.embedder,
            flat_limit=args.flat_limit,
            compressed=args.compressed,
            hashed_dim=args.hashed_dim,
            engine="local" if args.ray is None else "ray",
            ray_address=args.ray or None,
        )
        from .format import read_manifest

        manifest = read_manifest(out)
        counts, passage_index = manifest["counts"], manifest["passage_index"]
        seconds = time.perf_counter() - t0
        kind = passage_index["kind"]
        if kind != "flat":
            kind += f" (nprobe {passage_index['nprobe']}, recall@10 {passage_index['recall_at_10']})"
        engine = manifest["build_options"].get("engine", "local")
        print(
            f"built {out} ({engine} engine): {counts['documents']} documents, {counts['tokens']:,} tokens, "
            f"{counts['passages']} passages ({counts['duplicates_removed']} near-duplicates removed), span index "
            f"{counts['span_bytes'] / max(counts['span_tokens'], 1):.1f} bytes/token in "
            f"{len(manifest['span_partitions'])} partition(s), {kind} passage index, {seconds:.1f} s"
        )
        if manifest.get("build_stats"):
            print("\n".join(stage_lines(manifest["build_seconds"], manifest["build_stats"])))
        return 0
    except KeyboardInterrupt:
        print(
            "refdecode index: interrupted; no index was written (an index already at --out is unchanged)",
            file=sys.stderr,
        )
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's promise: one line, never a traceback
        return _fail(err)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def stage_lines(seconds: dict[str, float], stats: dict) -> list[str]:
    """The per-stage figures of a build's manifest (build_seconds, build_stats) as an aligned table: wall and task
    seconds, rows and megabytes in and out, megabytes shuffled. -> lines"""
    head = f"  {'stage':15s}{'wall s':>8s}{'task s':>9s}{'rows in':>13s}{'rows out':>13s}{'MB in':>10s}{'MB out':>10s}"
    lines = [f"{head}{'MB shuffled':>13s}   ({stats.get('nodes', 1)} node(s), {stats.get('cpus', '?')} CPUs)"]
    for stage, f in stats.get("stages", {}).items():
        lines.append(
            f"  {stage:15s}{seconds.get(stage, 0.0):8.1f}{f.get('task_seconds', 0.0):9.1f}{f.get('rows_in', 0):13,d}"
            f"{f.get('rows_out', 0):13,d}{_mb(f.get('bytes_in', 0)):>10s}{_mb(f.get('bytes_out', 0)):>10s}"
            f"{_mb(f.get('shuffle_bytes', 0)):>13s}"
        )
    return lines


def _byte_size(text: str) -> int:
    """argparse type for --flat-limit: a size like 512M or 2G, refused in one line otherwise."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load(args: argparse.Namespace):
    from .index import CorpusIndex

    tokenizer = _load_tokenizer(args.model) if getattr(args, "model", None) else None
    return CorpusIndex.load(args.index, tokenizer=tokenizer, checksums=not args.no_checksums)


def cmd_index_info(args: argparse.Namespace) -> int:
    try:
        info = _load(args).info()
    except Exception as err:  # noqa: BLE001 - the CLI's promise: one line, never a traceback
        return _fail(err)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:22s} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    try:
        if args.rerank and not args.model:
            raise ValueError("--rerank needs --model: the model that reranks the passages")
        if args.rerank < 0:
            raise ValueError(f"--rerank must be >= 0, got {args.rerank}")
        index = _load(args)
        reranker = None
        if args.rerank:
            from ..models import load_model
            from .rerank import LMReranker

            reranker = LMReranker(*load_model(args.model))
        passages = index.retrieve(args.query, k=args.k, reranker=reranker, candidates=args.rerank or 1)
    except Exception as err:  # noqa: BLE001 - the CLI's promise: one line, never a traceback
        return _fail(err)
    if args.json:
        print(
            json.dumps(
                [{"id": p.id, "score": p.score, "source": p.source, "text": p.text} for p in passages],
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    for rank, p in enumerate(passages, 1):
        print(f"[{rank}] passage {p.id}  score {p.score:.3f}  {p.source}")
        print("    " + p.text.strip()[: args.chars].replace("\n", "\n    "))
    return 0


def add_index_commands(subparsers) -> argparse.ArgumentParser:
    """Add `index build|info|search` to an argparse subparsers object; each sets `func` to its command."""
    parser = subparsers.add_parser("index", help="build and inspect corpus indexes")
    sub = parser.add_subparsers(dest="index_command", required=True)

    build = sub.add_parser("build", help="build a corpus index from files and folders")
    build.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="folders, .txt/.md/.rst files, .jsonl files (any of them .gz), .parquet files, quoted glob patterns",
    )
    build.add_argument("--out", required=True, help="index folder to create, e.g. indexes/NAME")
    build.add_argument("--model", required=True, help="model whose tokenizer the index uses")
    build.add_argument("--field", default="text", help="JSONL field or Parquet column holding the text (default: text)")
    build.add_argument("--chunk-tokens", type=int, default=256, help="passage size in tokens (default: 256)")
    build.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.9,
        help="MinHash Jaccard above which a passage is a near-duplicate (default: 0.9)",
    )
    build.add_argument(
        "--embedder",
        choices=EMBEDDERS,
        default=None,
        help="passage embedding (default: minilm if installed, else hashed)",
    )
    build.add_argument(
        "--flat-limit",
        type=_byte_size,
        default=FLAT_LIMIT_BYTES,
        metavar="BYTES",
        help="largest passage-vector size kept as an exact flat faiss index; above it --compressed "
        "(512M, 2G, ...; default: 1G)",
    )
    build.add_argument(
        "--compressed",
        choices=COMPRESSED_KINDS,
        default=COMPRESSED_KINDS[0],
        help="passage index above --flat-limit: fastscan (4-bit IVF-PQ fast-scan re-ranked exactly against the "
        "stored vectors: fast, codes in memory) or ivfpq (8-bit IVF-PQ, lists on disk: least memory, slower); "
        "default: fastscan",
    )
    build.add_argument(
        "--hashed-dim",
        type=int,
        default=HASHED_DIM,
        metavar="N",
        help=f"dimensions of --embedder hashed (default: {HASHED_DIM}); a small N such as 256 makes it a cheap "
        "embedder for testing builds at scale, not one for retrieval quality",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="replace an existing index at --out (only ever a refdecode index, never other files)",
    )
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="build on Ray (pip install 'refdecode[ray]'): alone, on a local Ray on this machine's cores; with "
        "ADDRESS (auto, HOST:PORT, ray://HOST:PORT), on that cluster. Put it after the sources, or write --ray=ADDRESS",
    )
    build.set_defaults(func=cmd_index_build)

    for name, helptext, func in (
        ("info", "show an index's manifest and counts", cmd_index_info),
        ("search", "retrieve the passages nearest a query", cmd_index_search),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("index", help="index folder")
        if name == "search":
            p.add_argument("query", help="query text")
            p.add_argument("-k", type=int, default=4, help="passages to show (default: 4)")
            p.add_argument("--chars", type=int, default=400, help="characters of each passage to print")
            p.add_argument(
                "--rerank",
                type=int,
                default=0,
                metavar="N",
                help="let --model rerank the embedding search's top N passages (default: 0, off)",
            )
        p.add_argument("--model", default=None, help="check the index was built for this model's tokenizer")
        p.add_argument("--no-checksums", action="store_true", help="check file sizes only, not SHA-256")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m refdecode.corpus.cli index ...`) until the main CLI wires this in."""
    parser = argparse.ArgumentParser(prog="refdecode")
    add_index_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
