"""Crash safety of `refdecode index build --force`: a build killed with SIGKILL at any moment leaves the old index
loadable with exactly its old answers (or, once the manifest has switched, the new index), never a partial index
under any name; the next build removes what the killed one left. Readers running while the index is rebuilt
over and over see one whole index or the other, never a mix, never an error.

Three ways in: every filesystem step of a build (forked child that SIGKILLs itself at the N-th step: exact and
cheap), a real `python -m refdecode.cli index build` killed at times spread over its run, and two reader processes
racing a rebuilding one.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import answers, build, gen_dir, span_contexts, write_corpus

from refdecode.corpus import CorpusIndex, IndexFormatError

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
REPO = Path(__file__).resolve().parents[2]


def _manifests_load(root: Path, allowed: list, ctx: list) -> None:
    """No partial index under any name: every folder below `root` that holds a manifest loads whole and answers
    as one of `allowed` (a staging folder killed just before its rename is a whole index too)."""
    for folder, _, files in os.walk(root):
        if "manifest.json" in files:
            assert answers(CorpusIndex.load(folder), ctx) in allowed, folder


def _clean(out: Path) -> bool:
    """Only the manifest and its one generation in `out`, and no hidden build folder beside it."""
    return sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", gen_dir(out).name]) and not [
        p for p in out.parent.iterdir() if p.name.startswith(".")
    ]


# -- 1) every filesystem step of a build, killed ------------------------------------------------------------------

_STEPS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "fsync")]


def _build_in_child(src: Path, out: Path, kill_at: int, log: Path | None = None) -> int:
    """Fork; the child builds `src` into `out` (force) and SIGKILLs itself at its `kill_at`-th filesystem step
    (0: never), writing the step names to `log`. -> the child's wait status"""
    import faiss

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            steps: list[str] = []

            def wrap(module, name):
                real = getattr(module, name)

                def step(*args, **kwargs):
                    steps.append(f"{name} {args[1] if name in ('replace', 'rename') else ''}".strip())
                    if len(steps) == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                setattr(module, name, step)

            for module, name in [*_STEPS, (np, "save"), (faiss, "write_index")]:
                wrap(module, name)
            build(src, out, force=True)
            if log is not None:
                log.write_text("\n".join(steps))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "fresh"])
def test_build_killed_at_every_step(tmp_path, existing):
    """SIGKILL at each filesystem step of a build (all of them under `make fuzz`; in CI a spread before the
    manifest switch, the switch and its neighbours, and the removal of the old generation)."""
    src_a, src_b = write_corpus(tmp_path / "src_a", seed=0), write_corpus(tmp_path / "src_b", seed=1, docs=4)
    ctx = span_contexts(src_a, 4) + span_contexts(src_b, 4)
    work = tmp_path / "work"
    out = work / "idx"
    build(src_a, tmp_path / "ref_a")
    build(src_b, tmp_path / "ref_b")
    a, b = answers(CorpusIndex.load(tmp_path / "ref_a"), ctx), answers(CorpusIndex.load(tmp_path / "ref_b"), ctx)
    # a dry run counts the steps and finds the one that switches the manifest
    work.mkdir()
    if existing:
        build(src_a, out)
    log = tmp_path / "steps.txt"
    assert _build_in_child(src_b, out, 0, log) == 0
    steps = log.read_text().splitlines()
    switch = next(
        i
        for i, s in enumerate(steps, 1)  # replacing: the manifest; fresh: the folder
        if ((s.startswith("replace") and s.endswith("manifest.json")) if existing else s.startswith("rename"))
    )
    points = range(1, len(steps) + 1)
    if not FUZZ:  # CI: the steps around the switch, and a spread before
        after = (switch + 1, switch + 2, (switch + len(steps)) // 2, len(steps))  # removing the old generation
        points = sorted(
            {*range(1, switch - 1, max(1, switch // 6)), switch - 1, switch, *(k for k in after if k <= len(steps))}
        )
    for k in points:
        shutil.rmtree(work)
        work.mkdir()
        if existing:
            build(src_a, out)
        status = _build_in_child(src_b, out, k)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, steps[k - 1])
        # 1) the old index until the manifest switched, the new one from then on; nothing partial anywhere
        if existing or k > switch:
            want = a if (existing and k <= switch) else b
            assert answers(CorpusIndex.load(out), ctx) == want, (k, steps[k - 1])
        else:
            assert not out.exists(), (k, steps[k - 1])
        _manifests_load(work, [a, b], ctx)
        # 2) the next build cleans up after the killed one
        build(src_a, out, force=True)
        assert _clean(out) and answers(CorpusIndex.load(out), ctx) == a, (k, steps[k - 1])


# -- 2) a real `python -m refdecode.cli index build --force`, killed at times spread over its run ---------------


def _cli(src: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "refdecode.cli",
        "index",
        "build",
        str(src),
        "--out",
        str(out),
        "--model",
        "smollm2-135m",
        "--embedder",
        "hashed",
        "--chunk-tokens",
        "64",
        "--quiet",
        "--force",
    ]


@pytest.mark.slow
@pytest.mark.fuzz
def test_cli_build_killed_at_spread_times(tmp_path, request):
    """SIGKILL a real CLI build at 10 moments in CI (62 under `make fuzz`): 8 (60) spread from process start to
    the build's end, and 2 after its end. Each time the index loads and answers as the old corpus or as the new
    one, never otherwise, nothing partial is loadable, and the next build cleans up."""
    from refdecode.corpus import build_index

    try:
        tok = request.getfixturevalue("smollm2_tokenizer")
    except Exception as e:  # noqa: BLE001 - no cached tokenizer: nothing to kill
        pytest.skip(f"smollm2-135m tokenizer not available: {e}")
    src_a, src_b = write_corpus(tmp_path / "src_a", seed=0), write_corpus(tmp_path / "src_b", seed=1, docs=4)
    ctx = [tok.encode((src_a / "doc0.md").read_text())[5:17], tok.encode((src_b / "doc1.md").read_text())[5:17]]

    def build_real(src, dest):
        build_index(
            [src],
            dest,
            tokenizer=tok,
            model_name="smollm2-135m",
            embedder="hashed",
            chunk_tokens=64,
            progress=False,
            force=True,
        )

    build_real(src_a, tmp_path / "ref_a")
    a = answers(CorpusIndex.load(tmp_path / "ref_a", tokenizer=tok), ctx)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # two builds at a time (two outputs, one per core), each over its own copy of the old index, which is
    # restored whenever a build got as far as its switch; the first pair runs to the end (the kills "after the
    # end", and the build's duration), the others are killed at times spread from process start to that end
    outs = [tmp_path / f"work{j}" / "idx" for j in range(2)]
    for o in outs:
        build_real(src_a, o)
    seen = {"old": 0, "new": 0}
    killed = 0

    def run_pair(kill_at: list[float | None]) -> float:
        nonlocal killed
        t0 = time.monotonic()
        procs = [
            subprocess.Popen(_cli(src_b, o), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for o in outs
        ]
        for proc, at in zip(procs, kill_at, strict=True):
            try:
                proc.wait(timeout=None if at is None else max(0.0, at - (time.monotonic() - t0)))
                assert proc.returncode == 0, proc.stderr.read()[-2000:] if proc.stderr else ""
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
            finally:
                if proc.stderr:
                    proc.stderr.close()
        return time.monotonic() - t0

    duration = run_pair([None, None])
    b = answers(CorpusIndex.load(outs[0], tokenizer=tok), ctx)
    assert a != b
    n = 60 if FUZZ else 8
    times = [duration * (i + 0.5) / n for i in range(n)]
    for pair in [None, *range(0, n, 2)]:
        if pair is not None:
            run_pair(times[pair : pair + 2])
        for o in outs:
            got = answers(CorpusIndex.load(o, tokenizer=tok), ctx)
            assert got in (a, b), (pair, o)
            _manifests_load(o.parent, [a, b], ctx)
            seen["old" if got == a else "new"] += 1
            if got == b:
                build_real(src_a, o)  # the next build also removes what the kill left
                assert _clean(o)
    assert killed >= n // 2, (killed, seen)  # most runs were cut short, or this proved little
    assert seen["new"] >= 2  # and the runs that ended switched to the new index


# -- 3) readers racing a rebuilding process -----------------------------------------------------------------------

_READER = """
import hashlib, sys, time
from pathlib import Path
from refdecode.corpus import CorpusIndex, IndexFormatError
sys.path.insert(0, {tests!r})
from index_helpers import answers
out, ctx, stop, ready, report = Path({out!r}), {ctx!r}, Path({stop!r}), Path({ready!r}), Path({report!r})
counts = {{}}
ready.write_text("ready")
while not stop.exists():
    try:
        key = hashlib.sha256(repr(answers(CorpusIndex.load(out), ctx)).encode()).hexdigest()
    except Exception as e:
        key = "error: " + repr(e)
    counts[key] = counts.get(key, 0) + 1
    time.sleep(0.01)                    # leave the builder some CPU on a small machine
report.write_text(repr(counts))
"""

_BUILDER = """
import sys, time
from pathlib import Path
import refdecode.corpus.cli as cli
from refdecode.corpus.testing import WordTokenizer
cli._load_tokenizer = lambda name: WordTokenizer()
while not all(Path(p).exists() for p in {ready!r}):       # the readers are reading
    time.sleep(0.05)
for i in range({rounds}):
    src = {srcs!r}[i % 2]
    code = cli.main(["index", "build", src, "--out", {out!r}, "--model", "toy", "--embedder", "hashed",
                     "--chunk-tokens", "32", "--quiet", "--force"])
    if code != 0:
        sys.exit(code)
"""


@pytest.mark.slow
def test_readers_see_one_index_or_the_other_while_it_is_rebuilt(tmp_path):
    src_a, src_b = write_corpus(tmp_path / "src_a", seed=0), write_corpus(tmp_path / "src_b", seed=1, docs=4)
    ctx = span_contexts(src_a, 3) + span_contexts(src_b, 3)
    out = tmp_path / "idx"
    build(src_b, tmp_path / "ref_b")
    build(src_a, out)

    def digest(index_dir):
        return hashlib.sha256(repr(answers(CorpusIndex.load(index_dir), ctx)).encode()).hexdigest()

    a, b = digest(out), digest(tmp_path / "ref_b")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    stop = tmp_path / "stop"
    readers = []
    for r in range(2):
        script = _READER.format(
            tests=str(REPO / "tests" / "corpus"),
            out=str(out),
            ctx=ctx,
            stop=str(stop),
            ready=str(tmp_path / f"ready{r}"),
            report=str(tmp_path / f"report{r}"),
        )
        readers.append(subprocess.Popen([sys.executable, "-c", script], env=env))
    try:
        rounds = 40 if FUZZ else 6
        script = _BUILDER.format(
            rounds=rounds,
            srcs=[str(src_b), str(src_a)],
            out=str(out),
            ready=[str(tmp_path / f"ready{r}") for r in range(2)],
        )
        builder = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert builder.returncode == 0, builder.stderr[-2000:]
    finally:
        stop.write_text("stop")
        for proc in readers:
            proc.wait(timeout=120)
    for r in range(2):
        counts = ast.literal_eval((tmp_path / f"report{r}").read_text())
        assert set(counts) <= {a, b}, counts
        assert sum(counts.values()) >= 2, counts
    assert _clean(out)


def test_a_load_that_loses_its_generation_retries_with_the_new_one(tmp_path, monkeypatch):
    """Deterministic version of the race above: a rebuild switches the manifest and removes the old generation
    between the reader's manifest read and its file checks; the load re-reads the manifest and returns the new
    index whole. A load whose generation vanished without a new manifest is an error that says so."""
    import refdecode.corpus.index as index_module

    src_a, src_b = write_corpus(tmp_path / "src_a", seed=0), write_corpus(tmp_path / "src_b", seed=1, docs=4)
    ctx = span_contexts(src_a, 3) + span_contexts(src_b, 3)
    out = build(src_a, tmp_path / "idx")
    b = answers(CorpusIndex.load(build(src_b, tmp_path / "ref_b")), ctx)
    real, calls = index_module.verify_files, []

    def rebuilt_meanwhile(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            build(src_b, out, force=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "verify_files", rebuilt_meanwhile)
    assert answers(CorpusIndex.load(out), ctx) == b and len(calls) == 2
    monkeypatch.setattr(index_module, "verify_files", real)
    shutil.rmtree(gen_dir(out))
    with pytest.raises(IndexFormatError, match="is missing"):
        CorpusIndex.load(out)
