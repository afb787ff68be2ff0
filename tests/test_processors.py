"""process_rows / top_p_rows: the fast row processing gives exactly transformers' processed scores."""

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from refdecode.sampling import SamplingConfig, build_processors, process_rows, top_p_rows


@pytest.mark.parametrize("vocab", [8, 300, 5000])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0, 12.0])
def test_top_p_rows_equals_transformers(vocab, scale):
    gen = torch.Generator().manual_seed(vocab + int(scale * 10))
    scores = torch.randn(6, vocab, generator=gen) * scale
    scores[1, :4] = scores[1, 0]  # ties at the top
    scores[2, vocab // 2 :] = -float("inf")  # a row already cut by top-k
    for top_p in (0.05, 0.5, 0.9, 0.999, 1.0):
        for keep in (1, 3):
            want = TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, scores)
            got = top_p_rows(scores, top_p, min_tokens_to_keep=keep, width=64)
            assert torch.equal(got, want), (top_p, keep)


def test_top_p_rows_cut_exactly_at_a_tie_or_the_margin_falls_back():
    # two tokens of equal probability straddle the cut: which one transformers keeps is its sort's choice
    scores = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))
    for top_p in (0.5, 0.7, 0.70001):
        assert torch.equal(top_p_rows(scores, top_p), TopPLogitsWarper(top_p)(None, scores))


@pytest.mark.parametrize(
    "config",
    [
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_k=20, top_p=0.8),
        dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3),
        dict(temperature=0.5),
    ],
)
def test_process_rows_equals_each_row_processed_with_its_own_prefix(config):
    gen = torch.Generator().manual_seed(1)
    processors = build_processors(SamplingConfig(**config))
    context = torch.randint(0, 400, (30,), generator=gen)
    draft = torch.randint(0, 400, (5,), generator=gen).tolist()
    logits = torch.randn(6, 400, generator=gen) * 5
    got = process_rows(processors, context, draft, logits)
    for i in range(6):
        ids = torch.cat([context, torch.tensor(draft[:i], dtype=torch.long)])[None, :]
        assert torch.equal(got[i : i + 1], processors(ids, logits[i : i + 1].clone())), i


def test_process_rows_runs_a_penalty_after_a_warper_row_by_row():
    # only a trailing run of warpers is batched: a penalty placed after them still sees each row's own prefix
    processors = LogitsProcessorList([TopPLogitsWarper(0.9), RepetitionPenaltyLogitsProcessor(2.0)])
    context = torch.tensor([1, 2, 3])
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    got = process_rows(processors, context, [4, 5], logits)
    for i in range(3):
        ids = torch.cat([context, torch.tensor([4, 5][:i], dtype=torch.long)])[None, :]
        assert torch.equal(got[i : i + 1], processors(ids, logits[i : i + 1].clone()))


def test_process_rows_without_processors_returns_the_logits():
    logits = torch.randn(2, 5)
    assert process_rows(LogitsProcessorList(), torch.tensor([1]), [2], logits) is logits
