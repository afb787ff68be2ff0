"""Hostile input to the public API: clear ValueErrors for bad prompts and options, stop strings however
many tokens they span, and a clear error instead of an arbitrary token when the model's logits are NaN or inf."""

import math

import numpy as np
import pytest
import torch
from stats_helpers import IdTokenizer, tiny_llama

import refdecode
from refdecode.stopping import StopChecker

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=0, max_positions=64)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([5, VOCAB], r"prompt token 1 is 96: token ids must be in 0 \.\. 95 .*vocabulary size.* is 96"),
        ([-1, 5], r"prompt token 0 is -1: token ids must be in 0 \.\. 95 .*vocab_size"),
        (torch.tensor([[3, VOCAB + 7]]), "vocabulary size"),
        ([1.5, 2], "not an integer token id"),
        ([2.0, 3], "not an integer token id"),  # an integral float is still not a token id
        (["1", "2"], "not an integer token id"),
        ([True, 3], "bool"),
        (torch.tensor([1.0, 2.0]), "integer token ids, got dtype torch.float32"),
        (torch.tensor([True, False]), "got dtype torch.bool"),
        (np.array([1.5, 2.5]), "integer token ids"),
        ([], "no tokens"),
        (torch.zeros(0, dtype=torch.long), "no tokens"),
        (torch.zeros(2, 2, dtype=torch.long), "batch size 2"),
        ("   ", "empty"),
        ("5 6", "needs the tokenizer"),
        (b"5 6", "bytes"),
        ([[5, 6]], "not an integer token id"),
    ],
)
def test_bad_prompts_raise_clear_value_errors(model, prompt, message):
    with pytest.raises(ValueError, match=message):
        refdecode.generate(model, None, prompt, max_new_tokens=2)


def test_prompt_that_is_not_a_sequence_is_a_type_error(model):
    for prompt in (5, None, {"a": 1}, object()):
        with pytest.raises(TypeError, match="the prompt must be"):
            refdecode.generate(model, None, prompt, max_new_tokens=2)


def test_numpy_and_tensor_ids_of_any_integer_type_work(model):
    expected = refdecode.generate(model, None, [5, 6, 7], max_new_tokens=3, calibrate=False).token_ids
    for prompt in (
        np.array([5, 6, 7], dtype=np.int32),
        torch.tensor([5, 6, 7], dtype=torch.int16),
        [np.int64(5), 6, torch.tensor(7)],
    ):
        assert refdecode.generate(model, None, prompt, max_new_tokens=3, calibrate=False).token_ids == expected


def test_vocabulary_size_falls_back_to_the_output_embedding(model):
    from refdecode.inputs import vocab_size

    class NoConfigSize(torch.nn.Module):
        config = type("Config", (), {})()

        def get_output_embeddings(self):
            return model.lm_head

    assert vocab_size(model) == VOCAB
    assert vocab_size(NoConfigSize()) == VOCAB


def test_text_prompt_with_lone_surrogates_is_a_value_error(model):
    tokenizer = IdTokenizer(VOCAB)
    with pytest.raises(ValueError, match="not valid Unicode"):
        refdecode.generate(model, tokenizer, "5 6 \udcff", max_new_tokens=2)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=math.nan), "temperature"),  # was silently greedy
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature="0.7"), "temperature must be a number"),
        (dict(temperature=0.7, top_p=0.0), "top_p"),
        (dict(temperature=0.7, top_p=1.5), "top_p"),
        (dict(temperature=0.7, top_p=math.nan), "top_p"),
        (dict(temperature=0.7, top_k=-1), "top_k must be >= 0"),
        (dict(temperature=0.7, top_k=-3), "top_k"),
        (dict(temperature=0.7, top_k=2.5), "top_k must be an int"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=math.nan), "repetition_penalty"),
        (dict(repetition_penalty=math.inf), "repetition_penalty"),
        (dict(temperature=0.7, seed=-1), "seed"),
        (dict(temperature=0.7, seed=2**64), "seed"),
        (dict(temperature=0.7, seed="1"), "seed must be an int"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-5), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an int"),
        (dict(max_new_tokens="4"), "max_new_tokens must be an int"),
        (dict(max_new_tokens=True), "max_new_tokens must be an int"),
        (dict(max_new_tokens=None), "max_new_tokens must be an int"),
        (dict(max_draft=-1), "max_draft"),
        (dict(max_draft=2.5), "max_draft"),
        (dict(stop=5), "stop must be a str or a list of str"),
        (dict(stop=[b"x"]), "stop must be"),
    ],
)
def test_bad_options_raise_clear_value_errors(model, options, message):
    options.setdefault("max_new_tokens", 2)
    with pytest.raises(ValueError, match=message):
        refdecode.generate(model, IdTokenizer(VOCAB), [5, 6, 7], **options)


# ---------------------------------------------------------------------------------------------------------------
# Stop strings that take many tokens
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def vocab_model(tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary: real text, and a forward of a few milliseconds."""
    return tiny_llama(vocab_size=len(tokenizer), seed=3, max_positions=512, eos_token_id=None)


class Script:
    """A logits processor that forces the output to follow `tokens` (then repeats the last one): greedy decoding
    then emits exactly this text, so what the stop check sees is known in advance."""

    def __init__(self, prompt_len: int, tokens: list[int]):
        self.prompt_len, self.tokens = prompt_len, tokens

    def __call__(self, input_ids, scores):
        position = min(input_ids.shape[1] - self.prompt_len, len(self.tokens) - 1)
        forced = torch.full_like(scores, -1e9)
        forced[:, self.tokens[position]] = 0.0
        return forced


@pytest.mark.parametrize(
    "text, stop",
    [
        ("Smile! " + "😀" * 12 + " and more", "😀" * 8),  # 3 byte-level tokens per emoji: 24 tokens for 8 characters
        ("前言。我们今天去公园散步，然后在湖边吃了午饭。之后回家。", "我们今天去公园散步，然后在湖边吃了午饭。"),
    ],
)
def test_stop_string_spanning_many_tokens_is_found(vocab_model, tokenizer, text, stop):
    prompt = tokenizer.encode("Say it:")
    script = tokenizer.encode(text)
    assert len(tokenizer.encode(stop)) > len(stop) + 9  # beyond the old fixed window of len(stop) + 9 tokens
    out = refdecode.generate(
        vocab_model,
        tokenizer,
        prompt,
        max_new_tokens=len(script) + 5,
        stop=[stop],
        logits_processor=[Script(len(prompt), script)],
        calibrate=False,
    )
    assert out.stop_reason == "stop_string"
    assert out.text.endswith(stop) and out.text.count(stop) == 1
    assert stop not in tokenizer.decode(out.token_ids[:-1])  # stopped at the token that completes it


def test_stop_check_decodes_a_bounded_window_per_token(tokenizer):
    """The cost per token stays O(tokens of the stop string), not O(output): no re-decoding of the whole output."""
    decoded = []

    class Counting:
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    output = tokenizer.encode("😀 漢字 text " * 200)  # ~1600 tokens mixing 3-token emoji, CJK and words
    checker = StopChecker(Counting(), set(), ["never appears here"], None, [])
    assert checker.first_stop(output, 0) is None
    assert max(decoded) <= checker.max_width + 1 < 200


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf logits
# ---------------------------------------------------------------------------------------------------------------


def poison_after(model, calls: int, value: float):
    """A hook that replaces the logits with `value` from the `calls`-th forward of lm_head on (0 = the prefill)."""
    seen = [0]

    def hook(module, inputs, output):
        seen[0] += 1
        return torch.full_like(output, value) if seen[0] > calls else output

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("calls, where", [(0, "the prefill"), (3, "verification step 3")])
def test_non_finite_logits_stop_with_a_clear_error(model, value, calls, where):
    handle = poison_after(model, calls, value)
    try:
        with pytest.raises(refdecode.NonFiniteLogitsError, match=f"non-finite logits at {where}"):
            refdecode.generate(model, None, [5, 6, 7], max_new_tokens=10, calibrate=False)
    finally:
        handle.remove()
    assert issubclass(refdecode.NonFiniteLogitsError, RuntimeError)


def test_non_finite_logits_through_hf_generate(model):
    handle = poison_after(model, 0, math.nan)
    try:
        with pytest.raises(refdecode.NonFiniteLogitsError, match="the prefill"):
            model.generate(
                torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, custom_generate=refdecode.hf_generate
            )
    finally:
        handle.remove()


def test_half_precision_overflow_is_reported(model):
    """A float16 model whose output layer overflows: inf logits, reported rather than decoded as arbitrary tokens."""
    half = tiny_llama(vocab_size=VOCAB, seed=0, max_positions=64, logit_scale=1e6).half()
    with pytest.raises(refdecode.NonFiniteLogitsError, match="overflow"):
        refdecode.generate(half, None, [5, 6, 7], max_new_tokens=4, calibrate=False)


def test_sampling_warpers_minus_inf_is_not_mistaken_for_overflow(model):
    """top-k writes -inf into the scores on purpose: only the raw logits are checked."""
    out = refdecode.generate(model, None, [5, 6, 7], max_new_tokens=6, temperature=0.8, top_k=3, seed=1)
    assert len(out.token_ids) == 6


def test_top_k_zero_means_off_as_in_transformers(model):
    """top_k=0 disables the top-k warper (transformers' convention): the same output as top_k=None."""
    off = refdecode.generate(model, None, [5, 6, 7], max_new_tokens=6, temperature=0.8, top_k=None, seed=3)
    zero = refdecode.generate(model, None, [5, 6, 7], max_new_tokens=6, temperature=0.8, top_k=0, seed=3)
    assert zero.token_ids == off.token_ids
