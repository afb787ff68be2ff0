"""The target-model reranker: its batched, left-padded scores equal a one-passage-at-a-time computation, and its
rank fusion equals the textbook formula."""

import random

import numpy as np
import pytest
import torch

from refdecode.corpus.embedding import plain_text
from refdecode.corpus.rerank import RRF_K, LMReranker, reciprocal_rank_fusion
from refdecode.corpus.testing import WordTokenizer


def brute_force_likelihood(model, tokenizer, query: str, text: str) -> float:
    """log p(query | prompt) from one unpadded forward with every position's logits."""
    context = tokenizer("Passage: " + plain_text(text) + "\n\nA question that this passage answers:")["input_ids"]
    q = tokenizer(" " + query)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + q])).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(q)))


def random_text(rng, n):
    return " ".join(f"x{rng.randrange(500)}" for _ in range(n))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_scores_equal_one_passage_at_a_time(tiny_model, batch_size):
    tokenizer = WordTokenizer(vocab_size=tiny_model.config.vocab_size)
    rng = random.Random(batch_size)
    texts = [random_text(rng, rng.randrange(3, 40)) for _ in range(7)]  # unequal lengths: padding matters
    query = random_text(rng, 6)
    reranker = LMReranker(tiny_model, tokenizer, batch_size=batch_size)
    got = reranker.scores(query, texts)
    want = [brute_force_likelihood(tiny_model, tokenizer, query, t) for t in texts]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_passages_are_cut_to_max_passage_tokens(tiny_llama):
    tokenizer = WordTokenizer(vocab_size=tiny_llama.config.vocab_size)
    rng = random.Random(0)
    head, tail = random_text(rng, 10), random_text(rng, 30)
    reranker = LMReranker(tiny_llama, tokenizer, max_passage_tokens=10)
    got = reranker.scores("x1 x2 x3", [head + " " + tail])
    np.testing.assert_allclose(got, [brute_force_likelihood(tiny_llama, tokenizer, "x1 x2 x3", head)], atol=1e-3)


def test_rerank_fuses_embedding_order_with_likelihood_order(tiny_llama):
    """rerank = reciprocal rank fusion of the given (embedding) order and the model's likelihood order; the model's
    favourite can only move up."""
    tokenizer = WordTokenizer(vocab_size=tiny_llama.config.vocab_size)
    rng = random.Random(1)
    texts = [random_text(rng, 20) for _ in range(6)]
    reranker = LMReranker(tiny_llama, tokenizer)
    scores = reranker.scores("x7 x8", texts)
    best = int(np.argmax(scores))
    ids = [10, 11, 12, 13, 14, 15]
    order = reranker.rerank("x7 x8", ids, texts)
    assert sorted(order) == ids
    by_model = [ids[i] for i in np.argsort(-scores, kind="stable")]
    assert order == reciprocal_rank_fusion(ids, by_model)
    assert order.index(ids[best]) <= ids.index(ids[best])  # fusion never ranks the model's best below dense


def test_reciprocal_rank_fusion_matches_the_formula():
    rng = random.Random(2)
    for _ in range(200):
        items = list(range(rng.randrange(1, 12)))
        rankings = [rng.sample(items, rng.randrange(0, len(items) + 1)) for _ in range(rng.randrange(1, 4))]
        fused = reciprocal_rank_fusion(*rankings)
        score = {i: sum(1 / (RRF_K + r.index(i) + 1) for r in rankings if i in r) for i in items}
        present = {i for r in rankings for i in r}
        assert sorted(fused) == sorted(present)
        values = [score[i] for i in fused]
        assert all(a >= b - 1e-15 for a, b in zip(values, values[1:], strict=False))


def test_bad_arguments_are_refused(tiny_llama):
    tokenizer = WordTokenizer(vocab_size=tiny_llama.config.vocab_size)
    with pytest.raises(ValueError):
        LMReranker(tiny_llama, tokenizer, batch_size=0)
    reranker = LMReranker(tiny_llama, tokenizer)
    with pytest.raises(ValueError, match="empty"):
        reranker.scores("   ", ["x1"])
    with pytest.raises(ValueError, match="differ"):
        reranker.rerank("x1", [1, 2], ["x1"])
    assert reranker.rerank("x1", [], []) == []
