"""scripts/bench_exactness.py: the replay of greedy's tokens through wide forwards, against brute force on tiny
models, and its report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from refdecode.bench.runner import first_mismatch
from refdecode.kernels import forward_tokens
from scripts import bench_exactness

pytestmark = pytest.mark.usefixtures("one_thread")


def test_top2_gap():
    rows = torch.tensor([[0.0, 3.0, 1.0], [2.0, 2.0, -1.0]])
    assert bench_exactness.top2_gap(rows).tolist() == [2.0, 0.0]


def _plain_greedy(model, prompt, n):
    """Brute force: one token per forward, argmax each time."""
    cache = DynamicCache(config=model.config)
    row = forward_tokens(model, cache, prompt)[-1]
    out = [int(row.argmax())]
    while len(out) < n:
        out.append(int(forward_tokens(model, cache, [out[-1]])[0].argmax()))
    return out


@pytest.mark.parametrize("width", [2, 3, 8])
def test_replay_in_float32_keeps_greedys_path(tiny_llama, width):
    tiny_model = tiny_llama
    prompt = [5, 17, 33, 2, 9, 41, 17, 33]
    tokens, logits = bench_exactness.greedy_with_logits(tiny_model, prompt, 12, pad_id=1)
    assert tokens == _plain_greedy(tiny_model, prompt, 12)
    assert logits.shape == (12, tiny_model.config.vocab_size)
    assert [int(i) for i in logits.argmax(dim=-1)] == tokens
    replay = bench_exactness.wide_replay(tiny_model, prompt, tokens, width)
    assert len(replay["wide"]) == len(replay["guarded"]) == len(tokens)
    assert replay["guarded"] == tokens and replay["wide"] == tokens  # float32 rounds ~1e-6: the same argmax
    assert 0.0 <= replay["moved"] < 1e-3


def test_replay_reports_where_a_different_path_leaves():
    """Fed tokens that are not greedy's, each position's argmax is still the model's own choice after them: the
    replay returns what the model predicts, not what it was fed."""
    from stats_helpers import tiny_llama

    model = tiny_llama(vocab_size=96, seed=3)
    prompt = [4, 8, 15, 16, 23, 42]
    tokens, _ = bench_exactness.greedy_with_logits(model, prompt, 6, pad_id=1)
    other = tokens[:2] + [(tokens[2] + 1) % 96] + tokens[3:]
    replay = bench_exactness.wide_replay(model, prompt, other, 4)
    assert replay["guarded"][:3] == tokens[:3]  # positions 0..2 follow the same context as greedy's
    assert first_mismatch(other, replay["guarded"]) == 2


def test_report_counts_bound_and_methods(tmp_path):
    rows = [
        {"request_id": "a/1", "workload": "a", "new_tokens": 4, "smallest_gap": 0.5, "smallest_gap_at": 1,
         "gaps_below_0.25": 0, "largest_move": 0.1, "wide_diverges_at": None, "guarded_diverges_at": None},
        {"request_id": "a/2", "workload": "a", "new_tokens": 4, "smallest_gap": 0.01, "smallest_gap_at": 2,
         "gaps_below_0.25": 1, "largest_move": 0.2, "wide_diverges_at": 2, "guarded_diverges_at": 2},
    ]  # fmt: skip
    results = tmp_path / "results.json"
    records = [
        {"method": "greedy", "request_id": "a/1"},
        {"method": "pld", "request_id": "a/1", "matches_greedy": True, "first_mismatch": None},
        {"method": "pld", "request_id": "a/2", "matches_greedy": False, "first_mismatch": 2},
        {"method": "refdecode", "request_id": "a/1", "matches_greedy": True, "first_mismatch": None},
        {"method": "refdecode", "request_id": "a/2", "matches_greedy": True, "first_mismatch": None},
    ]
    results.write_text(json.dumps({"records": records}))
    divergences = bench_exactness.method_divergences(results)
    assert divergences == {"a/1": {"pld": None, "refdecode": None}, "a/2": {"pld": 2, "refdecode": None}}
    text = bench_exactness.summarize(rows, divergences, 16)
    assert "by the ideal guard over their cache: 1/2" in text
    assert "- pld: identical on 1/2" in text and "- refdecode: identical on 2/2" in text
    assert "| a/2 | 0.0100 (2) | 1 | 0.200 | 2 | 2 | 2 | - |" in text


def test_unreadable_results_is_one_line(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read benchmark results"):
        bench_exactness.method_divergences(bad)
    assert bench_exactness.main(["--model", "no-such-model", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_exactness:")


def test_sliding_window_models_are_refused(tiny_gemma3):
    with pytest.raises(ValueError, match="full-attention models only"):
        bench_exactness.wide_replay(tiny_gemma3, [5, 6, 7], [8, 9, 10], 2)


def test_bad_options_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        bench_exactness.main(["--width", "1"])
    assert exit_info.value.code == 2


def test_measure_on_a_tiny_model_fills_every_field():
    from stats_helpers import tiny_llama

    model = tiny_llama(vocab_size=96, seed=0)
    requests = [SimpleNamespace(id="t/0", workload="t", prompt_ids=[3, 7, 11, 13, 3, 7]), SimpleNamespace(
        id="t/1", workload="t", prompt_ids=[21, 22, 23, 24])]  # fmt: skip
    lines: list[str] = []
    rows = bench_exactness.measure(model, None, requests, max_new_tokens=8, width=4, log=lines.append)
    assert [r["request_id"] for r in rows] == ["t/0", "t/1"] and len(lines) == 2
    for r in rows:
        assert r["new_tokens"] == 8 and r["guarded_diverges_at"] is None and r["wide_diverges_at"] is None
        assert 0 <= r["smallest_gap_at"] < 8 and r["smallest_gap"] >= 0
