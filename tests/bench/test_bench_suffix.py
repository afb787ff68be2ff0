"""SuffixDecoding's drafter as a refdecode Drafter (refdecode.bench.suffix): drafts on SmolLM2's tokens of real text
(no model), chain and tree shapes, references in the global tree, request cleanup, and lossless decoding on a tiny
model. Skipped where arctic-inference is not installed (`make suffix-setup`), except what needs no arctic."""

import sys

import pytest
import torch

import refdecode
from refdecode.bench import runner
from refdecode.bench.suffix import SuffixDrafter, require_suffix, suffix_available, to_draft_tree
from refdecode.drafters import Draft
from refdecode.policy import DraftPolicy, ForwardCostModel
from refdecode.tree import ROOT, DraftTree

needs_arctic = pytest.mark.skipif(
    not suffix_available(), reason="arctic-inference is not installed (`make suffix-setup` builds it)"
)

CODE = (
    "def area(width, height):\n    return width * height\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n"
)
DOC_A = "The server restarts every night at two o'clock and writes its log to /var/log/server.log for a week."
DOC_B = "The server restarts every night at two o'clock and mails a summary to the administrators each morning."


@pytest.fixture(scope="module")
def tok(request):
    try:
        return request.getfixturevalue("smollm2_tokenizer")
    except refdecode.ModelNotFoundError as err:
        pytest.skip(f"SmolLM2's tokenizer is not installed: {err}")


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_to_draft_tree_turns_path_probabilities_into_probabilities_given_the_parent():
    tree = to_draft_tree([7, 8, 9, 4], [-1, 0, -1, 1], [0.8, 0.4, 0.2, 0.4], 5)
    assert (tree.tokens, tree.parents) == ([7, 8, 9, 4], [-1, 0, -1, 1])
    assert tree.probs == pytest.approx([0.8, 0.5, 0.2, 1.0])
    assert tree.sources == ["suffix"] * 4 and tree.match_lens == [5] * 4
    assert to_draft_tree([3], [-1], None, 1).probs is None


def test_a_missing_arctic_inference_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "arctic_inference.suffix_decoding", None)  # import now raises ImportError
    assert not suffix_available()
    with pytest.raises(ImportError, match="make suffix-setup"):
        require_suffix()
    with pytest.raises(ImportError, match="make suffix-setup"):
        SuffixDrafter([1, 2, 3])
    with pytest.raises(ValueError, match="make suffix-setup"):
        runner.BenchConfig(workloads=("rag",), methods=("refdecode", "suffix-tree"))


@needs_arctic
def test_chain_drafts_copy_the_prompts_continuation(tok):
    prompt = ids(tok, CODE)
    start = ids(tok, CODE.split("perimeter")[0])  # the prompt's tokens up to its second function
    head = prompt[len(start) - 1 : len(start) + 6]  # " perimeter(width, height):\n": once in the prompt
    assert prompt[: len(start) - 1] == start[:-1]
    with SuffixDrafter(prompt) as drafter:
        draft = drafter.propose(prompt + head, 16)
        assert isinstance(draft, Draft) and draft.source == "suffix" and draft.match_len >= 3
        rest = prompt[len(start) + 6 :]
        assert draft.tokens == rest[: len(draft.tokens)] and len(draft.tokens) >= 3
        assert len(drafter.propose(prompt + head, 2).tokens) == 2  # max_spec_tokens is passed on
        assert drafter.propose(prompt + head, 0) is None
        assert drafter.propose(prompt + ids(tok, " zebra quokka"), 16) is None  # nothing matches


@needs_arctic
def test_observed_output_is_drafted_from(tok):
    prompt = ids(tok, "Write a sentence.")
    said = ids(tok, " Lanterns glow softly over the harbour tonight while boats drift home.")
    with SuffixDrafter(prompt) as drafter:
        drafter.observe(said)
        draft = drafter.propose(prompt + said + said[:4], 8)
        assert draft is not None and draft.tokens == said[4 : 4 + len(draft.tokens)]


@needs_arctic
def test_references_act_as_cached_responses_and_are_evicted_on_close(tok):
    prompt = ids(tok, "When does the server restart?")
    doc = ids(tok, DOC_A)
    drafter = SuffixDrafter(prompt, references=[doc])
    cache = drafter.cache
    assert len(cache.cached_requests) == 2  # the reference and this request's own response slot
    draft = drafter.propose(prompt + doc[:6], 16)
    assert draft is not None and draft.tokens == doc[6 : 6 + len(draft.tokens)]
    drafter.close()
    assert list(cache.active_requests) == [] and list(cache.cached_requests) == [drafter.request_id]
    drafter.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        drafter.propose(prompt, 4)


@needs_arctic
def test_a_shared_cache_keeps_each_output_for_later_requests(tok):
    cache = require_suffix()()
    answer = ids(tok, " Restart the service with systemctl restart server, then check its status page.")
    with SuffixDrafter(ids(tok, "How do I restart it?"), cache=cache) as first:
        first.observe(answer)
    second_prompt = ids(tok, "And how again?")
    with SuffixDrafter(second_prompt, cache=cache) as second:
        draft = second.propose(second_prompt + answer[:5], 16)
        assert draft is not None and draft.tokens == answer[5 : 5 + len(draft.tokens)]
    assert not cache.active_requests


@needs_arctic
def test_tree_mode_branches_where_references_disagree(tok):
    prompt = ids(tok, "When does the server restart, and what does it do then?")
    a, b = ids(tok, DOC_A), ids(tok, DOC_B)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)  # the first differing token
    with SuffixDrafter(prompt, references=[a, b], tree=True, min_token_prob=0.0) as drafter:
        tree = drafter.propose(prompt + a[: shared - 1], 16)
        assert isinstance(tree, DraftTree)  # the constructor checks parents come first and siblings differ
        assert all(ROOT <= p < i for i, p in enumerate(tree.parents))
        assert set(tree.sources) == {"suffix"} and tree.probs is None  # the policy learns its acceptance
        assert tree.tokens[0] == a[shared - 1]
        branch = [tree.tokens[c] for c in tree.children(0)]
        assert sorted(branch) == sorted([a[shared], b[shared]])  # both continuations, after the shared token
        for node in range(len(tree)):  # every path is a continuation of one of the references
            path = [tree.tokens[i] for i in tree.path(node)]
            assert path in (a[shared - 1 : shared - 1 + len(path)], b[shared - 1 : shared - 1 + len(path)])
        chain = SuffixDrafter(prompt, references=[a, b], min_token_prob=0.0)
        assert isinstance(chain.propose(prompt + a[: shared - 1], 16), Draft)
        chain.close()


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1)
    return out[0, len(prompt) :].tolist()


@needs_arctic
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_generate_with_the_suffix_drafter_equals_greedy(tiny_llama, tree):
    from refdecode.tree_attention import supports_tree

    prompt = [5, 9, 11, 5, 9, 11, 20, 30, 40, 50, 5, 9, 11, 20, 30]
    greedy = hf_greedy(tiny_llama, prompt, 24)
    # two references that agree on the first greedy tokens and then part: a branch in tree mode
    references = [prompt[-4:] + greedy[:12], prompt[-4:] + greedy[:3] + [7, 7, 8, 8, 9]]
    flat = DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0}))  # wide forwards as cheap as narrow: always draft
    with SuffixDrafter(prompt, references=references, tree=tree) as drafter:
        out = refdecode.generate(tiny_llama, None, prompt, max_new_tokens=24, drafter=drafter, policy=flat)
    assert out.token_ids == greedy
    assert out.stats.drafted_tokens > 0 and out.stats.accepted_sources.get("suffix", 0) > 0
    if tree and supports_tree(tiny_llama):  # else the loop verifies the tree's favourite chain
        assert out.stats.tree_steps > 0


@needs_arctic
def test_trusted_probabilities_are_per_node_given_the_parent(tok):
    prompt = ids(tok, "When does the server restart, and what does it do then?")
    a, b = ids(tok, DOC_A), ids(tok, DOC_B)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    with SuffixDrafter(prompt, references=[a, b], tree=True, trust_probs=True, min_token_prob=0.0) as drafter:
        tree = drafter.propose(prompt + a[: shared - 1], 16)
        assert tree is not None and tree.probs is not None
        assert all(0.0 < p <= 1.0 for p in tree.probs)
