"""The tie guard's one-token recompute inside a step: a row too close to call at a forward's width is recomputed one
token wide over the same cache entries (tree_attention.recompute_row), the cache put back as the wide forward left
it, and the walk goes on over that forward's other rows. Checked against plain decoding of each row's path, against
transformers' greedy `generate` with every row forced through the recompute, and under sampling against plain
sampling with the same seed; sliding-window caches fall back to a one-token step of their own."""

import random

import pytest
import torch
from stats_helpers import AlwaysDraft, IdTokenizer
from test_tree_attention import VOCAB, assert_close, model_named, plain_logits, prefill, trees

import refdecode
from refdecode.policy import DraftPolicy
from refdecode.store import ReferenceStore
from refdecode.tree import DraftTree
from refdecode.tree_attention import recompute_row, tree_forward

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given = hypothesis.given

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

EVERY_ROW = 1e9  # a tie margin no score gap reaches: every row the walk relies on is recomputed one token wide


def cache_tensors(cache) -> list[torch.Tensor]:
    return [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]


@given(
    name=st.sampled_from(["llama-eager", "llama-sdpa"]),
    context=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),
    pending=st.integers(0, VOCAB - 1),
    tree=trees(),
    pick=st.integers(0, 10),
)
def test_a_recomputed_row_is_plain_decoding_of_its_path_and_the_cache_is_put_back(name, context, pending, tree, pick):
    model = model_named(name)
    cache = prefill(model, context)
    past = cache.get_seq_length()
    tree_forward(model, cache, pending, tree)
    before = cache_tensors(cache)
    node = pick % (len(tree) + 1) - 1  # -1: the pending token's own row
    path = tree.path(node) if node >= 0 else []
    rows = [0] + [i + 1 for i in path[:-1]] if path else []  # the cache entries before the recomputed token
    token = tree.tokens[node] if node >= 0 else pending
    got = recompute_row(model, cache, past, rows, token)
    assert got is not None
    assert_close(got, plain_logits(model, context + [pending] + [tree.tokens[i] for i in path])[-1])
    after = cache_tensors(cache)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("name", ["gemma3-w4-eager", "qwen2-mixed-w5-sdpa", "mistral-w6-eager"])
def test_sliding_window_caches_are_left_untouched(name):
    model = model_named(name)
    cache = prefill(model, list(range(3, 23)))
    past = cache.get_seq_length()
    tree_forward(model, cache, 5, DraftTree([6, 7], [-1, 0]))
    before = cache_tensors(cache)
    assert recompute_row(model, cache, past, [0], 6) is None
    assert all(torch.equal(a, b) for a, b in zip(cache_tensors(cache), before, strict=True))


def test_no_rows_of_a_forward_is_an_error():
    model = model_named("llama-sdpa")
    cache = prefill(model, [3, 4, 5])
    with pytest.raises(ValueError, match="no forward's rows"):
        recompute_row(model, cache, cache.get_seq_length(), [], 4)


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def oracle_store(prompt, continuation, rng, *, noisy: bool) -> ReferenceStore:
    """The true continuation as a reference (long accepted drafts), or with a sixth of it changed (mixed verdicts)."""
    tokens = list(prompt[-4:] + continuation)
    if noisy:
        for _ in range(len(tokens) // 6):
            tokens[rng.randrange(len(tokens))] = rng.randrange(2, VOCAB)
    store = ReferenceStore(IdTokenizer(VOCAB))
    store.add(tokens)
    return store


def forced(model, prompt, store, max_new_tokens, **options):
    """refdecode.generate with every draft verified whole (AlwaysDraft), uncalibrated."""
    policy = AlwaysDraft(max_draft=12)
    return refdecode.generate(
        model, None, prompt, store=store, max_new_tokens=max_new_tokens, policy=policy, calibrate=False, **options
    )


@pytest.mark.parametrize("tree", [True, False])
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("tie_margin", [EVERY_ROW, 0.05])
def test_greedy_with_rows_recomputed_inside_steps_matches_transformers(tree, noisy, tie_margin):
    model = model_named("llama-sdpa")
    rng = random.Random(int(noisy) * 2 + int(tree))
    prompt = [rng.randrange(2, VOCAB) for _ in range(16)]
    expected = hf_greedy(model, prompt, 40)
    out = forced(model, prompt, oracle_store(prompt, expected, rng, noisy=noisy), 40, tree=tree, tie_margin=tie_margin)
    s = out.stats
    assert out.token_ids == expected
    assert s.unresolved_steps == 0  # every too-close row was settled inside its own step
    assert sum(s.accept_lengths) == s.new_tokens - 1 == s.steps + s.accepted_tokens
    if tie_margin == EVERY_ROW:
        # every row a verdict relied on was recomputed: one per accepted draft token, and the last row of each step
        # that verified a draft (a step without one is a one-token forward, which needs no guard)
        assert s.recomputed == s.accepted_tokens + sum(1 for n in s.draft_lengths if n > 0)
        if not noisy:
            assert s.accepted_tokens > s.steps  # the walk went on past recomputed rows, several tokens a step


def test_sliding_window_models_leave_the_row_to_a_one_token_step():
    model = model_named("gemma3-w4-eager")
    rng = random.Random(5)
    prompt = [rng.randrange(2, VOCAB) for _ in range(16)]
    expected = hf_greedy(model, prompt, 30)
    out = forced(model, prompt, oracle_store(prompt, expected, rng, noisy=False), 30, tie_margin=EVERY_ROW)
    s = out.stats
    assert out.token_ids == expected
    assert s.unresolved_steps == s.recomputed > 0
    assert sum(s.accept_lengths) == s.new_tokens - 1 == s.steps + s.accepted_tokens - s.unresolved_steps


@pytest.mark.parametrize("tree", [True, False])
def test_sampling_with_rows_recomputed_is_plain_sampling_with_the_same_seed(tree):
    """Gumbel-coupled verification makes the output a function of the seed alone, recomputed rows included."""
    model = model_named("llama-sdpa")
    rng = random.Random(11)
    prompt = [rng.randrange(2, VOCAB) for _ in range(16)]
    plain = refdecode.generate(
        model, None, prompt, max_new_tokens=30, temperature=0.9, seed=4, policy=DraftPolicy(max_draft=0)
    )
    store = oracle_store(prompt, plain.token_ids, rng, noisy=True)
    out = forced(model, prompt, store, 30, temperature=0.9, seed=4, tree=tree, tie_margin=EVERY_ROW)
    assert out.token_ids == plain.token_ids
    assert out.stats.recomputed > 0 and out.stats.unresolved_steps == 0
