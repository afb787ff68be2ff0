"""generate(..., index=...): drafting from a corpus index keeps the output identical to plain greedy decoding."""

import pytest
import torch

import refdecode
from refdecode.corpus import CorpusIndex, build_index
from refdecode.corpus.testing import WordTokenizer
from refdecode.policy import DraftPolicy, ForwardCostModel


def words_for(tokenizer, ids):
    """Words that the toy tokenizer maps to exactly these ids."""
    by_id = {}
    i = 0
    while len(by_id) < tokenizer.vocab_size - 1:
        by_id.setdefault(tokenizer.encode(f"x{i}")[0], f"x{i}")
        i += 1
    return " ".join(by_id[t] for t in ids)


def test_generate_with_index_equals_greedy(tiny_llama, tmp_path):
    tokenizer = WordTokenizer(vocab_size=tiny_llama.config.vocab_size)
    prompt = tokenizer.encode(words_for(tokenizer, [5, 9, 33, 17, 60, 2, 44, 71]))
    expected = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :]
    expected = expected.tolist()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # one document continues the way the model will, the rest are noise: drafts come from the corpus only
    (corpus / "answer.txt").write_text(words_for(tokenizer, prompt[-3:] + expected))
    for k in range(5):
        (corpus / f"noise{k}.txt").write_text(words_for(tokenizer, [(7 * k + j) % 90 + 3 for j in range(200)]))
    out_dir = build_index(
        [corpus], tmp_path / "index", tokenizer=tokenizer, model_name="tiny", embedder="hashed", progress=False
    )
    index = CorpusIndex.load(out_dir, tokenizer=tokenizer)
    flat = DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0}))  # drafting pays whatever this machine's timing
    out = refdecode.generate(tiny_llama, tokenizer, prompt, index=index, max_new_tokens=40, policy=flat)
    assert out.token_ids == expected
    assert out.stats.accepted_tokens > 10
    by_path = refdecode.generate(tiny_llama, tokenizer, prompt, index=str(out_dir), max_new_tokens=40)
    assert by_path.token_ids == expected
    reranked = refdecode.generate(tiny_llama, tokenizer, prompt, index=index, rerank=6, max_new_tokens=40)
    assert reranked.token_ids == expected
    with pytest.raises(ValueError, match="rerank"):
        refdecode.generate(tiny_llama, tokenizer, prompt, index=index, rerank=-1, max_new_tokens=4)


def test_a_loaded_index_of_another_tokenizer_is_refused(tiny_llama, tmp_path):
    """generate(index=CorpusIndex) checks the tokenizer fingerprint exactly as generate(index=path) does."""
    from refdecode.corpus.format import IndexFormatError

    tokenizer = WordTokenizer(vocab_size=tiny_llama.config.vocab_size)
    other = WordTokenizer(vocab_size=tiny_llama.config.vocab_size, salt="other-")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(words_for(tokenizer, list(range(3, 60))))
    out_dir = build_index(
        [corpus], tmp_path / "index", tokenizer=tokenizer, model_name="tiny", embedder="hashed", progress=False
    )
    index = CorpusIndex.load(out_dir)  # loaded without a tokenizer: nothing checked yet
    prompt = other.encode(words_for(other, [5, 9, 33]))
    with pytest.raises(IndexFormatError, match="another tokenizer"):
        refdecode.generate(tiny_llama, other, prompt, index=index, max_new_tokens=4)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        refdecode.generate(tiny_llama, None, [5, 9, 33], index=index, max_new_tokens=4)
