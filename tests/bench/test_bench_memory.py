"""scripts/bench_memory.py: deterministic paraphrases, and the whole benchmark runs on a tiny model (2 requests)."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import bench_memory

QUESTIONS = ["How do I delete a file?", "Why does Python use indentation for grouping of statements?"]


def test_paraphrases_are_deterministic_rewordings():
    seen = set()
    for k, q in enumerate(QUESTIONS * 3):
        p = bench_memory.paraphrase(q, k)
        assert p == bench_memory.paraphrase(q, k) and p != q
        seen.add(p)
    assert "What is the way to delete a file?" in bench_memory.paraphrase(QUESTIONS[0], 0)
    assert "What is the reason Python use" in bench_memory.paraphrase(QUESTIONS[1], 1)
    assert bench_memory.paraphrase(QUESTIONS[0], 2).startswith("Can you explain that again: what is the way")
    assert len(seen) >= 5  # prefixes and next turns vary with k


def test_runs_on_a_tiny_model(monkeypatch, tmp_path, capsys, smollm2_tokenizer):
    from stats_helpers import tiny_llama

    import refdecode
    import refdecode.decoding

    tokenizer = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tokenizer), seed=3, max_positions=512, eos_token_id=None)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    monkeypatch.setattr(refdecode.decoding, "calibrate_costs", lambda *args, **kwargs: {1: 1.0, 64: 1.0})
    monkeypatch.setattr(refdecode, "load_model", lambda name: (model, tokenizer))
    monkeypatch.setattr(bench_memory, "pick_questions", lambda n, offset=0: QUESTIONS[offset : offset + n])
    out = tmp_path / "results" / "memory.json"
    code = bench_memory.main(["--n", "2", "--max-new-tokens", "12", "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["identical"] and result["requests"] == 2 and result["memory_outputs"] == 4
    assert len(result["pass2"]) == 2 and result["with_memory"]["tokens_per_step"] > 0
    assert "tokens/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_memory.main(["--max-new-tokens", "0"])


def test_an_offset_picks_another_spread_of_questions(monkeypatch):
    from refdecode.bench import data

    pairs = [{"question": f"Q{i}?"} for i in range(10)]
    monkeypatch.setattr(data, "faq_pairs", lambda: pairs)
    assert bench_memory.pick_questions(5) == ["Q0?", "Q2?", "Q4?", "Q6?", "Q8?"]
    assert bench_memory.pick_questions(5, 1) == ["Q1?", "Q3?", "Q5?", "Q7?", "Q9?"]  # none in common
    assert bench_memory.pick_questions(4, 9) == ["Q9?", "Q1?", "Q4?", "Q6?"]  # wraps around
    for n, offset in ((0, 0), (11, 0), (3, 10), (3, -1)):
        with pytest.raises(ValueError):
            bench_memory.pick_questions(n, offset)
