"""Property-based tests of the public API: greedy refdecode == transformers greedy `generate`, token for
token, whatever the prompt, store, budget, stop strings and draft cap; through `refdecode.generate`,
`model.generate(custom_generate=refdecode.hf_generate)` and the CLI; and junk input either works or raises
ValueError / TypeError.

Most properties run on a tiny random Llama with a 96-token vocabulary and a 64-position context, so a prompt near
the context limit costs milliseconds; a few use SmolLM2's real tokenizer (its 49k vocabulary over the same tiny
layers) for text prompts, emoji and CJK.

Examples per property scale with the hypothesis profile (tests/conftest.py: 40 in CI, 1000 in `make fuzz`). Each
generated token costs ~25 ms per decode on a loaded 2-core machine (a forward plus generate's Python overhead), so
the properties that decode are run on a fraction of the profile and keep max_new_tokens small (prompts, which
cost one prefill, still reach the context limit): in CI 10 examples for each decoding property (equality with
transformers, stop strings, real tokenizer), 2 for the CLI (a process per example) and 40 for junk input; in
`make fuzz` 250, 50 and 1000.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test extra: pip install -e '.[test]'")
from hypothesis import assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from stats_helpers import IdTokenizer, tiny_llama  # noqa: E402

import refdecode  # noqa: E402
from refdecode.store import ReferenceStore  # noqa: E402

pytestmark = pytest.mark.fuzz

VOCAB = 96
CONTEXT = 64
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=0, max_positions=CONTEXT)


@pytest.fixture(scope="module")
def stores():
    """Prebuilt stores by kind (built once: thousands of documents take a moment): None, empty, one-token documents,
    and 3000 short documents."""
    rng = random.Random(0)
    tok = IdTokenizer(VOCAB)
    empty = ReferenceStore(tok)
    one_token = ReferenceStore(tok)
    for t in range(0, VOCAB, 3):
        one_token.add([t])
    many = ReferenceStore(tok)
    for _ in range(3000):
        many.add([rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))])
    return {"none": None, "empty": empty, "one-token": one_token, "thousands": many}


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def first_stop_oracle(tokenizer, tokens: list[int], stops: list[str]) -> list[int]:
    """tokens cut after the first token whose decoded output text (from the first new token) contains a stop
    string: the contract of `stop=`, by brute force."""
    for i in range(len(tokens)):
        if any(s in tokenizer.decode(tokens[: i + 1]) for s in stops):
            return tokens[: i + 1]
    return tokens


@st.composite
def prompts(draw, vocab: int = VOCAB, max_len: int = CONTEXT - 1):
    """Token-id prompts from 1 token up to the context limit, random or repetitive (repeats are what drafts copy)."""
    length = draw(st.integers(1, max_len))
    if draw(st.booleans()):
        return draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length))
    pattern = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
    return (pattern * (length // len(pattern) + 1))[:length]


MAX_DRAFTS = st.sampled_from([0, 1, 2, 5, 16, 64, 1000])
MAX_NEW = 12  # the budget of an example (every token is a forward on each side), except near the context limit


def fraction(divisor: int, least: int = 2) -> settings:
    """The profile's examples divided by `divisor` (for properties that decode; see the module docstring)."""
    return settings(max_examples=max(least, settings().max_examples // divisor))


@fraction(4)
@given(
    prompt=prompts(),
    data=st.data(),
    kind=st.sampled_from(["none", "empty", "one-token", "thousands", "oracle"]),
    max_draft=MAX_DRAFTS,
    route=st.sampled_from(["generate", "hf_generate"]),
)
def test_greedy_equals_transformers(model, stores, prompt, data, kind, max_draft, route):
    max_new = data.draw(st.integers(1, min(MAX_NEW, CONTEXT - len(prompt))), label="max_new_tokens")
    expected = hf_greedy(model, prompt, max_new)
    if kind == "oracle":  # the true continuation after the prompt's tail: long accepted drafts
        store = ReferenceStore(IdTokenizer(VOCAB))
        store.add(prompt[-3:] + expected)
    else:
        store = stores[kind]
    if route == "generate":
        out = refdecode.generate(
            model, IdTokenizer(VOCAB), prompt, store=store, max_new_tokens=max_new, max_draft=max_draft
        )
        assert out.token_ids == expected
        assert out.stop_reason in ("eos", "max_new_tokens")
    else:
        through_hf = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new,
            do_sample=False,
            custom_generate=refdecode.hf_generate,
            store=store,
            max_draft=max_draft,
        )
        assert through_hf[0, len(prompt) :].tolist() == expected


@fraction(4)
@given(prompt=prompts(max_len=40), data=st.data(), max_draft=MAX_DRAFTS)
def test_stop_strings_from_the_prompt(model, prompt, data, max_draft):
    """Stop strings cut out of the prompt's text: the output stops exactly where its own text first contains one
    (the prompt's text is not searched)."""
    tok = IdTokenizer(VOCAB)
    text = tok.decode(prompt)
    start = data.draw(st.integers(0, len(text) - 1), label="start")
    stop = text[start : start + data.draw(st.integers(1, 12), label="length")]
    assume(stop.strip())
    max_new = data.draw(st.integers(1, MAX_NEW), label="max_new_tokens")
    expected = first_stop_oracle(tok, hf_greedy(model, prompt, max_new), [stop])
    store = ReferenceStore(tok)
    store.add(prompt)
    out = refdecode.generate(model, tok, prompt, store=store, max_new_tokens=max_new, stop=[stop], max_draft=max_draft)
    assert out.token_ids == expected
    assert (out.stop_reason == "stop_string") == (stop in tok.decode(out.token_ids))


# ---------------------------------------------------------------------------------------------------------------
# The real tokenizer: text prompts, emoji, CJK
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def vocab_model(tokenizer):
    """The tiny layers over SmolLM2's real vocabulary, lm_head scaled so greedy text has words rather than ties."""
    m = tiny_llama(vocab_size=len(tokenizer), seed=1, max_positions=256, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        m.lm_head.weight.mul_(40)
    return m


TEXT = st.text(
    alphabet=st.sampled_from(list("abcde fgh.,\n") + ["😀", "🎉", "漢", "字", "é", "ß", "。"]), min_size=1, max_size=60
).filter(lambda s: s.strip())


@fraction(4)
@given(text=TEXT, data=st.data(), max_draft=MAX_DRAFTS)
def test_text_prompts_with_the_real_tokenizer(vocab_model, tokenizer, text, data, max_draft):
    ids = tokenizer.encode(text)
    max_new = data.draw(st.integers(1, MAX_NEW), label="max_new_tokens")
    full = hf_greedy(vocab_model, ids, max_new)
    out_text = tokenizer.decode(full)
    stops = []
    if data.draw(st.booleans(), label="stop from the prompt"):
        start = data.draw(st.integers(0, len(text) - 1), label="start")
        stops = [text[start : start + data.draw(st.integers(1, 10), label="length")]]
    elif out_text.strip() and data.draw(st.booleans(), label="stop from the output"):
        start = data.draw(st.integers(0, len(out_text) - 1), label="start")
        stops = [out_text[start : start + data.draw(st.integers(1, 20), label="length")]]
    stops = [s for s in stops if "\ufffd" not in s]  # a half character is not a stop string anyone writes
    expected = first_stop_oracle(tokenizer, full, stops)
    store = refdecode.ReferenceStore(tokenizer)
    store.add(text + out_text)
    out = refdecode.generate(
        vocab_model,
        tokenizer,
        text,
        store=store,
        max_new_tokens=max_new,
        stop=stops,
        max_draft=max_draft,
        calibrate=False,
    )  # timing plays no part in the output
    assert out.token_ids == expected


# ---------------------------------------------------------------------------------------------------------------
# The CLI on a local model directory
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vocab_model, tokenizer):
    """A tiny random Llama saved with save_pretrained, SmolLM2's tokenizer saved beside it."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@fraction(20)  # each example starts a Python process: ~5-10 s of imports on a small machine
@given(text=TEXT, max_new=st.integers(1, 12), max_draft=MAX_DRAFTS, with_ref=st.booleans())
def test_cli_equals_transformers(
    vocab_model, tokenizer, model_dir, tmp_path_factory, text, max_new, max_draft, with_ref
):
    expected = hf_greedy(vocab_model, tokenizer.encode(text), max_new)
    argv = [
        sys.executable,
        "-m",
        "refdecode.cli",
        "generate",
        "--model",
        str(model_dir),
        f"--prompt={text}",
        "--max-new-tokens",
        str(max_new),
        "--max-draft",
        str(max_draft),
        "--json",
    ]
    if with_ref:
        ref = tmp_path_factory.mktemp("ref") / "ref.txt"
        ref.write_text(text + tokenizer.decode(expected), encoding="utf-8")
        argv += ["--ref", str(ref)]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1"
    )
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == expected


# ---------------------------------------------------------------------------------------------------------------
# Junk in, ValueError / TypeError out (never another exception, never a hang)
# ---------------------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.binary(max_size=4),
)
JUNK = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.lists(st.integers(-3, VOCAB + 3), max_size=6),
    st.tuples(st.integers(0, VOCAB - 1)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(
        lambda dtype, shape: (torch.arange(1, 1 + torch.Size(shape).numel()) % VOCAB).reshape(shape).to(dtype),
        st.sampled_from([torch.long, torch.int32, torch.uint8, torch.float32, torch.float16, torch.bool]),
        st.lists(st.integers(0, 3), max_size=3),
    ),
)
BUDGETS = st.one_of(st.integers(-2, 4), st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans())


@st.composite
def mostly(draw, valid, junk, junk_share: float = 0.1):
    """A valid value (or None) most of the time and junk now and then, so that whole calls often get through and
    exercise the decode loop, not only the first check that refuses them."""
    if draw(st.integers(0, 99)) < 100 * junk_share:
        return draw(junk)
    return draw(st.one_of(st.none(), valid))


VALID_PROMPTS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)


@given(
    prompt=mostly(VALID_PROMPTS, JUNK, 0.5),
    max_new_tokens=mostly(st.integers(1, 4), BUDGETS, 0.3),
    temperature=mostly(st.floats(0, 2), SCALARS),
    top_k=mostly(st.integers(1, 200), SCALARS),
    top_p=mostly(st.floats(0.01, 1), SCALARS),
    repetition_penalty=mostly(st.floats(0.5, 2), SCALARS),
    seed=mostly(st.integers(0, 2**64 - 1), SCALARS),
    stop=mostly(st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3)), SCALARS),
    max_draft=mostly(st.integers(0, 70), st.one_of(st.integers(-3, -1), SCALARS)),
)
def test_junk_works_or_raises_value_or_type_error(
    model, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, max_draft
):
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        max_draft=max_draft,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("max_new_tokens", "temperature")}
    if kwargs.get("temperature") is None:
        kwargs.pop("temperature")
    try:
        out = refdecode.generate(model, IdTokenizer(VOCAB), prompt, calibrate=False, **kwargs)
    except (ValueError, TypeError) as err:
        event(f"raised {type(err).__name__}")  # --hypothesis-show-statistics shows how often each outcome came up
        return
    event("generated")
    assert 1 <= len(out.token_ids) <= 4
    assert all(0 <= t < VOCAB for t in out.token_ids)
