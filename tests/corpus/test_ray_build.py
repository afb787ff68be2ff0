"""build_index(engine="ray") writes the files the local build writes (format version 3, byte for byte) on the
corpora of the corpus tests; dedup and the span order do not depend on partitioning; Parquet and glob sources; the
local build's one-line errors, from Python and from the CLI; embedding actors are released after each build; a
failed task or a killed driver leaves the old index, and a rerun succeeds; the per-stage figures (build_stats) add
up; the workers that ran a build never imported torch.

All of them share one local Ray of 2 CPUs (the session fixture `ray_local`), so each build here costs about a
second once its workers have started."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import QUERIES, WORDS, answers, build, gen_dir, span_contexts, tree, write_corpus

import refdecode.corpus.cli as cli
import refdecode.corpus.index as index_module
from refdecode.corpus import CorpusIndex, build_index
from refdecode.corpus.dedup import find_near_duplicates
from refdecode.corpus.spans import build_suffix_order, encode_stream
from refdecode.corpus.testing import WordTokenizer

# one xdist group: every Ray test runs in the same worker, so a parallel suite starts one Ray, not one per worker
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray"), pytest.mark.usefixtures("ray_local")]


# -- corpora: those of test_corpus_index.py and index_helpers.py ------------------------------------------------------


def random_words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def corpus_random(src: Path) -> dict:
    """index_helpers' corpus with one document copied (exact duplicates) and one edited (near-duplicates), its
    suffix order cut into partitions of 64 entries."""
    write_corpus(src, 0)
    text = (src / "doc1.md").read_text()
    (src / "copy.md").write_text(text)
    (src / "near.md").write_text(text.replace("\n\n", " zzz\n\n", 1))
    return {"partition_entries": 64}


def corpus_mixed(src: Path) -> dict:
    """Markdown, a text file in a subfolder, a file that is not a source, JSONL (text under "body"), gzip."""
    rng = np.random.default_rng(0)
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        (src / f"doc{i}.md").write_text("\n\n".join(random_words(rng, 60) for _ in range(3)) + "\n")
    (src / "sub" / "planted.txt").write_text("The zyxwv compressor folds quantum marmalade into origami.\n")
    (src / "notes.bin").write_bytes(b"\xff\xfe ignored: not a source suffix")
    lines = [json.dumps({"body": f"record {i} talks about mango and {WORDS[i]}"}) for i in range(5)]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(src / "b.md.gz", "wt", encoding="utf-8") as f:
        f.write("compressed markdown about peach\n\n# Heading\n\nmore peach\n")
    return {"field": "body", "hashed_dim": 64}


def corpus_planted_duplicates(src: Path) -> dict:
    """One passage four times with one word changed in each, and unrelated ones."""
    rng = np.random.default_rng(1)
    src.mkdir(parents=True)
    base = random_words(rng, 120).split()
    for i in range(4):
        words = list(base)
        words[5 + 30 * i] = "changed"
        (src / f"copy{i}.txt").write_text(" ".join(words))
    for i in range(3):
        (src / f"other{i}.txt").write_text(random_words(rng, 30) + f" unique{i}")
    return {"dedup_threshold": 0.8, "chunk_tokens": 256}


def corpus_wide_vocab(src: Path) -> dict:
    """A vocabulary over 65535 ids: a uint32 stream (two tokens per sort-key column), many repeated windows."""
    write_corpus(src, 3, docs=4, words=240)
    return {"tokenizer": WordTokenizer(vocab_size=70_000)}


CORPORA = {
    "random": corpus_random,
    "mixed": corpus_mixed,
    "planted_duplicates": corpus_planted_duplicates,
    "wide_vocab": corpus_wide_vocab,
}


def build_both(sources: list, tmp_path: Path, **kw) -> tuple[CorpusIndex, CorpusIndex]:
    tok = kw.pop("tokenizer", WordTokenizer())
    kw = {"embedder": "hashed", "chunk_tokens": 32, **kw}
    common = dict(tokenizer=tok, model_name="toy", progress=False, **kw)
    local = build_index(sources, tmp_path / "local", **common)
    ray = build_index(sources, tmp_path / "ray", engine="ray", **common)
    return CorpusIndex.load(local, tokenizer=tok), CorpusIndex.load(ray, tokenizer=tok)


def probes(index: CorpusIndex, rng, n_passages: int = 8, n_random: int = 100) -> list[list[int]]:
    """1..16-token tails ending at every position of sampled passages, and random sequences of the corpus' ids."""
    out = []
    for i in rng.choice(len(index), size=min(n_passages, len(index)), replace=False).tolist():
        ids = index.passage(i).token_ids
        out += [ids[max(0, j - n + 1) : j + 1] for j in range(len(ids)) for n in (1, 2, 4, 16)]
    stream = np.asarray(index.spans.stream)
    vocab = np.unique(stream[stream > 0]) - 1
    out += [rng.choice(vocab, size=rng.integers(1, 17)).tolist() for _ in range(n_random)]
    return out


def assert_same_index(local: CorpusIndex, ray: CorpusIndex, rng) -> None:
    """Byte-identical data files, the same manifest apart from the engine and timings, the same answers."""
    local_files, ray_files = tree(gen_dir(local.path)), tree(gen_dir(ray.path))
    assert sorted(ray_files) == sorted(local_files)
    for name, data in local_files.items():
        assert ray_files[name] == data, name
    ignore = ("generation", "build_seconds", "build_stats", "build_options", "files")
    assert {k: v for k, v in ray.manifest.items() if k not in ignore} == {
        k: v for k, v in local.manifest.items() if k not in ignore
    }
    assert ray.manifest["files"] == local.manifest["files"]  # sizes and SHA-256
    assert ray.manifest["build_options"] == {**local.manifest["build_options"], "engine": "ray"}
    assert ray.manifest["version"] == 3
    for tail in probes(local, rng):
        want = local.span_continuations(tail, 8, max_candidates=8, min_match=1)
        assert ray.span_continuations(tail, 8, max_candidates=8, min_match=1) == want, tail
    for q in [*QUERIES, *(local.passage(i).text for i in range(0, len(local), 3))]:
        assert [(p.id, p.score) for p in ray.retrieve(q, k=5)] == [(p.id, p.score) for p in local.retrieve(q, k=5)]


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_ray_build_writes_the_local_builds_files(tmp_path, name):
    options = CORPORA[name](tmp_path / "src")
    local, ray = build_both([tmp_path / "src"], tmp_path, **options)
    assert_same_index(local, ray, np.random.default_rng(7))
    assert set(ray.manifest["build_seconds"]) >= {"tokenize_chunk", "dedup", "span_index", "embed"}
    if name == "random":
        assert local.manifest["counts"]["duplicates_removed"] >= 3  # the copy's and the near copy's passages
        assert len(ray.manifest["span_partitions"]) > 2
        assert_stage_figures(ray, tmp_path / "src")
        assert "build_stats" not in local.manifest and "build_stats" not in local.info()
    if name == "planted_duplicates":
        assert ray.manifest["counts"]["duplicates_removed"] == 3
    if name == "wide_vocab":
        assert ray.spans.stream.dtype == np.uint32
    if name == "mixed":
        assert ray.manifest["embedder"] == {"name": "hashed", "dim": 64}


def assert_stage_figures(index: CorpusIndex, src: Path) -> None:
    """build_stats: each stage's rows and bytes agree with what the index holds and the sources weigh; the two
    shuffles report at least the bytes of the rows they sort; the tasks report their time."""
    m, dim = index.manifest, index.manifest["embedder"]["dim"]
    stats, counts = m["build_stats"], m["counts"]
    assert index.info()["build_stats"] == stats and index.info()["build_seconds"] == m["build_seconds"]
    assert (stats["engine"], stats["nodes"], stats["cpus"]) == ("ray", 1, 2)
    stages = stats["stages"]
    assert list(stages) == ["tokenize_chunk", "dedup", "passages", "embed", "span_index", "write"]
    assert set(m["build_seconds"]) == set(stages)
    read, dedup, spans, embed = stages["tokenize_chunk"], stages["dedup"], stages["span_index"], stages["embed"]
    all_passages = counts["passages"] + counts["duplicates_removed"]
    assert read["rows_in"] == counts["files"] and read["bytes_in"] == sum(p.stat().st_size for p in src.rglob("*.*"))
    assert read["rows_out"] == all_passages  # every document of this corpus has passages
    assert dedup["rows_in"] == all_passages and dedup["shuffle_bytes"] > 0
    # the sort's rows: a key range (int32) and a position (uint32), for every position of the stream but separators
    assert spans["rows_in"] == index.spans.stream.size and spans["rows_out"] == counts["span_tokens"]
    assert spans["shuffle_bytes"] >= 8 * counts["span_tokens"]
    assert embed["rows_in"] == embed["rows_out"] == counts["passages"]
    assert embed["bytes_out"] == 4 * dim * counts["passages"]
    store = ("passage_text.bin", "passage_text_offsets.npy", "passage_tokens.npy", "passage_source.npy", "sources.json")
    assert stages["passages"]["bytes_out"] == sum(m["files"][name]["bytes"] for name in store)
    for stage in ("tokenize_chunk", "dedup", "embed", "span_index"):
        assert stages[stage]["task_seconds"] > 0 and stages[stage]["bytes_out"] > 0, stage
    assert stages["passages"]["task_seconds"] == stages["write"]["task_seconds"] == 0  # the driver's own


# -- the stages on their own: partitioning never changes the answer --------------------------------------------------


def planted_passages(rng, n: int = 120) -> list[np.ndarray]:
    """Random passages, half of them copies of earlier ones with a few tokens changed (chains of near-copies)."""
    out: list[np.ndarray] = []
    for _ in range(n):
        if out and rng.random() < 0.5:
            p = out[rng.integers(len(out))].copy()
            p[rng.integers(p.size, size=rng.integers(0, 4))] = rng.integers(50)
        else:
            p = rng.integers(50, size=rng.integers(8, 60))
        out.append(p)
    return out


def test_dedup_on_ray_decides_as_the_local_dedup_for_any_partitioning(ray_local):
    import pyarrow as pa

    from refdecode.corpus.ray_build import dedup_on_ray, ray_session

    rng = np.random.default_rng(3)
    passages = planted_passages(rng)
    table = pa.table({"pid": np.arange(len(passages)), "tokens": [p.astype(np.int32).tobytes() for p in passages]})
    for threshold, blocks in ((0.5, 1), (0.8, 5)):
        want = find_near_duplicates(passages, threshold=threshold)
        assert want.size > 10
        shuffled = table.take(rng.permutation(len(passages)))  # rows in any order, in any blocks
        step = -(-len(passages) // blocks)
        figures: dict = {}
        with ray_session(progress=False):  # a dataset keeps the Ray Data settings of where it was made: in here
            ds = ray_local.data.from_arrow([shuffled.slice(lo, step) for lo in range(0, len(passages), step)])
            got = dedup_on_ray(ds, len(passages), threshold=threshold, stats=figures)
        assert np.array_equal(got, want), (threshold, blocks)
        assert figures["rows_in"] == len(passages) and figures["shuffle_bytes"] > 0 and figures["rows_out"] > 0


@pytest.mark.parametrize("vocab", [60_000, 70_000])
def test_sorted_span_blocks_are_the_local_suffix_order(vocab):
    """Any number of key ranges (one; a few; more than there are distinct windows, so that runs of equal windows
    are cut by position) gives build_suffix_order's order, and only (range, position) rows are shuffled."""
    from refdecode.corpus.ray_build import ray_session, sorted_span_blocks

    rng = np.random.default_rng(vocab)
    base = rng.integers(vocab, size=40)
    docs = [
        np.concatenate([base[: rng.integers(10, 40)], rng.integers(vocab, size=rng.integers(0, 30))]) for _ in range(30)
    ]
    docs += [np.full(60, 7)] * 3  # one window repeated ~170 times: a run longer than a range
    stream = encode_stream(docs, vocab)  # shared prefixes: many equal windows, ties broken by position
    stream[1:9] = vocab  # the largest id: for uint16, sort keys with the top bit set
    for followed_only, blocks, ranges in ((False, 1, 1), (True, 4, 5), (False, 3, 300)):
        want = build_suffix_order(stream, followed_only=followed_only)
        figures: dict = {}
        with ray_session(progress=False):
            span_blocks = sorted_span_blocks(
                stream, followed_only=followed_only, blocks=blocks, ranges=ranges, stats=figures
            )
            got = np.concatenate(list(span_blocks))
        assert got.dtype == want.dtype and np.array_equal(got, want), (followed_only, blocks, ranges)
        assert figures["rows_in"] == stream.size and figures["rows_out"] == want.size
        assert 8 * want.size <= figures["shuffle_bytes"] < 16 * want.size  # int32 range + uint32 position


def test_sorted_span_blocks_of_a_stream_on_disk(tmp_path, monkeypatch):
    """A memory-mapped stream is put into the object store as a plain array (a memmap would be pickled, copied by
    every task), and sorts as the one in memory."""
    import ray

    from refdecode.corpus.ray_build import ray_session, sorted_span_blocks

    rng = np.random.default_rng(3)
    stream = encode_stream([rng.integers(20, size=rng.integers(5, 60)) for _ in range(40)], 20)
    np.save(tmp_path / "stream.npy", stream)
    on_disk = np.load(tmp_path / "stream.npy", mmap_mode="r")
    put = ray.put
    kinds = []
    monkeypatch.setattr(ray, "put", lambda value, **kw: kinds.append(type(value)) or put(value, **kw))
    with ray_session(progress=False):
        got = np.concatenate(list(sorted_span_blocks(on_disk, ranges=3)))
    assert np.array_equal(got, build_suffix_order(stream))
    assert [k for k in kinds if issubclass(k, np.ndarray)] == [np.ndarray]  # Ray Data puts its own objects too


def test_object_store_budget_covers_the_sort_and_is_scoped(monkeypatch):
    """The span sort's datasets are made under an object-store budget that holds its rows grouped and sorted (Ray
    Data's default share of the store ran the per-range sort one task at a time once the shuffle outgrew it); the
    driver's context is left as it was, and a budget above the requested one is kept."""
    import ray

    from refdecode.corpus import ray_build
    from refdecode.corpus.ray_build import _object_store_budget, ray_session, sorted_span_blocks

    with ray_session(progress=False):
        ctx = ray.data.DataContext.get_current()
        store = ray.cluster_resources()["object_store_memory"]
        before = ctx.override_object_store_memory_limit_fraction
        with _object_store_budget(ray, int(3 * store)):
            assert ctx.override_object_store_memory_limit_fraction == pytest.approx(3.0)
            made_inside = ray.data.range(4)
        assert ctx.override_object_store_memory_limit_fraction == before
        assert made_inside.context.override_object_store_memory_limit_fraction == pytest.approx(3.0)
        ctx.override_object_store_memory_limit_fraction = 5.0
        try:
            with _object_store_budget(ray, int(3 * store)):
                assert ctx.override_object_store_memory_limit_fraction == 5.0
        finally:
            ctx.override_object_store_memory_limit_fraction = before

        asked = []
        scoped = ray_build._object_store_budget
        monkeypatch.setattr(
            ray_build, "_object_store_budget", lambda r, nbytes: asked.append(nbytes) or scoped(r, nbytes)
        )
        stream = encode_stream([[1, 2, 3, 1, 2]] * 5, 4)
        assert np.array_equal(np.concatenate(list(sorted_span_blocks(stream, ranges=2))), build_suffix_order(stream))
        assert asked == [2 * 2 * stream.size * 8]  # int32 range + uint32 position, grouped and sorted


def test_range_bounds_cut_the_order_evenly_and_are_seeded():
    """The cuts are quantiles of a seeded sample of the keys: about equal ranges, the same cuts every time."""
    from refdecode.corpus.ray_build import _order_keys, _range_bounds

    rng = np.random.default_rng(1)
    stream = encode_stream([rng.integers(50, size=rng.integers(100, 400)) for _ in range(200)], 50)
    bounds = _range_bounds(stream, 8, followed_only=False)
    assert np.array_equal(bounds, _range_bounds(stream, 8, followed_only=False))
    assert bounds.size == 7 and np.all(bounds[1:] > bounds[:-1])
    order = build_suffix_order(stream)
    sizes = np.bincount(np.searchsorted(bounds, _order_keys(stream, order.astype(np.int64)), side="right"))
    assert sizes.size == 8 and sizes.min() > 0.7 * order.size / 8 and sizes.max() < 1.3 * order.size / 8


def test_embedding_actors_are_released_after_success_and_failure(ray_local, monkeypatch):
    """The actor pool (what a sentence encoder uses) with the hashed embedder: the vectors are the local ones, and
    both CPUs are free again once the vectors are computed, whether the batches succeeded or failed. One batch, so
    one actor: each actor is a fresh worker process, the costliest thing in this file."""
    from refdecode.corpus.embedding import HashedNgramEmbedder
    from refdecode.corpus.ray_build import FAIL_ENV, embedding_blocks, ray_session

    rng = np.random.default_rng(0)
    texts = [random_words(rng, 30) for _ in range(60)]
    embedder = HashedNgramEmbedder(256).fit(texts)

    def cpus_free_soon() -> bool:
        deadline = time.monotonic() + 10  # ray.kill is asynchronous: the raylet frees the CPUs a moment later
        while time.monotonic() < deadline:
            if ray_local.available_resources().get("CPU", 0) >= 2:
                return True
            time.sleep(0.1)
        return False

    with ray_session(progress=False):
        figures: dict = {}
        blocks = embedding_blocks(texts, embedder.config(), idf=embedder.idf, actors=True, stats=figures)
        assert cpus_free_soon()
        assert np.array_equal(np.concatenate(list(blocks())), embedder.embed(texts))
        assert figures["task_seconds"] > 0
        monkeypatch.setenv(FAIL_ENV, "embed")
        failed = embedding_blocks(texts, embedder.config(), idf=embedder.idf, actors=True)
        assert cpus_free_soon()
        with pytest.raises(ray_local.exceptions.RayError, match="injected failure"):
            list(failed())


# -- sources, errors, the CLI, Ray's lifecycle ------------------------------------------------------------------------


def test_parquet_and_glob_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    shards = tmp_path / "src" / "shards"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(3):
        texts = [random_words(rng, 50) for _ in range(4)] + ["", None]
        pq.write_table(pa.table({"text": texts, "n": list(range(6))}), shards / f"part{i}.parquet")
    (shards / "extra.jsonl").write_text(json.dumps({"text": random_words(rng, 40)}) + "\n")
    (shards / "skip.md").write_text("not matched by the pattern")
    local, ray = build_both([str(shards / "*.[pj]*")], tmp_path)
    assert local.manifest["counts"]["files"] == 4 and local.manifest["counts"]["documents"] == 13
    assert local.passage(0).source == f"{shards / 'extra.jsonl'}:1"  # sorted: extra.jsonl, part0..2
    assert_same_index(local, ray, np.random.default_rng(1))
    with pytest.raises(FileNotFoundError, match=r"matches no text, markdown, reST, JSONL or Parquet file"):
        build_index([str(tmp_path / "*.nothing")], tmp_path / "none", tokenizer=WordTokenizer(), model_name="toy")
    assert not (tmp_path / "none").exists()


def bad_sources(folder: Path) -> dict[str, Path]:
    """Files each build refuses: not UTF-8, invalid JSON, no such field, a non-string column, not Parquet."""
    folder.mkdir()
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (folder / "nofield.jsonl").write_text('{"body": "x"}\n')
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), folder / "ints.parquet")
    (folder / "garbage.parquet").write_bytes(b"PAR1 not really")
    return {p.name: p for p in folder.iterdir()}


def test_bad_files_fail_the_ray_build_with_the_local_builds_error(tmp_path):
    for name, path in bad_sources(tmp_path / "bad").items():
        with pytest.raises((ValueError, OSError)) as local:
            build(path, tmp_path / "local")
        with pytest.raises(type(local.value)) as ray:
            build(path, tmp_path / "ray", engine="ray")
        assert str(ray.value) == str(local.value) and str(path) in str(ray.value), name
        assert not (tmp_path / "ray").exists() and not (tmp_path / "local").exists()


def test_cli_builds_on_ray_and_reports_bad_files_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_tokenizer", lambda name: WordTokenizer())
    src = write_corpus(tmp_path / "src", 2, docs=3)
    argv = ["index", "build", str(src), "--out", str(tmp_path / "idx"), "--model", "toy", "--embedder", "hashed"]
    assert cli.main([*argv, "--quiet", "--ray"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"built {tmp_path / 'idx'} (ray engine): 3 documents")
    table = out.splitlines()[1:]  # the per-stage figures, a line each
    assert "MB shuffled" in table[0] and "1 node(s), 2 CPUs" in table[0]
    stages = ["tokenize_chunk", "dedup", "passages", "embed", "span_index", "write"]
    assert [line.split()[0] for line in table[1:]] == stages
    assert CorpusIndex.load(tmp_path / "idx").manifest["build_options"]["engine"] == "ray"
    bad = bad_sources(tmp_path / "bad")
    for name, message in (
        ("broken.jsonl", f"{bad['broken.jsonl']}:2: not valid JSON (Expecting value)"),
        ("latin1.txt", f"{bad['latin1.txt']} is not UTF-8 text (byte 3); convert it or leave it out"),
    ):
        out_dir = tmp_path / f"bad_{name}"
        code = cli.main(["index", "build", str(bad[name]), "--out", str(out_dir), "--model", "toy", "--quiet", "--ray"])
        _, err = capsys.readouterr()
        assert code == 1 and err.strip() == f"refdecode index: error: {message}", err
        assert not out_dir.exists()


def test_a_ray_the_caller_started_is_used_and_left_running_and_options_reach_the_writers(
    tmp_path, ray_local, monkeypatch
):
    seen = []
    write = index_module.write_passage_index

    def recording(*args, **kw):
        seen.append((kw["flat_limit_bytes"], kw["compressed"]))
        return write(*args, **kw)

    monkeypatch.setattr(index_module, "write_passage_index", recording)
    src = write_corpus(tmp_path / "src", 4, docs=2)
    out = build(src, tmp_path / "idx", engine="ray", flat_limit=12345, compressed="ivfpq")
    assert seen == [(12345, "ivfpq")]
    assert ray_local.is_initialized() and ray_local.data.range(3).count() == 3
    assert CorpusIndex.load(out).manifest["passage_index"] == {"kind": "flat"}  # too few passages for IVF-PQ
    with pytest.raises(ValueError, match="ray_address is only for engine='ray'"):
        build(tmp_path / "src", tmp_path / "idx2", ray_address="auto")
    with pytest.raises(ValueError, match="engine must be one of"):
        build(tmp_path / "src", tmp_path / "idx2", engine="spark")


def test_the_workers_that_ran_a_build_never_imported_torch(tmp_path, ray_local):
    """The task functions live in refdecode.corpus.*, whose import runs refdecode/__init__.py: lazy, it imports no
    torch, so neither does a worker (each would otherwise hold a few hundred MB of it)."""
    build(write_corpus(tmp_path / "src", 9, docs=3), tmp_path / "idx", engine="ray")

    def probe():
        time.sleep(0.2)  # long enough that the probes occupy both CPUs' workers at once
        return os.getpid(), sorted(m for m in ("torch", "transformers") if m in sys.modules)

    seen = ray_local.get([ray_local.remote(num_cpus=1)(probe).remote() for _ in range(4)])
    assert {pid for pid, _ in seen} and all(loaded == [] for _, loaded in seen), seen


# -- faults ------------------------------------------------------------------------------------------------------------


def test_a_failed_task_fails_the_build_and_keeps_the_old_index(tmp_path, monkeypatch):
    from refdecode.corpus.ray_build import FAIL_ENV

    stage = "embed"

    src = write_corpus(tmp_path / "src", 6, docs=3)
    out = build(src, tmp_path / "idx")  # the old index (a local build)
    contexts = span_contexts(src, 3)
    before, files_before = answers(CorpusIndex.load(out), contexts), tree(out)
    monkeypatch.setenv(FAIL_ENV, stage)
    with pytest.raises(RuntimeError, match=f"^injected failure in the Ray stage '{stage}'"):
        build(src, out, engine="ray", force=True)
    with pytest.raises(RuntimeError, match="^injected failure"):
        build(src, tmp_path / "fresh", engine="ray")
    assert tree(out) == files_before and answers(CorpusIndex.load(out), contexts) == before
    assert not (tmp_path / "fresh").exists()
    monkeypatch.delenv(FAIL_ENV)
    build(src, out, engine="ray", force=True)  # a rerun succeeds
    assert CorpusIndex.load(out).manifest["build_options"]["engine"] == "ray"
    assert answers(CorpusIndex.load(out), contexts) == before  # the same corpus: the same index


@pytest.mark.parametrize("stage", ["minhash", "candidates", "span_keys", "span_sort"])
def test_a_failed_task_in_any_stage_fails_the_build_in_one_line(tmp_path, monkeypatch, stage):
    """The other stages' failures (the read stage's are the bad files' errors above): no index, the task's line."""
    from refdecode.corpus.ray_build import FAIL_ENV

    monkeypatch.setenv(FAIL_ENV, stage)
    with pytest.raises(RuntimeError, match=f"^injected failure in the Ray stage '{stage}' [^\\n]*$"):
        build(write_corpus(tmp_path / "src", 6, docs=2), tmp_path / "idx", engine="ray")
    assert not (tmp_path / "idx").exists()


@pytest.mark.slow
def test_driver_killed_mid_build_leaves_the_old_index_and_a_rerun_succeeds(tmp_path, ray_local):
    """SIGKILL a driver (a process that joined this session's Ray) while it builds over an existing index."""
    src = write_corpus(tmp_path / "src", 8, docs=8)
    out = build(src, tmp_path / "idx")
    contexts = span_contexts(src, 4)
    before = answers(CorpusIndex.load(out), contexts)
    address = ray_local.get_runtime_context().gcs_address
    script = (
        "from refdecode.corpus import build_index\nfrom refdecode.corpus.testing import WordTokenizer\n"
        f"build_index([{str(src)!r}], {str(out)!r}, tokenizer=WordTokenizer(), model_name='toy', progress=False,"
        f" embedder='hashed', chunk_tokens=32, force=True, engine='ray', ray_address={address!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    old = gen_dir(out).name

    def new_passage_store() -> bool:
        return any(p.parent.name != old for p in out.glob("gen-*/sources.json"))

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not new_passage_store():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(0.05)  # until the new generation holds its passage store: the span sort and embedding follow
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert answers(CorpusIndex.load(out), contexts) == before
    build(src, out, engine="ray", force=True)
    assert answers(CorpusIndex.load(out), contexts) == before
    assert CorpusIndex.load(out).manifest["build_options"]["engine"] == "ray"
