"""transformers integration: model.generate(custom_generate=refdecode.hf_generate, ...)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria

import refdecode
from refdecode.policy import DraftPolicy, ForwardCostModel


def flat_costs():
    """A draft policy that sees wide forwards as free, so drafting never depends on this machine's timing."""
    return DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0}))


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def model_with_vocab(tokenizer):
    """A tiny random Llama over SmolLM2's real vocabulary, so text-level features (stop strings) are testable."""
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked distributions, so greedy text has words rather than ties
    return model


def test_custom_generate_equals_plain_generate(model_with_vocab, tokenizer):
    x = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    plain = model_with_vocab.generate(x, max_new_tokens=40, do_sample=False)
    continuation = tokenizer.decode(plain[0, x.shape[1] :])
    ours = model_with_vocab.generate(
        x,
        max_new_tokens=40,
        do_sample=False,
        custom_generate=refdecode.hf_generate,
        references=["unrelated text " + continuation],
        ref_tokenizer=tokenizer,
        policy=flat_costs(),
        ref_stats=(stats := refdecode.GenerationStats()),
    )
    assert torch.equal(ours, plain)
    assert stats.accepted_tokens > 0
    assert stats.steps > 0 and stats.new_tokens == 40 and len(stats.draft_lengths) == stats.steps
    assert not hasattr(model_with_vocab, "refdecode_stats")  # nothing is written onto the caller's model


def test_stop_strings_match_transformers(model_with_vocab, tokenizer):
    x = torch.tensor([tokenizer.encode("Once upon a time")])
    full = model_with_vocab.generate(x, max_new_tokens=30, do_sample=False)[0, x.shape[1] :].tolist()
    text = tokenizer.decode(full)
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a string that appears mid-way, maybe across tokens
    assert stop.strip()
    plain = model_with_vocab.generate(x, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    ours = model_with_vocab.generate(  # transformers drops tokenizer= for callables: stop= + ref_tokenizer= instead
        x,
        max_new_tokens=30,
        do_sample=False,
        stop=[stop],
        custom_generate=refdecode.hf_generate,
        references=[text],
        ref_tokenizer=tokenizer,
    )
    assert torch.equal(ours, plain)
    direct = refdecode.generate(model_with_vocab, tokenizer, x[0], max_new_tokens=30, stop=stop)
    assert direct.token_ids == plain[0, x.shape[1] :].tolist()
    assert direct.stop_reason == "stop_string"


def test_text_streamer_receives_exactly_the_output(model_with_vocab, tokenizer):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    x = torch.tensor([tokenizer.encode("Streaming test")])
    streamer = Collect()
    ours = model_with_vocab.generate(
        x,
        max_new_tokens=12,
        do_sample=False,
        custom_generate=refdecode.hf_generate,
        ref_streamer=streamer,
    )
    assert streamer.ended
    assert streamer.chunks[0] == x[0].tolist()  # the prompt first, as transformers does
    assert sum(streamer.chunks[1:], []) == ours[0, x.shape[1] :].tolist()


def test_custom_stopping_criteria_and_token_references(model_with_vocab, tokenizer):
    class AtToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    x = torch.tensor([tokenizer.encode("Custom criteria")])
    full = model_with_vocab.generate(x, max_new_tokens=20, do_sample=False)
    stop_token = int(full[0, x.shape[1] + 7])
    plain = model_with_vocab.generate(x, max_new_tokens=20, do_sample=False, stopping_criteria=[AtToken(stop_token)])
    ours = model_with_vocab.generate(
        x,
        max_new_tokens=20,
        do_sample=False,
        stopping_criteria=[AtToken(stop_token)],
        custom_generate=refdecode.hf_generate,
        references=[full[0].tolist()],  # token ids need no tokenizer
    )
    assert torch.equal(ours, plain)


def test_unsupported_settings_fail_clearly(model_with_vocab, tokenizer):
    x = torch.tensor([tokenizer.encode("Batch")] * 2)
    with pytest.raises(ValueError, match="batch size"):
        model_with_vocab.generate(x, max_new_tokens=4, custom_generate=refdecode.hf_generate)
    with pytest.raises(ValueError, match="ref_tokenizer"):
        model_with_vocab.generate(x[:1], max_new_tokens=4, custom_generate=refdecode.hf_generate, references=["a"])


def test_num_beams_is_reported_as_beam_search(model_with_vocab, tokenizer):
    """transformers repeats input_ids num_beams times before calling us: this used to read as 'batch size 2'."""
    x = torch.tensor([tokenizer.encode("Beams")])
    with pytest.raises(ValueError, match=r"beam search \(num_beams=2\)"):
        model_with_vocab.generate(x, max_new_tokens=4, num_beams=2, custom_generate=refdecode.hf_generate)


def test_left_padded_input_with_its_mask_equals_transformers(model_with_vocab, tokenizer):
    """The mask used to be ignored: the pad tokens were decoded as prompt text and the output differed."""
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    pad = 0  # <|endoftext|>: as a visible token it changes this model's continuation (checked below)
    x = torch.tensor([[pad] * 5 + ids])
    mask = torch.tensor([[0] * 5 + [1] * len(ids)])
    plain = model_with_vocab.generate(x, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=pad)
    ours = model_with_vocab.generate(
        x,
        attention_mask=mask,
        max_new_tokens=24,
        do_sample=False,
        pad_token_id=pad,
        custom_generate=refdecode.hf_generate,
        policy=flat_costs(),
    )
    assert torch.equal(ours, plain)
    assert ours[0, :5].tolist() == [pad] * 5  # the padding is kept in front, as transformers returns it
    unmasked = model_with_vocab.generate(
        x, attention_mask=torch.ones_like(mask), max_new_tokens=24, do_sample=False, pad_token_id=pad
    )
    assert not torch.equal(unmasked, plain), "the padding must matter for this test to mean anything"


@pytest.mark.parametrize(
    "mask, message",
    [
        ([1, 1, 1, 0], "not left padding"),  # right padding
        ([0, 1, 0, 1], "not left padding"),  # a hole
        ([0, 0, 0, 0], "masks every input token"),
        ([1, 2, 1, 1], "only 0 and 1"),
    ],
)
def test_masks_that_are_not_left_padding_are_refused(model_with_vocab, tokenizer, mask, message):
    x = torch.tensor([tokenizer.encode("one two three four")[:4]])
    assert x.shape[1] == 4
    with pytest.raises(ValueError, match=message):
        model_with_vocab.generate(
            x,
            attention_mask=torch.tensor([mask]),
            max_new_tokens=4,
            do_sample=False,
            custom_generate=refdecode.hf_generate,
        )


def test_out_of_vocabulary_ids_through_hf_generate(model_with_vocab, tokenizer):
    x = torch.tensor([[5, len(tokenizer)]])
    with pytest.raises(ValueError, match="vocabulary size"):
        model_with_vocab.generate(x, max_new_tokens=4, do_sample=False, custom_generate=refdecode.hf_generate)


def test_memory_records_and_drafts_a_repeated_call(model_with_vocab, tokenizer):
    from refdecode.corpus.testing import WordTokenizer

    x = torch.tensor([tokenizer.encode("Once upon a time, in a small village by the sea,")])
    plain = model_with_vocab.generate(x, max_new_tokens=30, do_sample=False)
    memory = refdecode.OutputMemory()
    runs = []
    for _ in range(2):
        ours = model_with_vocab.generate(
            x,
            max_new_tokens=30,
            do_sample=False,
            custom_generate=refdecode.hf_generate,
            ref_tokenizer=tokenizer,
            memory=memory,
            policy=flat_costs(),
            ref_stats=(stats := refdecode.GenerationStats()),
        )
        assert torch.equal(ours, plain)
        runs.append(stats)
    assert len(memory) == 2 and memory.outputs()[0] == plain[0, x.shape[1] :].tolist()
    assert runs[1].accepted_tokens > runs[0].accepted_tokens and runs[1].steps < runs[0].steps
    with pytest.raises(ValueError, match="another tokenizer"):  # bound to ref_tokenizer: ids of another refused
        model_with_vocab.generate(
            x, max_new_tokens=3, custom_generate=refdecode.hf_generate, ref_tokenizer=WordTokenizer(), memory=memory
        )


def test_hf_generate_takes_every_option_generate_takes():
    """One setup path: every refdecode option of generate() reaches hf_generate too; transformers' own arguments
    (its generation config, logits processors, streamer) stand for the rest."""
    import inspect

    ours = set(inspect.signature(refdecode.hf_generate).parameters)
    theirs = set(inspect.signature(refdecode.generate).parameters)
    native = {"model", "tokenizer", "prompt", "max_new_tokens", "temperature", "top_k", "top_p"}
    native |= {"repetition_penalty", "generator", "logits_processor", "eos_token_id", "chat", "streamer"}
    assert theirs - native <= ours, theirs - native - ours


def test_hf_generate_passes_calibrate_and_fills_only_the_callers_stats(model_with_vocab, tokenizer, monkeypatch):
    import refdecode.decoding

    calls = []
    monkeypatch.setattr(refdecode.decoding, "calibrate_costs", lambda *a, **k: calls.append(1) or {1: 1.0, 64: 1.0})
    x = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    plain = model_with_vocab.generate(x, max_new_tokens=12, do_sample=False)
    for calibrate in (False, True):
        stats = refdecode.GenerationStats()
        ours = model_with_vocab.generate(
            x,
            max_new_tokens=12,
            do_sample=False,
            custom_generate=refdecode.hf_generate,
            calibrate=calibrate,
            tie_margin=1e-3,
            retrieve_k=2,
            rerank=0,
            ref_stats=stats,
        )
        assert torch.equal(ours, plain) and stats.new_tokens == 12
    assert calls == [1]  # only the call with calibrate=True calibrated
    with pytest.raises(ValueError, match="ref_stats must be a refdecode.GenerationStats"):
        model_with_vocab.generate(x, max_new_tokens=2, custom_generate=refdecode.hf_generate, ref_stats={})
