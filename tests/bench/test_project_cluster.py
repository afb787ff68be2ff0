"""scripts/project_cluster.py (the cluster projection of docs/corpus.md) and bench_span_scale's synthetic stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.bench_span_scale import synthetic_stream
from scripts.project_cluster import project, stage_figures

ROOT = Path(__file__).resolve().parents[2]


def fake_build(tokens: int = 100) -> dict:
    stage = {"rows_in": 1, "bytes_in": 1, "rows_out": 1, "bytes_out": 1000, "shuffle_bytes": 0, "task_seconds": 4.0}
    stats = {"engine": "ray", "nodes": 1, "cpus": 2, "stages": {"tokenize_chunk": stage, "span_index": dict(stage)}}
    stats["stages"]["span_index"]["shuffle_bytes"] = 8000
    manifest = {"counts": {"tokens": tokens}, "build_seconds": {"tokenize_chunk": 3.0, "span_index": 5.0}}
    manifest["build_stats"] = stats
    return {"sizes": {"100": {"engines": {"ray": {"manifest": manifest, "wall_seconds": 10.0}}}}}


def test_one_node_like_the_measuring_machine_gives_back_the_measured_time():
    stages, cpus, startup = stage_figures(fake_build(), None, 100)
    assert cpus == 2 and startup == 2.0
    for name, f in stages.items():  # driver part W - T/C > 0 for both: the projection returns W
        assert project(name, f, cpus=2, nodes=1, per_node=2, link=float("inf"), slower=1) == pytest.approx(f["W"])


def test_stages_scale_with_the_corpus_and_tasks_spread_over_nodes():
    stages, _, _ = stage_figures(fake_build(), None, 1000)
    assert stages["span_index"]["T"] == 40.0 and stages["span_index"]["S"] == 80_000
    f = stages["span_index"]
    one, many = (project("span_index", f, cpus=2, nodes=n, per_node=16, link=1e9, slower=1) for n in (1, 64))
    driver = f["W"] - f["T"] / 2
    assert driver < many < one  # the driver's part stays; the tasks' part shrinks
    span = {
        "tokens": 1000,
        "ray": {"seconds": 7.0, "figures": {"task_seconds": 9.0, "shuffle_bytes": 5, "bytes_out": 6}},
    }
    measured, _, _ = stage_figures(fake_build(), span, 1000)
    assert measured["span_index"]["W"] == 7.0 and measured["span_index"]["T"] == 9.0  # measured, not scaled


def test_a_missing_results_file_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.project_cluster", "--build", str(tmp_path / "none.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().endswith("does not exist (run its benchmark first)")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sizes": {}}))
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.project_cluster", "--build", str(bad), "--span", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not a benchmark's results.json" in proc.stderr and "Traceback" not in proc.stderr


def test_synthetic_stream_copies_the_base_mutated_and_ends_at_a_separator(tmp_path):
    from refdecode.corpus.spans import encode_stream

    rng = np.random.default_rng(0)
    base_stream = encode_stream([rng.integers(1000, size=rng.integers(50, 500)) for _ in range(100)], 1000)
    np.save(tmp_path / "base.npy", base_stream)
    tokens = 3 * base_stream.size + 100
    path = synthetic_stream(tmp_path / "base.npy", tokens, tmp_path / "s.npy")
    out = np.load(path)
    n = base_stream.size
    assert out.size >= tokens and out[-1] == 0 and out[0] == 0
    assert np.array_equal(out[:n], base_stream)  # the first copy as it is
    for c in (1, 2):  # later copies: separators kept, ~2% of tokens replaced
        copy = out[c * n : (c + 1) * n]
        assert np.array_equal(copy == 0, base_stream == 0)
        changed = np.mean(copy[base_stream != 0] != base_stream[base_stream != 0])
        assert 0.005 < changed < 0.03
    again = synthetic_stream(tmp_path / "base.npy", tokens, tmp_path / "t.npy")
    assert np.array_equal(np.load(again), out)  # seeded
