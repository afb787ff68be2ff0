"""Token trees: the DraftTree shape, merging candidates into a trie, the tree policy, and tree-mode drafting."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import refdecode
from refdecode.drafters import Draft, ReferenceDrafter
from refdecode.policy import DraftPolicy, ForwardCostModel
from refdecode.tree import ROOT, Candidate, DraftTree, build_tree, contested_nodes, sibling_ranks

CPU_LIKE = {1: 0.090, 2: 0.095, 4: 0.110, 8: 0.160, 16: 0.200, 32: 0.260, 64: 0.420}
GPU_LIKE = {1: 0.010, 2: 0.010, 4: 0.010, 8: 0.0101, 16: 0.0102, 32: 0.0104, 64: 0.0108}


# -- the shape ---------------------------------------------------------------------------------------------------


def test_tree_shape_is_checked():
    with pytest.raises(ValueError, match="parent"):
        DraftTree([1, 2], [ROOT])
    with pytest.raises(ValueError, match="parents must come first"):
        DraftTree([1, 2], [1, ROOT])
    with pytest.raises(ValueError, match="siblings must differ"):
        DraftTree([1, 1], [ROOT, ROOT])
    with pytest.raises(ValueError, match="q must be"):
        DraftTree([1], [ROOT], q=torch.zeros(2, 5))
    tree = DraftTree([5, 6, 7, 8], [ROOT, 0, 0, ROOT])
    assert tree.depths() == [1, 2, 2, 1]
    assert tree.children() == [0, 3] and tree.children(0) == [1, 2]
    assert tree.path(2) == [0, 2]
    assert tree.child_map() == {ROOT: {5: 0, 8: 3}, 0: {6: 1, 7: 2}}
    assert not tree.is_chain() and DraftTree.chain([1, 2, 3]).is_chain()
    sub = tree.subtree([0, 2])
    assert sub.tokens == [5, 7] and sub.parents == [ROOT, 0]
    with pytest.raises(ValueError, match="without its parent"):
        tree.subtree([2])


def test_build_tree_merges_counts_and_ranks_siblings():
    cands = [
        Candidate([1, 2, 3], "context", 2),
        Candidate([1, 2, 4], "store", 5),
        Candidate([9], "store", 1),
        Candidate([1, 7], "corpus", 3),
        Candidate([9, 8], "memory", 1),
        Candidate([9, 8, 5], "memory", 1),
    ]
    tree = build_tree(cands, max_depth=8)
    # first child of the root: 1 (3 candidates) before 9 (3 candidates, seen later)
    paths = {tuple(tree.tokens[j] for j in tree.path(i)): i for i in range(len(tree))}
    assert tree.counts[paths[(1,)]] == 3 and tree.counts[paths[(1, 2)]] == 2 and tree.counts[paths[(9, 8)]] == 2
    assert paths[(1,)] == 0  # the most agreed path comes first in flat order
    # the strongest evidence through a node wins its source and match length
    assert tree.sources[paths[(1, 2)]] == "store" and tree.match_lens[paths[(1, 2)]] == 5
    assert tree.sources[paths[(1, 2, 3)]] == "context"
    ranks = sibling_ranks(tree)
    assert ranks[paths[(1,)]] == 0 and ranks[paths[(9,)]] == 1
    assert ranks[paths[(1, 2)]] == 0 and ranks[paths[(1, 7)]] == 1  # evidence 5 (and count 2) before 3 (count 1)
    # the strongest evidence ranks first, even against more candidates: a 12-token match in a reference says more
    # than three 1-token matches in the output
    tree = build_tree([Candidate([5], "context", 1)] * 3 + [Candidate([6], "store", 12)], max_depth=4)
    assert tree.tokens[tree.children()[0]] == 6 and tree.counts[tree.children()[1]] == 3
    # every candidate is a root-to-node path
    for c in cands:
        assert tuple(c.tokens) in paths
    assert len(build_tree(cands, max_depth=1)) == 2  # only the first tokens
    assert len(build_tree(cands, max_depth=8, max_nodes=3)) == 3


@settings(deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=6), st.integers(1, 4)), max_size=12), st.integers(1, 6))
@pytest.mark.fuzz
def test_build_tree_is_the_trie_of_its_candidates(cands, depth):
    conts = [c for c, _ in cands]
    tree = build_tree([Candidate(c, "x", m) for c, m in cands], max_depth=depth)
    paths = [tuple(tree.tokens[j] for j in tree.path(i)) for i in range(len(tree))]
    expected = {tuple(c[:d]) for c in conts for d in range(1, min(len(c), depth) + 1)}
    assert set(paths) == expected and len(paths) == len(expected)
    for i, path in enumerate(paths):  # a node's count: the candidates through it
        assert tree.counts[i] == sum(1 for c in conts if tuple(c[: len(path)]) == path)
    for i, path in enumerate(paths):  # a node's evidence: the longest match among the candidates through it
        assert tree.match_lens[i] == max(m for c, m in cands if tuple(c[: len(path)]) == path)
    ranks = sibling_ranks(tree)
    for i, p in enumerate(tree.parents):  # siblings by evidence, then count, strongest first
        for j in range(i):
            if tree.parents[j] == p and ranks[j] < ranks[i]:
                assert (tree.match_lens[j], tree.counts[j]) >= (tree.match_lens[i], tree.counts[i])


# -- the policy --------------------------------------------------------------------------------------------------


def test_a_chain_tree_gets_the_chain_policys_length():
    for table in (CPU_LIKE, GPU_LIKE):
        for match_len, accepted in ((30, 16), (3, 5), (1, 0)):
            a = DraftPolicy(costs=ForwardCostModel(table), explore_every=10**6)
            b = DraftPolicy(costs=ForwardCostModel(table), explore_every=10**6)
            for policy in (a, b):
                for _ in range(10):
                    policy.acceptance.update(match_len, drafted=16, accepted=accepted)
            k = a.choose_length(Draft(list(range(40)), match_len=match_len), budget=100)
            chosen = b.choose_tree(DraftTree.chain(list(range(40)), match_len=match_len), budget=100)
            assert (0 if chosen is None else len(chosen)) == k
            assert chosen is None or chosen.is_chain()


def wide_tree():
    """Four alternatives for the first token, each with a 6-token continuation."""
    cands = [Candidate([10 + b] + [20 + b] * 6, "context", 2) for b in range(4)]
    return build_tree(cands, max_depth=16)


def test_a_tree_branches_where_width_is_cheap_and_stays_narrow_where_it_is_not():
    def chosen(table):
        policy = DraftPolicy(costs=ForwardCostModel(table), explore_every=10**6)
        for _ in range(10):  # favourites right 60% of the time, alternatives 30%
            policy.node_model("context", 0).update_trials([(2, 0.6, 1.0)])
            policy.node_model("context", 1).update_trials([(2, 0.3, 1.0)])
        tree = policy.choose_tree(wide_tree(), budget=100)
        return tree

    gpu = chosen(GPU_LIKE)
    cpu = chosen(CPU_LIKE)
    assert gpu is not None and len(gpu.children()) == 4 and len(gpu) >= 16  # nearly free width: all of it
    assert cpu is not None and len(cpu) < len(gpu)
    assert cpu.probs is not None and len(cpu.probs) == len(cpu)


def test_the_tree_respects_budget_and_max_draft():
    policy = DraftPolicy(costs=ForwardCostModel(GPU_LIKE), max_draft=5, explore_every=10**6)
    for _ in range(10):
        policy.node_model("context", 0).update_trials([(2, 0.9, 1.0)])
        policy.node_model("context", 1).update_trials([(2, 0.9, 1.0)])
    tree = policy.choose_tree(wide_tree(), budget=2)
    assert tree is not None and len(tree) <= 5 and max(tree.depths()) <= 2


def test_update_tree_counts_one_trial_per_reached_node():
    policy = DraftPolicy()
    tree = wide_tree()  # root children: the favourite and three alternatives
    first = tree.children()
    path = [first[1]] + tree.children(first[1])[:1]  # the first alternative and its child were accepted
    policy.update_tree(tree, path, len(tree) + 1, 0.1)
    fav, alt = policy.node_model("context", 0), policy.node_model("context", 1)
    # favourite tier: the root's favourite (failed), the accepted alternative's child (succeeded) and its child
    # (reached, not accepted)
    assert sum(fav.trials) == pytest.approx(3.0) and sum(fav.successes) == pytest.approx(1.0)
    # alternatives are tried in rank order until one is accepted: the first was tried and accepted, the two after
    # it were never tried (siblings exclude each other)
    assert sum(alt.trials) == pytest.approx(1.0) and sum(alt.successes) == pytest.approx(1.0)
    # nothing accepted: the favourite and all three alternatives failed
    for _ in range(20):
        policy.update_tree(tree, [], len(tree) + 1, 0.1)
    assert policy.node_model("context", 1).rate(2) < 0.1
    # siblings' predicted probabilities never sum above 1
    for _ in range(20):
        policy.node_model("context", 0).update_trials([(2, 0.9, 1.0)])
        policy.node_model("context", 1).update_trials([(2, 0.9, 1.0)])
    probs = policy.node_probs(tree)
    assert sum(probs[i] for i in first) <= 1.0


def test_sampling_trials_count_by_expectation():
    policy = DraftPolicy()
    tree = build_tree([Candidate([1], "context", 3), Candidate([2], "context", 3)], max_depth=4)
    # the target gives the favourite 0.5 and the alternative 0.3: the alternative is tried with probability 0.5
    # and succeeds with 0.3 (0.6 given that the favourite was rejected)
    policy.update_tree(tree, [], 3, 0.1, accept_probs=[0.5, 0.3])
    alt = policy.node_model("context", 1)
    assert sum(alt.trials) == pytest.approx(0.5) and sum(alt.successes) == pytest.approx(0.3)


def rivals(length=30):
    """Two candidates with the same evidence that disagree at once ("```" before "diff" and before "python" in
    a code-edit prompt), each with a long continuation."""
    return build_tree(
        [Candidate([1] + [10] * (length - 1), "context", 1), Candidate([2] + [20] * (length - 1), "context", 1)],
        max_depth=64,
    )


def test_contested_nodes_are_first_children_with_siblings():
    tree = build_tree(
        [Candidate([1, 2, 3], "context", 4), Candidate([1, 2, 4], "context", 2), Candidate([5], "store", 1)],
        max_depth=8,
    )
    # the root's first child (token 1) has a rival (5); under it, 2 is unrivalled; 3 and 4 disagree after it
    expected = {1: True, 5: False}
    flags = contested_nodes(tree)
    ranks = sibling_ranks(tree)
    for i, token in enumerate(tree.tokens):
        if token in expected:
            assert flags[i] == expected[token]
    assert flags[tree.tokens.index(2)] is False
    deep = [i for i, t in enumerate(tree.tokens) if t in (3, 4)]
    assert [flags[i] for i in deep] == [ranks[i] == 0 for i in deep] and sum(flags[i] for i in deep) == 1
    assert contested_nodes(DraftTree.chain([7, 8, 9])) == [False] * 3


def test_a_contested_favourite_is_priced_by_its_own_rate_and_teaches_both_models():
    policy = DraftPolicy(costs=ForwardCostModel(GPU_LIKE), explore_every=10**6)
    for _ in range(10):
        policy.node_model("context", 0).update_trials([(1, 0.95, 1.0)])  # unrivalled copies: right
        policy.node_model("context", 0, contested=True).update_trials([(1, 0.3, 1.0)])  # favourites among rivals
        policy.node_model("context", 1).update_trials([(1, 0.9, 1.0)])  # the rival, once the favourite is wrong
    tree = rivals()
    probs = policy.node_probs(tree)
    fav, rival = tree.children()
    assert probs[fav] == pytest.approx(policy.node_model("context", 0, contested=True).rate(1))
    assert probs[rival] == pytest.approx((1 - probs[fav]) * policy.node_model("context", 1).rate(1))
    chain = DraftTree.chain([1, 10, 10], source="context", match_len=1)
    assert policy.node_probs(chain)[0] == pytest.approx(policy.node_model("context", 0).rate(1))
    # where width is nearly free, both branches are verified deep: the rival is as likely as the favourite
    chosen = policy.choose_tree(tree, budget=64)
    assert chosen is not None
    heads = chosen.children()
    assert len(heads) == 2
    depths = chosen.depths()
    for head in heads:
        below = [i for i in range(len(chosen)) if chosen.path(i)[0] == head]
        assert max(depths[i] for i in below) >= 10
    # the flags are those of the tree it was chosen from, kept for the update
    assert chosen.contested is not None and sum(chosen.contested) == 1
    assert chosen.contested[heads[0]] and not chosen.contested[heads[1]]
    # a failed contested favourite is one trial of its source's model and one of its contested model
    fresh = DraftPolicy()
    fresh.update_tree(tree, [], len(tree) + 1, 0.1)
    own, contested = fresh.node_model("context", 0), fresh.node_model("context", 0, contested=True)
    assert sum(own.trials) == pytest.approx(1.0) and sum(own.successes) == 0.0
    assert sum(contested.trials) == pytest.approx(1.0) and sum(contested.successes) == 0.0
    # an accepted rival's unrivalled continuation teaches only the source's model
    fresh.update_tree(tree, [rival, tree.children(rival)[0]], len(tree) + 1, 0.1)
    assert sum(own.trials) == pytest.approx(1.0 * 0.9 + 3.0)  # faded once, then the favourite, the two below
    assert sum(contested.trials) == pytest.approx(1.0 * 0.9 + 1.0)


def test_rivals_start_from_half_the_prior():
    # before any evidence, disagreeing candidates share the chance that one of them is right
    policy = DraftPolicy()
    source = policy.node_model("context", 0).rate(1)
    assert policy.node_model("context", 0, contested=True).rate(1) == pytest.approx(source / 2)
    assert policy.node_model("context", 1).rate(1) == pytest.approx(source / 2)
    probs = policy.node_probs(rivals())
    fav, rival = rivals().children()
    assert probs[fav] == pytest.approx(source / 2) and probs[rival] == pytest.approx((1 - source / 2) * source / 2)


def test_a_pruned_rival_leaves_the_favourite_contested():
    policy = DraftPolicy(costs=ForwardCostModel(CPU_LIKE), explore_every=10**6)
    for _ in range(10):
        policy.node_model("context", 0, contested=True).update_trials([(1, 0.9, 1.0)])
        policy.node_model("context", 1).update_trials([(1, 0.01, 1.0)])
    chosen = policy.choose_tree(rivals(), budget=64)
    assert chosen is not None and len(chosen.children()) == 1  # the rival was not worth its width
    assert chosen.contested is not None and chosen.contested[0]
    before = sum(policy.node_model("context", 0, contested=True).trials)
    policy.update_tree(chosen, [], len(chosen) + 1, 0.1)
    assert sum(policy.node_model("context", 0, contested=True).trials) > before * policy.acceptance.decay


def test_contested_flags_follow_a_subtree_and_are_checked():
    tree = rivals(4)
    tree.contested = contested_nodes(tree)
    sub = tree.subtree([0, 1])
    assert sub.contested == [True, False]
    with pytest.raises(ValueError, match="contested"):
        DraftTree([1, 2], [-1, 0], contested=[True])


# -- tree-mode drafting ------------------------------------------------------------------------------------------


class _Spans:
    def __init__(self, conts):
        self.conts, self.calls = conts, 0

    def span_continuations(self, tail, max_tokens, *, max_candidates=8, min_match=2):
        self.calls += 1
        return 2, [c[:max_tokens] for c in self.conts]


def test_tree_mode_takes_every_source_at_once():
    from stats_helpers import IdTokenizer

    from refdecode.store import ReferenceStore

    store = ReferenceStore(IdTokenizer(100))
    store.add([1, 2, 3, 40, 41, 42], source="doc")
    context = [7, 1, 2, 3, 30, 31, 8, 1, 2, 3]
    spans = _Spans([[50, 51]])
    drafter = ReferenceDrafter(context, store=store, spans=spans, tree=True)
    tree = drafter.propose(context, 8)
    assert isinstance(tree, DraftTree)
    first = {tree.tokens[i]: tree.sources[i] for i in tree.children()}
    assert first == {30: "context", 40: "store", 50: "corpus"}  # the corpus is asked even though local text matched
    assert spans.calls == 1
    assert max(tree.match_lens) == 3
    chain = ReferenceDrafter(context, store=store, spans=spans, tree=False).propose(context, 8)
    assert isinstance(chain, Draft) and spans.calls == 1  # the chain asks the corpus only when nothing matched


def test_followed_spans_keep_their_growing_evidence():
    context = [5, 6, 7, 8, 9, 10, 11, 12, 1, 5, 6]
    drafter = ReferenceDrafter(context, tree=True)
    tree = drafter.propose(context, 4)
    assert tree.tokens[:3] == [7, 8, 9] and tree.match_lens[0] == 2
    drafter.observe([7, 8])
    tree = drafter.propose(context + [7, 8], 4)
    assert tree.tokens[0] == 9 and tree.match_lens[0] >= 4  # matched 2, then predicted 2 right


def test_spans_for_lists_the_tree_steps_local_candidates_and_changes_nothing():
    from stats_helpers import IdTokenizer

    from refdecode.store import ReferenceStore

    store = ReferenceStore(IdTokenizer(100))
    store.add([1, 2, 3, 40, 41, 42], source="doc")
    context = [7, 1, 2, 3, 30, 31, 8, 1, 2, 3]
    drafter = ReferenceDrafter(context, store=store, tree=True)
    spans = drafter.spans_for(context, 2)
    assert [(f.name, f.length, tokens) for f, tokens in spans] == [("context", 3, [30, 31]), ("store", 3, [40, 41])]
    assert drafter.spans_for(context, 2) == spans and drafter.followed == []
    tree = drafter.propose(context, 2)
    assert len(tree) == 4 and set(tree.tokens) == {30, 31, 40, 41}  # the same four tokens, merged


@settings(deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=40),
    st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=20), max_size=4),
    st.integers(1, 12),
)
@pytest.mark.fuzz
def test_tree_nodes_are_real_continuations(context, docs, budget):
    from stats_helpers import IdTokenizer

    from refdecode.store import ReferenceStore

    store = ReferenceStore(IdTokenizer(7))
    for d in docs:
        store.add(d)
    drafter = ReferenceDrafter(context, store=store, tree=True)
    rng = random.Random(len(context))
    for _ in range(3):
        tree = drafter.propose(context, budget)
        if tree is not None:
            assert max(tree.depths()) <= budget
            texts = [context] + [d for d in docs]
            for i in range(len(tree)):  # every path occurs after some suffix of the context, or overlaps it
                path = [tree.tokens[j] for j in tree.path(i)]
                assert any(_occurs_after_match(t, context, path) for t in texts) or _lz77(context, path)
        new = [rng.randrange(7)]
        drafter.observe(new)
        context = context + new


def _occurs_after_match(text, context, path):
    for end in range(len(text)):
        if text[end] == context[-1] and text[end + 1 : end + 1 + len(path)] == path:
            return True
    return False


def _lz77(context, path):
    """The path copies the context from a period p back, overlapping its own tokens."""
    full = context + path
    return any(
        all(full[len(context) + i] == full[len(context) + i - p] for i in range(len(path)))
        for p in range(1, len(context) + 1)
    )


# -- warm start across requests ----------------------------------------------------------------------------------


def test_a_policy_inherits_rates_at_lower_weight():
    earlier = DraftPolicy()
    for _ in range(10):
        earlier.acceptance_for("context").update(12, drafted=8, accepted=8)
        earlier.node_model("store", 1).update_trials([(3, 0.0, 1.0)])
    later = DraftPolicy()
    later.inherit(earlier, weight=0.25)
    for source, rank in (("context", 0), ("store", 1)):
        a, b = earlier.node_model(source, rank), later.node_model(source, rank)
        assert sum(b.trials) == pytest.approx(0.25 * sum(a.trials))
        assert b.rate(12) == pytest.approx(a.rate(12), abs=0.1)  # same rates, held less firmly
    assert later.node_model("context", 0) is not earlier.node_model("context", 0)  # a copy, not shared


def test_default_policies_warm_start_per_model_and_kind():
    from refdecode.policy import remember_policy, warm_policy

    class Model:  # any weak-referenceable object stands for a model
        pass

    model, other = Model(), Model()
    first = warm_policy(model, 64, kind="ReferenceDrafter/tree")
    assert sum(first.acceptance_for("context").trials) == 0  # nothing learned yet: the prior
    for _ in range(10):
        first.acceptance_for("context").update(12, drafted=8, accepted=8)
    remember_policy(model, first, kind="ReferenceDrafter/tree")
    assert warm_policy(model, 64, kind="ReferenceDrafter/tree").acceptance_for("context").rate(12) > 0.8
    assert sum(warm_policy(model, 64, kind="ReferenceDrafter/chain").acceptance_for("context").trials) == 0
    assert sum(warm_policy(other, 64, kind="ReferenceDrafter/tree").acceptance_for("context").trials) == 0


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_branching_trees_with_logits_processors_equal_transformers(tiny_model, penalty):
    """Each tree row is processed with its own path as the prefix (a repetition penalty reads it)."""
    from stats_helpers import IdTokenizer, WholeTree

    import refdecode

    rng = random.Random(7)
    vocab = tiny_model.config.vocab_size
    prompt = [rng.randrange(2, vocab) for _ in range(12)]
    kwargs = {} if penalty is None else {"repetition_penalty": penalty}
    x = torch.tensor([prompt])
    expected = tiny_model.generate(x, max_new_tokens=40, do_sample=False, **kwargs)[0, len(prompt) :].tolist()
    store = refdecode.ReferenceStore(IdTokenizer(vocab))
    store.add(prompt[-3:] + expected)  # the true continuation, drafted last in the tree's flat order
    for _ in range(4):  # documents that match the context after the first new token, then part: a step branches
        store.add(prompt[-3:] + expected[:1] + [rng.randrange(2, vocab) for _ in range(30)])
    out = refdecode.generate(
        tiny_model, IdTokenizer(vocab), prompt, store=store, max_new_tokens=40, policy=WholeTree(), **kwargs
    )
    assert out.token_ids == expected
    assert out.stats.tree_steps > 0


def test_tree_sizes_is_a_deprecated_alias_of_draft_lengths():
    """One list of draft tokens (tree nodes) verified per step: draft_lengths; tree_sizes reads it with a warning."""
    stats = refdecode.GenerationStats(draft_lengths=[3, 1])
    with pytest.warns(DeprecationWarning, match="draft_lengths"):
        assert stats.tree_sizes == [3, 1]
    assert stats.as_dict()["mean_tree_size"] == 2.0 and stats.as_dict()["max_tree_size"] == 3
    with pytest.raises(AttributeError):
        stats.tree_sizes = [1]  # type: ignore[misc]


def whole_candidates_trie(candidates, max_depth):
    """The trie built the plain way, each candidate whole in turn (no node limit): (path of tokens) -> (count,
    strongest evidence, its source)."""
    nodes: dict[tuple[int, ...], list] = {}
    for cand in candidates:
        for d in range(1, min(len(cand.tokens), max_depth) + 1):
            path = tuple(cand.tokens[:d])
            entry = nodes.setdefault(path, [0, cand.match_len, cand.source])
            entry[0] += 1
            if cand.match_len > entry[1]:
                entry[1], entry[2] = cand.match_len, cand.source
    return nodes


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 6), st.sampled_from("ab")),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 40),
)
def test_an_uncut_trie_is_every_candidate_inserted_whole(raw, max_depth):
    """Inserting candidates a band of depths at a time changes nothing where no node limit cuts: same nodes, counts
    (through sibling order), evidence and sources as inserting each candidate whole."""
    cands = [Candidate(tokens, source, match_len) for tokens, match_len, source in raw]
    tree = build_tree(cands, max_depth=max_depth)
    expected = whole_candidates_trie(cands, max_depth)
    got = {tuple(tree.tokens[i] for i in tree.path(i)): (tree.match_lens[i], tree.sources[i]) for i in range(len(tree))}
    assert got == {path: (e[1], e[2]) for path, e in expected.items()}


def test_a_cut_trie_keeps_every_candidates_first_tokens():
    """Twenty disjoint candidates of 128 tokens and room for 1,024 nodes: the limit cuts the last candidates' deep
    tokens, not whole candidates: every candidate keeps its first 16 tokens, the strongest go whole."""
    cands = [Candidate([1000 * (c + 1) + i for i in range(128)], "context", 20 - c) for c in range(20)]
    tree = build_tree(cands, max_depth=128, max_nodes=1024)
    assert len(tree) == 1024
    roots = {tree.tokens[i] for i in tree.children(ROOT)}
    assert roots == {1000 * (c + 1) for c in range(20)}
    depth_of = {}
    for i, d in enumerate(tree.depths()):
        owner = tree.tokens[i] // 1000
        depth_of[owner] = max(depth_of.get(owner, 0), d)
    assert min(depth_of.values()) == 16 and depth_of[1] == depth_of[5] == 128  # (1024 - 20 * 16) // 112 = 6 whole
