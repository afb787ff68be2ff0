"""Acceptance on a token tree is lossless: greedy follows the argmax down the tree, sampling keeps the distribution.

Greedy is checked against a brute-force oracle that walks every root-to-leaf path (hypothesis), with the float32 tie
guard, and a chain tree must give exactly the chain rules' verdicts. Sampling is checked as tests/test_sampling.py
checks chains: a small vocabulary, fixed target distributions per prefix, trees whose children hold 20-60% of their
row's probability each; the first three emitted tokens over many seeds are compared with the exact product
distribution by a Pearson chi-square test at ALPHA, and the same statistic rejects deliberately wrong rules. Every
draw is seeded, so every p-value below is the same on every run.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from stats_helpers import ExactTables, chi_square_gof, joint_probabilities, total_variation

from refdecode.tree import ROOT, DraftTree
from refdecode.verification import (
    TreeVerdict,
    tree_accept_probs,
    verify_greedy,
    verify_point_mass,
    verify_sampling,
    verify_tree_greedy,
    verify_tree_point_mass,
    verify_tree_sampling,
)

ALPHA = 1e-3  # significance of each goodness-of-fit test: it fails a correct rule with probability 0.001
V = 6  # vocabulary of the distribution tests: 6^3 = 216 joint outcomes of three tokens
POSITIONS = 3  # emitted tokens compared with the exact joint


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# ---------------------------------------------------------------------------------------------------------------
# Greedy: a brute-force oracle on random trees, the tie guard, chains
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def trees(draw, *, vocab: int, max_nodes: int = 12) -> DraftTree:
    """A random tree over `vocab` tokens: any parent before each node, siblings distinct."""
    tokens: list[int] = []
    parents: list[int] = []
    for _ in range(draw(st.integers(0, max_nodes))):
        parent = draw(st.integers(ROOT, len(tokens) - 1))
        taken = {t for t, p in zip(tokens, parents, strict=True) if p == parent}
        free = [t for t in range(vocab) if t not in taken]
        if free:
            tokens.append(draw(st.sampled_from(free)))
            parents.append(parent)
    return DraftTree(tokens, parents)


def near_tie_scores(seed: int, rows: int, vocab: int) -> torch.Tensor:
    """[rows, V] integer scores 0-3 plus noise of 1e-3: argmaxes are unique, top-2 gaps are ~1e-3 or >= ~1, far
    from the tie margins the tests use (0, 0.01, 1.5), so float rounding cannot decide a case."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (rows, vocab), generator=gen).float() + 1e-3 * torch.randn(rows, vocab, generator=gen)


def leaf_paths(tree: DraftTree) -> list[list[int]]:
    """Every root-to-leaf path, and the empty path (the root alone)."""
    has_child = set(tree.parents)
    return [[]] + [tree.path(i) for i in range(len(tree)) if i not in has_child]


def brute_force_greedy(scores: torch.Tensor, tree: DraftTree, tie_margin: float) -> TreeVerdict:
    """Walk each root-to-leaf path as a chain; keep the longest accepted prefix and the token the model adds."""
    best = TreeVerdict([], None)
    longest = -1
    for path in leaf_paths(tree):
        rows = [0] + [node + 1 for node in path]
        i = 0
        while True:
            values = sorted(scores[rows[i]].tolist(), reverse=True)
            top = int(scores[rows[i]].argmax())
            if len(tree) > 0 and values[0] - values[1] < tie_margin:
                verdict = TreeVerdict(path[:i], None)
                break
            if i < len(path) and tree.tokens[path[i]] == top:
                i += 1
                continue
            verdict = TreeVerdict(path[:i], top)
            break
        if i > longest:
            longest, best = i, verdict
    return best


@pytest.mark.fuzz
@given(
    tree=trees(vocab=4),
    seed=st.integers(0, 2**31 - 1),
    tie_margin=st.sampled_from([0.0, 0.01, 1.5]),
)
def test_greedy_matches_brute_force(tree, seed, tie_margin):
    scores = near_tie_scores(seed, len(tree) + 1, 4)
    verdict = verify_tree_greedy(scores, tree, tie_margin=tie_margin)
    assert verdict == brute_force_greedy(scores, tree, tie_margin)
    # the path is a path: each node is the next one's parent, and it is the argmax of its parent's row
    for parent, node in zip([ROOT] + verdict.path, verdict.path, strict=False):
        assert tree.parents[node] == parent
    if verdict.next_token is not None:  # the model's own token is never one of the last node's children
        last = verdict.path[-1] if verdict.path else ROOT
        assert verdict.next_token not in tree.child_map().get(last, {})


@pytest.mark.fuzz
@given(
    tree=trees(vocab=4),
    seed=st.integers(0, 2**31 - 1),
    tie_margin=st.sampled_from([0.0, 0.01]),
)
def test_point_mass_is_greedy_on_noise_by_depth(tree, seed, tie_margin):
    """Every node of depth d is scored with the same noise row d: the oracle on log p + g_depth."""
    gen = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(2 * torch.randn(len(tree) + 1, 4, generator=gen), dim=-1)
    depth = max(tree.depths(), default=0)
    noise = gumbel(gen, depth + 1, 4)
    verdict = verify_tree_point_mass(log_probs, tree, noise, tie_margin=tie_margin)
    perturbed = log_probs + noise[[0] + tree.depths()]
    assert verdict == brute_force_greedy(perturbed, tree, tie_margin)


@pytest.mark.fuzz
@given(
    tokens=st.lists(st.integers(0, 3), max_size=6),
    seed=st.integers(0, 2**31 - 1),
    tie_margin=st.sampled_from([0.0, 0.01, 1.5]),
    with_q=st.booleans(),
)
def test_a_chain_tree_gets_the_chain_verdicts(tokens, seed, tie_margin, with_q):
    """DraftTree.chain(tokens) through the tree rules == the tokens through the chain rules, draw for draw."""
    k = len(tokens)
    scores = near_tie_scores(seed, k + 1, 4)
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(k, 4, generator=gen), dim=-1) if with_q else None  # [k, V]
    tree = DraftTree.chain(tokens, q=q)

    def same(tree_verdict, chain_verdict):
        assert tree_verdict.path == list(range(chain_verdict.accepted))
        assert tree_verdict.next_token == chain_verdict.next_token

    same(verify_tree_greedy(scores, tree, tie_margin=tie_margin), verify_greedy(scores, tokens, tie_margin=tie_margin))
    log_probs = torch.log_softmax(scores, dim=-1)
    noise = gumbel(gen, k + 1, 4)
    same(
        verify_tree_point_mass(log_probs, tree, noise, tie_margin=tie_margin),
        verify_point_mass(log_probs, tokens, noise, tie_margin=tie_margin),
    )
    probs = torch.softmax(scores, dim=-1)
    gen_tree, gen_chain = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    same(verify_tree_sampling(probs, tree, gen_tree), verify_sampling(probs, tokens, gen_chain, draft_probs=q))
    assert torch.equal(torch.rand(2, generator=gen_tree), torch.rand(2, generator=gen_chain))  # same draws used


def test_tie_guard_stops_where_the_walk_relies_on_a_tie():
    tree = DraftTree([1, 2, 3, 0], [ROOT, ROOT, 0, 0])  # root -> {1, 2}; node 0 (token 1) -> {3, 0}
    scores = torch.zeros(5, 4)
    scores[0, 1] = 1.0  # root row: token 1, gap 1 -> node 0
    scores[1, 3], scores[1, 2] = 1.0, 0.95  # node 0's row: token 3 by a gap of 0.05
    scores[2, 0], scores[2, 1] = 1.0, 1.0  # node 1's row (never visited): an exact tie
    scores[3, 2] = 1.0  # node 2's row: token 2, gap 1
    assert verify_tree_greedy(scores, tree) == TreeVerdict([0, 2], 2)
    assert verify_tree_greedy(scores, tree, tie_margin=0.5) == TreeVerdict([0], None)  # node 0's row decides
    assert verify_tree_greedy(scores, tree, tie_margin=2.0) == TreeVerdict([], None)  # so does the root's
    scores[3, 0] = 0.999  # now the last row (after the leaf) is too close to call
    assert verify_tree_greedy(scores, tree, tie_margin=0.01) == TreeVerdict([0, 2], None)
    # an empty tree is a one-token forward: no guard, whatever the gap
    assert verify_tree_greedy(scores[:1], DraftTree(), tie_margin=2.0) == TreeVerdict([], 1)


def test_bad_shapes_are_refused():
    tree = DraftTree([1, 2], [ROOT, 0])
    with pytest.raises(ValueError, match="n \\+ 1"):
        verify_tree_greedy(torch.zeros(2, 4), tree)
    with pytest.raises(ValueError, match="noise"):
        verify_tree_point_mass(torch.zeros(3, 4), tree, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="n \\+ 1"):
        verify_tree_sampling(torch.full((4, 4), 0.25), tree, torch.Generator())
    with pytest.raises(ValueError, match="n \\+ 1"):
        tree_accept_probs(torch.full((2, 4), 0.25), tree)


# ---------------------------------------------------------------------------------------------------------------
# A target with fixed distributions per prefix, and trees whose children hold 20-60% of their row each
# ---------------------------------------------------------------------------------------------------------------


def gumbel(gen: torch.Generator, *shape: int) -> torch.Tensor:
    u = torch.rand(*shape, generator=gen)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


class Target:
    """A language model over V tokens as tables: p1 [V], p2 [V, V], p3 [V, V, V] (as stats_helpers.ExactTables);
    any longer prefix gets one fixed row (the tests look at the first three positions only)."""

    def __init__(self, p1, p2, p3, p4):
        self.p1, self.p2, self.p3, self.p4 = p1, p2, p3, p4

    def row(self, prefix) -> torch.Tensor:  # [V]
        if len(prefix) >= 3:
            return self.p4
        return [self.p1, self.p2, self.p3][len(prefix)][tuple(prefix)]

    def tree_rows(self, tree: DraftTree) -> torch.Tensor:
        """[n + 1, V]: row 0 after the root, row i + 1 after node i."""
        return torch.stack([self.row([])] + [self.row(prefix_of(tree, i)) for i in range(len(tree))])

    def joint(self) -> dict:
        return joint_probabilities(ExactTables(self.p1, self.p2, self.p3))


def prefix_of(tree: DraftTree, node: int) -> list[int]:
    return [tree.tokens[i] for i in tree.path(node)] if node != ROOT else []


def random_rows(gen, *shape):
    return torch.softmax(1.5 * torch.randn(*shape, V, generator=gen, dtype=torch.float64), dim=-1)


# node: (parent, token, the target probability of the token in its parent's row); parents come first
FIXED_TREE = [
    (ROOT, 2, 0.35),
    (ROOT, 4, 0.25),
    (ROOT, 0, 0.20),
    (0, 1, 0.45),
    (0, 5, 0.30),
    (1, 3, 0.30),
    (1, 2, 0.25),
    (1, 0, 0.20),
    (2, 4, 0.40),
    (2, 1, 0.30),
    (3, 0, 0.40),
    (3, 3, 0.35),
    (5, 5, 0.50),
    (5, 1, 0.20),
]


def fixed_case(seed: int = 0) -> tuple[Target, DraftTree]:
    """FIXED_TREE of copied tokens (depth 3, 2-3 children per inner node) and a random target whose rows give each
    child its listed probability (the rest of the row keeps its random shape)."""
    gen = torch.Generator().manual_seed(seed)
    target = Target(random_rows(gen), random_rows(gen, V), random_rows(gen, V, V), random_rows(gen))
    tree = DraftTree([t for _, t, _ in FIXED_TREE], [p for p, _, _ in FIXED_TREE])
    for parent, kids in tree.child_map().items():
        row = target.row(prefix_of(tree, parent))  # a view into the table: edited in place
        masses = {token: FIXED_TREE[child][2] for token, child in kids.items()}
        others = [t for t in range(V) if t not in masses]
        rest = row[others] * (1.0 - sum(masses.values())) / row[others].sum()
        row[others] = rest
        row[list(masses)] = torch.tensor(list(masses.values()), dtype=row.dtype)
    return target, tree


def complete(target: Target, emitted: list[int], draw) -> tuple[int, ...]:
    """The first POSITIONS tokens: the verdict's, then the next steps' own draws (`draw(row, position)`)."""
    out = list(emitted[:POSITIONS])
    while len(out) < POSITIONS:
        out.append(draw(target.row(out), len(out)))
    return tuple(out)


def emitted(tree: DraftTree, verdict: TreeVerdict) -> list[int]:
    return [tree.tokens[i] for i in verdict.path] + [verdict.next_token]


def assert_fits(samples, target: Target, label: str):
    probability = target.joint()
    result = chi_square_gof(samples, probability)
    print(f"\n{label}: {len(samples)} samples, {result}, TV {total_variation(samples, probability):.3f}")
    assert result.dof >= 20  # the test looks at the joint, not one marginal
    assert result.pvalue > ALPHA, f"{label}: the first {POSITIONS} tokens do not follow the target: {result}"


def assert_misfits(samples, target: Target, label: str):
    result = chi_square_gof(samples, target.joint())
    print(f"\n{label} (wrong rule): {len(samples)} samples, {result}")
    assert result.pvalue < ALPHA, f"the test cannot tell {label} from the right rule: {result}"


def test_the_fixed_tree_is_uncertain():
    """Every child holds 20-60% of its parent's row: accepting and rejecting are both common at every node."""
    target, tree = fixed_case()
    accept = tree_accept_probs(target.tree_rows(tree), tree)
    assert all(0.2 <= a <= 0.6 for a in accept), accept
    assert accept == pytest.approx([c for _, _, c in FIXED_TREE])
    assert max(tree.depths()) == 3 and {len(k) for k in tree.child_map().values()} == {2, 3}


# ---------------------------------------------------------------------------------------------------------------
# Point mass through position noise: a function of the seed, exactly distributed
# ---------------------------------------------------------------------------------------------------------------

RUNS_NOISE = 4000


def noise_case():
    target, tree = fixed_case()
    log_probs = target.tree_rows(tree).float().log()  # [n + 1, V]
    gen = torch.Generator().manual_seed(11)
    noise = gumbel(gen, RUNS_NOISE, len(tree) + 1, V)  # [runs, n + 1, V]; rows 0 .. 3 are the depth rows
    return target, tree, log_probs, noise


def plain_gumbel_samples(target: Target, noise: torch.Tensor) -> list[tuple[int, ...]]:
    """Plain sampling of positions 1-3, vectorised over runs: y_j = argmax(log p(y_<j) + g_j)."""
    y1 = (target.p1.float().log() + noise[:, 0]).argmax(-1)  # [runs]
    y2 = (target.p2[y1].float().log() + noise[:, 1]).argmax(-1)
    y3 = (target.p3[y1, y2].float().log() + noise[:, 2]).argmax(-1)
    return list(zip(y1.tolist(), y2.tolist(), y3.tolist(), strict=True))


def noise_samples(target, tree, noise, verify) -> list[tuple[int, ...]]:
    def draw(row, position):  # the next step draws the same position's row: PositionNoise hands it out again
        return int((row.float().log() + g[position]).argmax())

    out = []
    for g in noise:
        out.append(complete(target, emitted(tree, verify(g)), draw))
    return out


def test_point_mass_is_plain_sampling_with_the_same_noise():
    """verify_tree_point_mass emits the tokens plain Gumbel sampling picks with the same rows, run for run (the
    output depends on the seed alone), and they fit the exact joint. Noise drawn per node instead (rows by flat
    index, as rows_for(position, n + 1) would give) is still exact in distribution, but no longer the seed's."""
    target, tree, log_probs, noise = noise_case()
    depth = max(tree.depths())
    plain = plain_gumbel_samples(target, noise)
    ours = noise_samples(target, tree, noise, lambda g: verify_tree_point_mass(log_probs, tree, g[: depth + 1]))
    assert ours == plain
    assert_fits(ours, target, "verify_tree_point_mass")
    # any other tree over the same noise emits the same tokens: a chain, the root's children alone, no draft
    for keep in ([0, 3, 10], [0, 1, 2], []):
        sub = tree.subtree(keep)
        sub_log_probs, sub_depth = target.tree_rows(sub).float().log(), max(sub.depths(), default=0)
        verify = lambda g: verify_tree_point_mass(sub_log_probs, sub, g[: sub_depth + 1])  # noqa: E731, B023
        assert noise_samples(target, sub, noise[:500], verify) == plain[:500]
    per_node = noise_samples(target, tree, noise, lambda g: verify_tree_greedy(log_probs + g, tree))
    differ = sum(a != b for a, b in zip(per_node, plain, strict=True))
    assert differ > RUNS_NOISE // 20, differ


def per_child_noise(log_probs: torch.Tensor, tree: DraftTree, g: torch.Tensor) -> TreeVerdict:
    """A wrong rule: each child is checked against its own Gumbel draw (as if each branch were an independent chain),
    and after the last rejection the last draw is the model's token. Children are then accepted too often."""
    children = tree.child_map()
    path, node = [], ROOT
    while True:
        row = log_probs[0 if node == ROOT else node + 1]
        y = None
        for token, child in children.get(node, {}).items():
            y = int((row + g[child + 1]).argmax())  # a fresh row per child
            if y == token:
                path.append(child)
                node = child
                break
        else:
            return TreeVerdict(path, int((row + g[0]).argmax()) if y is None else y)


def test_noise_per_child_fails_the_same_test():
    target, tree, log_probs, noise = noise_case()
    runs = 2000
    samples = noise_samples(target, tree, noise[:runs], lambda g: per_child_noise(log_probs, tree, g))
    assert_misfits(samples, target, "noise per child")


def test_acceptance_of_each_node_is_its_probability():
    """Empirical P(node accepted | parent reached) == tree_accept_probs == p_parent(token); a node is left downwards
    with the sum of its children's probabilities (the tree's gain over a chain)."""
    target, tree, log_probs, noise = noise_case()
    depth = max(tree.depths())
    reached = {ROOT: RUNS_NOISE} | {i: 0 for i in range(len(tree))}
    for g in noise:
        for node in verify_tree_point_mass(log_probs, tree, g[: depth + 1]).path:
            reached[node] += 1
    expected = tree_accept_probs(target.tree_rows(tree), tree)
    for node in range(len(tree)):
        parent_runs = reached[tree.parents[node]]
        rate, p = reached[node] / parent_runs, expected[node]
        assert abs(rate - p) < 4.5 * (p * (1 - p) / parent_runs) ** 0.5, (node, rate, p)
    left_root = sum(reached[c] for c in tree.children(ROOT)) / RUNS_NOISE
    assert left_root == pytest.approx(0.35 + 0.25 + 0.20, abs=0.03)


# ---------------------------------------------------------------------------------------------------------------
# verify_tree_sampling: point masses and children drawn from q
# ---------------------------------------------------------------------------------------------------------------

RUNS_SAMPLING = 4000


def generator_samples(target, runs, seed, make_tree, verify) -> list[tuple[int, ...]]:
    """`runs` verdicts, each completed by the next steps' draws from the same generator, as the decode loop does.
    make_tree() -> (tree, its target rows [n + 1, V])."""
    gen = torch.Generator().manual_seed(seed)

    def draw(row, position):
        return int(torch.multinomial(row.float(), 1, generator=gen))

    out = []
    for _ in range(runs):
        tree, probs = make_tree()
        out.append(complete(target, emitted(tree, verify(probs, tree, gen)), draw))
    return out


def resample_from_p(probs: torch.Tensor, tree: DraftTree, gen: torch.Generator) -> TreeVerdict:
    """A wrong rule: on rejection keep p itself, not norm(max(0, p - q)) (REST's rule, tried child after child)."""
    children = tree.child_map()
    path, node = [], ROOT
    while True:
        p = probs[0 if node == ROOT else node + 1]
        for child in children.get(node, {}).values():
            x = tree.tokens[child]
            q_x = 1.0 if tree.q is None else float(tree.q[child, x])
            if float(torch.rand((), generator=gen)) < min(1.0, float(p[x]) / q_x):
                path.append(child)
                node = child
                break
        else:
            return TreeVerdict(path, int(torch.multinomial(p, 1, generator=gen)))


@pytest.mark.parametrize("rule", ["right", "residual_p"])
def test_point_mass_tree_sampling(rule):
    target, tree = fixed_case()
    probs = target.tree_rows(tree).float()
    if rule == "right":
        samples = generator_samples(target, RUNS_SAMPLING, 5, lambda: (tree, probs), verify_tree_sampling)
        assert_fits(samples, target, "verify_tree_sampling, copied children")
    else:
        samples = generator_samples(target, 2000, 5, lambda: (tree, probs), resample_from_p)
        assert_misfits(samples, target, "residual p")


P_MASSES = [0.4, 0.3, 0.2, 0.05, 0.03, 0.02]
# q on the same tokens, nearly all of it on p's top three (so drafted children hold 20-40% of p): p / q from 0.6 to 5,
# and p > q on four tokens, so a rejection leaves the next sibling a residual of several tokens, not a point mass
Q_MASSES = [0.17, 0.47, 0.33, 0.01, 0.01, 0.01]


def q_target(seed: int = 3) -> tuple[Target, Target]:
    """Target rows with masses P_MASSES in a random order per prefix, and a draft model q per prefix putting
    Q_MASSES on the same tokens."""
    gen = torch.Generator().manual_seed(seed)
    p_tables, q_tables = [], []
    for shape in [(), (V,), (V, V), ()]:
        count = V ** len(shape)
        order = torch.stack([torch.randperm(V, generator=gen) for _ in range(count)])  # [count, V]
        p = torch.zeros(count, V, dtype=torch.float64).scatter_(1, order, torch.tensor([P_MASSES] * count).double())
        q = torch.zeros(count, V, dtype=torch.float64).scatter_(1, order, torch.tensor([Q_MASSES] * count).double())
        p_tables.append(p.view(*shape, V))
        q_tables.append(q.view(*shape, V))
    return Target(*p_tables), Target(*q_tables)


def draft_q_tree(draft_model: Target, rng: random.Random, *, fan=(3, 2, 2)) -> DraftTree:
    """A model drafter's tree: under each node of depth d, fan[d] children drawn from q(prefix) without replacement.
    Each child's q row is the distribution it was drawn from: q with the earlier siblings removed, renormalised."""
    tokens, parents, rows = [], [], []
    frontier: list[tuple[int, list[int]]] = [(ROOT, [])]
    for width in fan:
        next_frontier = []
        for node, prefix in frontier:
            q = draft_model.row(prefix).tolist()  # [V]
            for _ in range(width):
                given_siblings = [v / sum(q) for v in q]
                x = rng.choices(range(V), weights=given_siblings)[0]
                tokens.append(x)
                parents.append(node)
                rows.append(given_siblings)
                next_frontier.append((len(tokens) - 1, prefix + [x]))
                q[x] = 0.0
        frontier = next_frontier
    return DraftTree(tokens, parents, q=torch.tensor(rows))


@pytest.mark.parametrize("rule", ["right", "residual_p"])
def test_q_tree_sampling(rule):
    """Children drawn from a draft model q (3, 2, 2 per level, without replacement), verified by SpecInfer's
    multi-step rule: exact. Keeping p after a rejection instead of norm(max(0, p - q)) is not."""
    target, draft_model = q_target()
    rng = random.Random(21)
    trees = [draft_q_tree(draft_model, rng) for _ in range(RUNS_SAMPLING if rule == "right" else 2000)]
    cases = iter([(tree, target.tree_rows(tree).float()) for tree in trees])
    verify = verify_tree_sampling if rule == "right" else resample_from_p
    samples = generator_samples(target, len(trees), 8, lambda: next(cases), verify)
    if rule == "right":
        assert_fits(samples, target, "verify_tree_sampling, children drawn from q")
        # the drafted children are uncertain for the target, and each is accepted often but far from always
        held = [
            float(target.row(prefix_of(t, p))[x]) for t in trees[:200] for x, p in zip(t.tokens, t.parents, strict=True)
        ]
        assert sum(0.2 <= h <= 0.6 for h in held) > 0.8 * len(held)
        accept = [a for t in trees[:200] for a in tree_accept_probs(target.tree_rows(t).float(), t)]
        assert 0.15 < sum(accept) / len(accept) < 0.6
    else:
        assert_misfits(samples, target, rule)


def test_q_acceptance_probabilities_match_the_rule():
    """On a fixed tree with q rows, the rate at which verify_tree_sampling accepts each child given its parent was
    reached matches tree_accept_probs (which accounts for the earlier siblings' rejections)."""
    target, draft_model = q_target()
    tree = draft_q_tree(draft_model, random.Random(4), fan=(3, 2))
    probs = target.tree_rows(tree).float()
    expected = tree_accept_probs(probs, tree)
    runs = 4000
    gen = torch.Generator().manual_seed(9)
    reached = {ROOT: runs} | {i: 0 for i in range(len(tree))}
    for _ in range(runs):
        for node in verify_tree_sampling(probs, tree, gen).path:
            reached[node] += 1
    for node in range(len(tree)):
        parent_runs, p = reached[tree.parents[node]], expected[node]
        if parent_runs < 100:
            continue
        rate = reached[node] / parent_runs
        assert abs(rate - p) < 4.5 * (p * (1 - p) / parent_runs) ** 0.5 + 1e-9, (node, rate, p)
    # point masses: the same function is p_parent(token)
    copied = DraftTree(tree.tokens, tree.parents)
    rows = [0 if p == ROOT else p + 1 for p in tree.parents]
    assert tree_accept_probs(probs, copied) == pytest.approx(
        [float(probs[r, t]) for r, t in zip(rows, tree.tokens, strict=True)]
    )


def test_a_top_k_cut_is_never_crossed():
    """Target rows that are zero on some tokens (a top-k cut) while q is not: no zero-probability token is emitted."""
    target, draft_model = q_target()
    for table in (target.p1, target.p2, target.p3):
        table[table < 0.04] = 0.0  # drop the two smallest masses
        table /= table.sum(-1, keepdim=True)
    rng = random.Random(2)

    def make_tree():
        tree = draft_q_tree(draft_model, rng)
        return tree, target.tree_rows(tree).float()

    samples = generator_samples(target, 300, 1, make_tree, verify_tree_sampling)
    joint = target.joint()
    assert all(joint.get(s, 0.0) > 0 for s in samples)
    assert len(set(samples)) > 20


def test_an_exact_tie_goes_to_the_first_token_as_in_plain_greedy():
    """Two equal top scores (common in bfloat16): plain greedy's argmax takes the lower token id, and so must the
    chain and the tree verification, whatever order topk returns ties in."""
    vocab = 4096
    for tied in ((7, 3000), (100, 4000), (0, vocab - 1)):
        scores = torch.zeros(2, vocab)
        scores[:, list(tied)] = 5.0
        verdict = verify_greedy(scores, [tied[0]])
        assert (verdict.accepted, verdict.next_token) == (1, tied[0])
        tree = DraftTree([tied[1]], [ROOT], ["reference"], [1], [1])
        assert verify_tree_greedy(scores, tree).next_token == tied[0]
