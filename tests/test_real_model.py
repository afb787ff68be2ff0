"""The real SmolLM2-135M: greedy equivalence with transformers on a few prompts, the model cache, names."""

import time

import pytest
import torch

import refdecode
from refdecode.models import KNOWN_MODELS


def chat_ids(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return ids["input_ids"] if hasattr(ids, "keys") else list(ids)


PROMPTS = [
    (
        'Here is a function:\n```python\ndef area(w, h):\n    """Area of a rectangle."""\n    return w * h\n```\n'
        "Rewrite it with type hints and the same docstring.",
        None,
    ),
    ("Summarize: The Python FAQ explains that lists are mutable sequences, while tuples are immutable.", None),
    (
        "Write the next lines of this README.",
        "refdecode makes language-model generation faster by drafting tokens from reference text and verifying "
        "them with the target model in one forward pass. Even when the prophet is wrong, the result is the same.",
    ),
]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("case", range(len(PROMPTS)))
def test_smollm2_greedy_identical_to_transformers(smollm2, case):
    model, tokenizer = smollm2
    text, reference = PROMPTS[case]
    ids = chat_ids(tokenizer, text)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids) :].tolist()
    store = None
    if reference is not None:
        store = refdecode.ReferenceStore(tokenizer)
        store.add(reference, source="readme")
    out = refdecode.generate(model, tokenizer, ids, store=store, max_new_tokens=48)
    assert out.token_ids == expected
    assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert out.stats.steps <= len(expected)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_str_prompt_with_chat_template(smollm2):
    model, tokenizer = smollm2
    text = PROMPTS[0][0]
    by_ids = refdecode.generate(model, tokenizer, chat_ids(tokenizer, text), max_new_tokens=16)
    by_text = refdecode.generate(model, tokenizer, text, chat=True, max_new_tokens=16)
    assert by_ids.token_ids == by_text.token_ids


@pytest.mark.slow
@pytest.mark.real_model
def test_model_cache_second_load_is_fast_and_identical(smollm2):
    model, _ = smollm2  # the fixture converted the GGUF (or found the cache)
    start = time.perf_counter()
    again, tokenizer = refdecode.load_model("smollm2-135m")
    assert time.perf_counter() - start < 20
    x = torch.tensor([tokenizer.encode("Hello there")])
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_unknown_model_lists_known_names(tmp_path):
    with pytest.raises(refdecode.ModelNotFoundError) as err:
        refdecode.load_model("no-such-model-xyz")
    for name in KNOWN_MODELS:
        assert name in str(err.value)
    with pytest.raises(refdecode.ModelNotFoundError, match="config.json"):
        refdecode.load_model(str(tmp_path))


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_greedy_identical_with_every_width_routed(smollm2):
    """The transposed CPU kernels (refdecode.kernels) at every width, whatever this machine's calibration chose:
    the output stays transformers' greedy output token for token, and long drafts are accepted."""
    from refdecode import kernels

    model, tokenizer = smollm2
    text, reference = PROMPTS[0][0], PROMPTS[2][1]
    ids = chat_ids(tokenizer, text + "\n\n" + reference + "\nRepeat the last paragraph word for word.")
    expected = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids) :].tolist()
    before = kernels.route_widths(model)
    kernels.set_route(model, dict.fromkeys((2, 4, 8, 16, 32, 64), True))
    try:
        out = refdecode.generate(model, tokenizer, ids, max_new_tokens=48, calibrate=False)
    finally:
        kernels.set_route(model, {w: w in before for w in (2, 4, 8, 16, 32, 64)})
    assert out.token_ids == expected
    assert out.stats.accepted_tokens > 0
