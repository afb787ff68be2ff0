"""Greedy refdecode == transformers greedy generate, token for token, on tiny random Llama and Gemma3 models."""

import random

import pytest
import torch
from stats_helpers import AlwaysDraft, IdTokenizer

import refdecode
from refdecode.decoding import decode
from refdecode.drafters import ReferenceDrafter
from refdecode.inputs import eos_token_ids
from refdecode.store import ReferenceStore


def hf_greedy(model, prompt, max_new_tokens, eos=None):
    x = torch.tensor([prompt])
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt) :].tolist()


def perturb(tokens, rng, vocab):
    tokens = list(tokens)
    for _ in range(max(1, len(tokens) // 6)):
        if tokens:
            tokens[rng.randrange(len(tokens))] = rng.randrange(2, vocab)
    return tokens


@pytest.mark.parametrize("case", range(12))
def test_greedy_matches_transformers(tiny_model, case):
    rng = random.Random(case)
    vocab = tiny_model.config.vocab_size
    tok = IdTokenizer(vocab)
    prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, 40))]
    max_new = rng.choice([1, 2, 7, 33, 80])
    expected = hf_greedy(tiny_model, prompt, max_new)
    store = ReferenceStore(tok)
    kind = case % 4
    if kind == 1:  # the true continuation: drafts are accepted, long
        store.add(prompt[-5:] + expected, source="oracle")
    elif kind == 2:  # a corrupted continuation: accepted and rejected drafts mixed
        store.add(prompt[-5:] + perturb(expected, rng, vocab), source="noisy")
    elif kind == 3:  # random references: mostly rejected
        for i in range(3):
            store.add([rng.randrange(2, vocab) for _ in range(50)], source=f"random-{i}")
    out = refdecode.generate(
        tiny_model, tok, prompt, store=store if kind else None, max_new_tokens=max_new, calibrate=(case % 2 == 0)
    )
    assert out.token_ids == expected
    assert out.stats.new_tokens == len(expected)
    if kind == 1 and max_new > 7:
        assert out.stats.accepted_tokens > 0, "oracle references must be accepted"


def test_draft_longer_than_budget_and_eos_inside_draft(tiny_llama):
    rng = random.Random(7)
    vocab = tiny_llama.config.vocab_size
    prompt = [rng.randrange(2, vocab) for _ in range(12)]
    full = hf_greedy(tiny_llama, prompt, 40)
    eos = full[15]  # a token the model emits mid-way becomes the EOS: generation must stop right there
    expected = hf_greedy(tiny_llama, prompt, 40, eos=eos)
    assert expected[-1] == eos and len(expected) <= 16
    store = ReferenceStore(IdTokenizer(vocab))
    store.add(prompt + full + full, source="oracle")  # drafts run past the EOS and past the budget
    out = refdecode.generate(tiny_llama, None, prompt, store=store, max_new_tokens=40, eos_token_id=eos)
    assert out.token_ids == expected
    assert out.stop_reason == "eos"
    for budget in (1, 3, 5):
        out = refdecode.generate(tiny_llama, None, prompt, store=store, max_new_tokens=budget)
        assert out.token_ids == full[:budget]
        assert out.stop_reason == "max_new_tokens"


def test_forced_long_drafts_stay_exact(tiny_llama):
    """Whatever length the policy picks, the output is the same: force every draft to its maximum."""
    rng = random.Random(3)
    vocab = tiny_llama.config.vocab_size
    prompt = [rng.randrange(2, vocab) for _ in range(20)]
    expected = hf_greedy(tiny_llama, prompt, 60)

    store = ReferenceStore(IdTokenizer(vocab))
    store.add(perturb(prompt[-4:] + expected, rng, vocab))
    drafter = ReferenceDrafter(prompt, store=store)
    out = decode(
        tiny_llama,
        None,
        prompt,
        processors=None,
        sampling=False,
        generator=None,
        max_new_tokens=60,
        eos_ids=eos_token_ids(tiny_llama, None),
        stop_strings=[],
        streamer=None,
        drafter=drafter,
        policy=AlwaysDraft(max_draft=16),
    )
    assert out.token_ids == expected
    assert out.stats.drafted_tokens > out.stats.accepted_tokens > 0


def test_tensor_prompts_and_bad_input(tiny_llama):
    prompt = [5, 6, 7, 8]
    expected = hf_greedy(tiny_llama, prompt, 5)
    for form in (torch.tensor(prompt), torch.tensor([prompt])):
        assert refdecode.generate(tiny_llama, None, form, max_new_tokens=5).token_ids == expected
    with pytest.raises(ValueError, match="batch size"):
        refdecode.generate(tiny_llama, None, torch.tensor([prompt, prompt]), max_new_tokens=5)
    with pytest.raises(ValueError, match="no tokens"):
        refdecode.generate(tiny_llama, None, [], max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        refdecode.generate(tiny_llama, None, prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="context"):
        refdecode.generate(tiny_llama, None, [3] * 600, max_new_tokens=5)
