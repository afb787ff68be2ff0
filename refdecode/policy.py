"""The draft policy: how many draft tokens (or which tree nodes) are worth verifying at each step.

Knows: predicted acceptance per evidence bucket (match length, or a model drafter's confidence), learned online
with forgetting, per draft source; the measured cost of a forward by width (calibrated once per model, refined every
step); the choice that maximises expected tokens per second of verification, for a chain and for a tree; and the
registry that warm-starts a call's policy from the last call on the same model. Does not know: how drafts are
found (drafters/), acceptance rules (verification.py) or the decode loop (decoding.py); it sees drafts' tokens,
sources and evidence, verified outcomes and timings.
"""

from __future__ import annotations

import bisect
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import cost_cache
from .kernels import forget_route, forward_tokens, routable, route_table, set_route, synchronize
from .tree import DraftTree, contested_nodes, sibling_ranks

if TYPE_CHECKING:
    from .drafters.base import Draft

__all__ = [
    "CALIBRATED_WIDTHS",
    "GUESS",
    "MATCH_BUCKETS",
    "AcceptanceModel",
    "DraftPolicy",
    "ForwardCostModel",
    "calibrate_costs",
    "calibration_widths",
    "policy_kind",
    "remember_policy",
    "warm_policy",
]

MATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GUESS = "guess"  # the source of the one token a step with nothing to draft may verify anyway (DraftPolicy.pad_plain)


@dataclass
class AcceptanceModel:
    """Per-token acceptance probability by match length, learned online with exponential forgetting.

    Each verified draft is a run of Bernoulli trials that ends at the first rejection: `accepted` successes and one
    failure unless the whole draft was accepted. Two assumptions keep the estimate useful from the first steps on:
    a bucket with little evidence borrows the pooled rate of all buckets (a Beta prior of weight `prior_weight`
    centred on it), and a longer match is at least as reliable as a shorter one (the rate is non-decreasing in
    match length). Old evidence fades by `decay` per update, so estimates follow the current request.
    """

    prior: float = 0.5
    prior_weight: float = 2.0
    decay: float = 0.9
    successes: list[float] = field(default_factory=lambda: [0.0] * len(MATCH_BUCKETS))
    trials: list[float] = field(default_factory=lambda: [0.0] * len(MATCH_BUCKETS))
    # (the evidence they were computed from, the rates): see rates()
    _rates_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @staticmethod
    def bucket(match_len: int) -> int:
        return max(0, bisect.bisect_right(MATCH_BUCKETS, max(1, match_len)) - 1)

    def _bucket_rate(self, b: int, pooled: float) -> float:
        return (self.successes[b] + pooled * self.prior_weight) / (self.trials[b] + self.prior_weight)

    def rate(self, match_len: int) -> float:
        return self.rates()[self.bucket(match_len)]

    def rates(self) -> list[float]:
        """The rate of every match-length bucket (non-decreasing), recomputed only when the evidence changed: a
        tree asks for hundreds of nodes' rates per step."""
        key = (*self.successes, *self.trials, self.prior, self.prior_weight)
        if self._rates_cache is None or self._rates_cache[0] != key:
            pooled = (sum(self.successes) + self.prior * self.prior_weight) / (sum(self.trials) + self.prior_weight)
            out, best = [], 0.0
            for b in range(len(MATCH_BUCKETS)):
                best = max(best, self._bucket_rate(b, pooled))
                out.append(best)
            self._rates_cache = (key, out)
        return self._rates_cache[1]

    def update(self, match_len: int, drafted: int, accepted: int, accept_probs: Sequence[float] | None = None) -> None:
        """Record one verified draft of `drafted` tokens of which the first `accepted` were kept.

        accept_probs: under sampling, the probability with which each draft token was accepted given the ones
        before it (p(x_i) for a copied token, known exactly from the verification forward for every position).
        The draft then counts by its expected outcome rather than the one the noise happened to give: E[accepted]
        = sum_i prod_{j <= i} p_j successes and E[accepted] + P(some rejection) trials. Same expectation as the
        observed counts, much less variance (a draft with p = 0.5 everywhere teaches 0.5, not 0 or 1).
        """
        if drafted <= 0:
            return
        if accept_probs is not None:
            successes, alive = 0.0, 1.0
            for q in accept_probs[:drafted]:
                alive *= min(1.0, max(0.0, float(q)))
                successes += alive
            failures = 1.0 - alive
        else:
            successes, failures = float(accepted), (1.0 if accepted < drafted else 0.0)
        self.update_trials([(match_len, successes, successes + failures)])

    def scaled(self, weight: float) -> AcceptanceModel:
        """A copy whose evidence counts `weight` times as much: the same rates, held less firmly."""
        return AcceptanceModel(
            prior=self.prior,
            prior_weight=self.prior_weight,
            decay=self.decay,
            successes=[x * weight for x in self.successes],
            trials=[x * weight for x in self.trials],
        )

    def state(self) -> dict:
        """What this model learned, as JSON-ready numbers (from_state reads it back)."""
        keep = ("prior", "prior_weight", "decay", "successes", "trials")
        return {name: getattr(self, name) for name in keep}

    @classmethod
    def from_state(cls, state: dict) -> AcceptanceModel:
        """The model `state` describes; ValueError when it is not one (wrong bucket count, negative or non-finite
        numbers, more successes than trials)."""
        successes, trials = [float(x) for x in state["successes"]], [float(x) for x in state["trials"]]
        numbers = [float(state["prior"]), float(state["prior_weight"]), float(state["decay"]), *successes, *trials]
        if len(successes) != len(MATCH_BUCKETS) or len(trials) != len(MATCH_BUCKETS):
            raise ValueError(f"expected {len(MATCH_BUCKETS)} buckets")
        more = any(a > b + 1e-9 for a, b in zip(successes, trials, strict=True))
        if more or not all(math.isfinite(x) and x >= 0 for x in numbers):
            raise ValueError("counts must be finite, non-negative, and successes at most trials")
        return cls(
            prior=float(state["prior"]),
            prior_weight=float(state["prior_weight"]),
            decay=float(state["decay"]),
            successes=successes,
            trials=trials,
        )

    def update_trials(self, trials: Sequence[tuple[int, float, float]]) -> None:
        """Record one step's trials at once, (match_len, successes, trials) each. Evidence fades once per step in
        the buckets this step brings new evidence to: what a bucket knows is replaced by newer evidence of the same
        kind, not by time spent on other kinds (a request's long copies are rare, but what they taught still holds
        after many steps of short matches)."""
        touched = {self.bucket(match_len) for match_len, _, _ in trials}
        for b in touched:
            self.successes[b] *= self.decay
            self.trials[b] *= self.decay
        for match_len, successes, count in trials:
            b = self.bucket(match_len)
            self.successes[b] += successes
            self.trials[b] += count


class ForwardCostModel:
    """Seconds of one forward pass by width (tokens fed at once), measured on the running model.

    Filled by `calibrate` (a few timed forwards) and refined online from every decoding step by an exponential
    moving average; widths in between are interpolated linearly, widths beyond the widest measured extrapolated.
    """

    def __init__(self, widths_seconds: dict[int, float] | None = None, *, smoothing: float = 0.2):
        self.table: dict[int, float] = dict(widths_seconds or {})
        self.smoothing = smoothing

    def __bool__(self) -> bool:
        return bool(self.table)

    def observe(self, width: int, seconds: float) -> None:
        old = self.table.get(width)
        self.table[width] = seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds

    def _monotone(self) -> tuple[list[int], dict[int, float]]:
        """The measured widths, sorted, and their costs made non-decreasing; recomputed only when the table changed
        (a tree policy prices every candidate size each step)."""
        key = tuple(self.table.items())
        cached = getattr(self, "_monotone_cache", None)  # (the table it was computed from, the curve)
        if cached is None or cached[0] != key:
            widths = sorted(self.table)
            # A wider forward never costs less than a narrower one: a width measured slower than some wider width
            # was timed during a burst of load, and the wider width's time is the better estimate for it.
            table = dict(zip(widths, _suffix_minimum([self.table[w] for w in widths]), strict=True))
            cached = self._monotone_cache = (key, (widths, table))
        return cached[1]

    def cost(self, width: int) -> float:
        if not self.table:
            return 1.0 + 0.05 * (width - 1)  # unmeasured: a mild prior, relative units
        widths, table = self._monotone()
        if width in table:
            return table[width]
        i = bisect.bisect_left(widths, width)
        if i == 0:
            return table[widths[0]]
        if i == len(widths):
            if len(widths) == 1:
                return table[widths[-1]]
            w0, w1 = widths[-2], widths[-1]
            slope = max(0.0, (table[w1] - table[w0]) / (w1 - w0))
            return table[w1] + slope * (width - w1)
        w0, w1 = widths[i - 1], widths[i]
        t = (width - w0) / (w1 - w0)
        return table[w0] * (1 - t) + table[w1] * t


def _contested(tree: DraftTree) -> list[bool]:
    """The contested flags the policy prices and updates `tree` by: those it carries from the tree it was chosen
    from (choose_tree), else its own shape's."""
    return tree.contested if tree.contested is not None else contested_nodes(tree)


def _suffix_minimum(values: list[float]) -> list[float]:
    out = list(values)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


@dataclass
class DraftPolicy:
    """Chooses the draft length k that maximises expected tokens per second of verification.

    With per-token acceptance a (from the AcceptanceModel of the draft's source, by match length: copies from the
    request's own text and from a corpus-wide index are right at different rates), a chain of k draft tokens yields
    E[k] = 1 + a + a^2 + ... + a^k tokens (accepted prefix plus the model's own token) for the cost of one forward of
    width k + 1. k = 0 is plain decoding. Nothing here is tuned to a workload: both curves are measured online.
    """

    max_draft: int = 128
    min_draft: int = 1
    explore_every: int = 16
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    costs: ForwardCostModel = field(default_factory=ForwardCostModel)
    _plain_steps: int = 0
    _by_source: dict = field(default_factory=dict)  # Draft.source -> AcceptanceModel; "" and "reference" share one
    _pad_asks: int = 0  # steps that asked pad_plain
    _pad_recompute: float = 0.0  # moving share of padded steps whose guessed-at row was recomputed one token wide
    _depth_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)  # see draft_depth

    def inherit(self, earlier: DraftPolicy, weight: float = 0.25) -> None:
        """Start from what an earlier request's policy learned on the same model, its evidence counted `weight`
        times (this request's own evidence soon outweighs it). A fresh request otherwise starts every source at
        the prior and spends its first steps relearning how often long matches are copied."""
        self.acceptance = earlier.acceptance.scaled(weight)
        self._by_source = {name: model.scaled(weight) for name, model in earlier._by_source.items()}
        self._pad_recompute = earlier._pad_recompute  # how often this model's rounding needs the guard's recompute

    def learned_state(self) -> dict:
        """What inherit() takes from this policy, as JSON-ready numbers (remember_policy keeps it on disk)."""
        return {
            "acceptance": self.acceptance.state(),
            "by_source": {name: model.state() for name, model in self._by_source.items()},
            "pad_recompute": self._pad_recompute,
        }

    @classmethod
    def from_learned_state(cls, state: dict) -> DraftPolicy:
        """A policy holding what learned_state describes (for inherit); ValueError when it describes none."""
        policy = cls(acceptance=AcceptanceModel.from_state(state["acceptance"]))
        policy._by_source = {str(k): AcceptanceModel.from_state(v) for k, v in dict(state["by_source"]).items()}
        share = float(state["pad_recompute"])
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"pad_recompute must be in [0, 1], got {share}")
        policy._pad_recompute = share
        return policy

    def acceptance_for(self, source: str) -> AcceptanceModel:
        """The acceptance model of drafts from `source`: `acceptance` for local references, a fresh one (same
        prior and forgetting) for any other source, e.g. "corpus"."""
        if source in ("", "reference"):
            return self.acceptance
        if source not in self._by_source:
            a = self.acceptance
            prior = 0.0 if source == GUESS else a.prior  # a blind guess earns no credit before it is seen right
            self._by_source[source] = AcceptanceModel(prior=prior, prior_weight=a.prior_weight, decay=a.decay)
        return self._by_source[source]

    def __post_init__(self):
        if self.max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {self.max_draft}")
        if self.explore_every < 1:
            raise ValueError(f"explore_every must be >= 1, got {self.explore_every}")
        if self.min_draft < 1:
            raise ValueError(f"min_draft must be >= 1, got {self.min_draft}")

    def chain_rate(self, draft: Draft) -> float:
        """Predicted acceptance of each token of a chain draft, from its source's model at its match length
        (capped below 1, so that a long draft's expectation stays finite)."""
        return min(self.acceptance_for(draft.source).rate(draft.match_len), 0.999)

    def expected_accepted(self, draft: Draft) -> float:
        """Tokens of the chain `draft` expected to be accepted: a + a^2 + ... + a^len (a = chain_rate)."""
        a = self.chain_rate(draft)
        return sum(a**j for j in range(1, len(draft.tokens) + 1))

    def choose_length(self, draft: Draft | None, budget: int) -> int:
        """Draft length to verify: 0 (plain decoding) .. min(len(draft), budget, max_draft)."""
        if draft is None or not draft.tokens:
            return 0
        limit = min(len(draft.tokens), budget, self.max_draft)
        if limit < self.min_draft:
            return 0
        best_k = self._best_length(self.chain_rate(draft), limit)
        if best_k < self.min_draft:
            best_k = 0
        # Exploration: estimates only change where drafts are verified, so a policy that stopped drafting (after a
        # bad run, or a cost measured under load) would never learn that drafting pays again. Every
        # `explore_every` plain steps in a row, verify a short draft anyway (and re-time that width). Where nothing is
        # ever accepted that costs (cost(3) / cost(1) - 1) / explore_every, ~4% on a 2-core CPU; every 64 steps cost
        # less there but left a policy misled by one noisy calibration without drafts for a whole 128-token answer.
        self._plain_steps = self._plain_steps + 1 if best_k == 0 else 0
        if self._plain_steps >= self.explore_every:
            self._plain_steps = 0
            best_k = min(limit, max(self.min_draft, 2))
        return best_k

    def _best_length(self, a: float, limit: int) -> int:
        """The chain length up to `limit` with the most expected tokens per second of verification at per-token
        acceptance `a` (0: plain decoding): E[k] = 1 + a + ... + a^k over cost(k + 1)."""
        best_k, best_rate = 0, 1.0 / self.costs.cost(1)
        expected = 1.0
        for k in range(1, limit + 1):
            expected += a**k
            rate = expected / self.costs.cost(k + 1)
            if rate > best_rate:
                best_k, best_rate = k, rate
            if a**k < 1e-3:
                break
        return best_k

    def chain_length_at(self, rate: float) -> int:
        """The chain length this policy verifies where each draft token is accepted with probability `rate` (capped
        at 0.999), at its measured costs: 0 (plain decoding) .. max_draft. Shows the regime a cost curve sets."""
        return self._best_length(min(max(rate, 0.0), 0.999), self.max_draft)

    def draft_depth(self) -> int:
        """The deepest draft worth asking a drafter for: the length at which a chain of the best rate the policy
        has learned for any kind of draft would be verified, at the measured costs (max_draft while uncalibrated).
        Drafting and building a trie much deeper than any draft can be chosen is work for nothing, and where
        width costs (SmolLM2: a step of 10-20 ms) that work is a share of the step. As drafts are accepted whole the
        rate rises and the depth with it; never under 2 (exploration's length)."""
        if not self.costs:
            return self.max_draft
        models = [self.acceptance, *self._by_source.values()]
        a = min(0.999, max(max(m.rates()) for m in models))
        key = (tuple(self.costs.table.items()), self.max_draft, a)
        if self._depth_cache is None or self._depth_cache[0] != key:
            best_k = self._best_length(a, self.max_draft)
            self._depth_cache = (key, max(best_k, min(self.max_draft, max(self.min_draft, 2))))
        return self._depth_cache[1]

    def pad_plain(self) -> bool:
        """Whether a step with nothing worth drafting should verify one guessed token anyway.

        On some hardware a forward of one token costs more than a forward of two (Qwen2.5-Coder-1.5B in bfloat16 on
        a 2-core AMX Xeon: two tokens 0.87 of one; one row does not take the matrix kernels that two do). There a
        step with a guess costs less than a plain step whatever the guess is, and commits one token more when it is
        right. Decided from the two widths' measured times as measured, not as cost() prices them (cost() keeps the
        curve non-decreasing, which hides exactly this), the guesses' learned acceptance, and the measured share of
        padded steps whose first row was too close to call at two tokens and recomputed one token wide (the tie
        guard; a plain step never needs it). Every explore_every-th ask stays plain, so that the one-token time keeps
        being measured. Where two tokens cost what one does or more, it never pads (but for guesses seen right)."""
        c1, c2 = self.costs.table.get(1), self.costs.table.get(2)
        if c1 is None or c2 is None or self.max_draft < 1:  # max_draft 0: plain decoding, one token a forward
            return False
        self._pad_asks += 1
        if self._pad_asks % self.explore_every == 0:
            return False
        a = min(self.acceptance_for(GUESS).rate(0), 0.999)
        return c2 + self._pad_recompute * c1 < c1 * (1.0 + a)

    def padded(self, recomputed: bool) -> None:
        """A padded step's outcome for pad_plain: whether its guessed-at row was recomputed one token wide."""
        self._pad_recompute = 0.9 * self._pad_recompute + 0.1 * float(recomputed)

    def node_model(self, source: str, rank: int, contested: bool = False) -> AcceptanceModel:
        """The acceptance model of tree nodes of one kind, by source and sibling rank: a first child (the
        candidates' favourite) shares its source's chain model (a chain is a tree of first children); a later
        sibling, right only where the favourite is wrong, learns an "alternative" rate of its own; a first child
        with siblings (`contested`: its candidates disagree there) is priced by a "contested" rate of its own (see
        update_tree). Both start from half the prior: before any evidence, where candidates disagree the chance
        that one of them is right is shared by at least two."""
        if rank == 0 and not contested:
            return self.acceptance_for(source)
        kind = "alternative" if rank else "contested"
        key = f"{source or 'reference'}/{kind}"
        if key not in self._by_source:
            a = self.acceptance
            self._by_source[key] = AcceptanceModel(prior=a.prior / 2, prior_weight=a.prior_weight, decay=a.decay)
        return self._by_source[key]

    def choose_tree(self, tree: DraftTree, budget: int) -> DraftTree | None:
        """The subtree worth verifying, with `probs` filled (predicted acceptance of each node given its parent),
        or None for plain decoding.

        Each node's path probability P (product of its ancestors' probabilities and its own) is the expected
        number of times it is committed, so a subtree S yields 1 + sum_S P tokens for one forward of width
        |S| + 1. The best subtree of each size takes the nodes of highest P (a child never beats its parent, so
        that set is a subtree); the size that maximises (1 + sum P) / cost(|S| + 1) wins, 0 meaning plain decoding.
        A chain is the special case where every node has one child.
        """
        if not len(tree):
            return None
        probs = tree.probs if tree.probs is not None else self.node_probs(tree)
        depths = tree.depths()
        path_prob: list[float] = []
        for i, p in enumerate(tree.parents):
            q = min(max(probs[i], 0.0), 0.999)
            path_prob.append(q if p == -1 else path_prob[p] * q)
        order = sorted((i for i in range(len(tree)) if depths[i] <= budget), key=lambda i: (-path_prob[i], i))
        order = order[: max(0, self.max_draft)]
        best_n, best_rate = 0, 1.0 / self.costs.cost(1)
        expected = 1.0
        for n, i in enumerate(order, start=1):
            expected += path_prob[i]
            rate = expected / self.costs.cost(n + 1)
            if rate > best_rate:
                best_n, best_rate = n, rate
            if path_prob[i] < 1e-3:
                break
        if best_n < self.min_draft:
            best_n = 0
        self._plain_steps = self._plain_steps + 1 if best_n == 0 else 0
        if self._plain_steps >= self.explore_every and order:  # as in choose_length: keep learning
            self._plain_steps = 0
            best_n = min(len(order), max(self.min_draft, 2))
        if best_n == 0:
            return None
        chosen = tree.subtree(order[:best_n])
        kept = sorted(order[:best_n])
        chosen.probs = [probs[i] for i in kept]
        contested = _contested(tree)
        chosen.contested = [contested[i] for i in kept]  # as priced here, whatever the pruning left of its rivals
        return chosen

    def node_probs(self, tree: DraftTree) -> list[float]:
        """P(node accepted | parent accepted). Siblings exclude each other (at most one is the target's token), so
        they are chained in rank order: a child's model predicts q = P(it is right | the siblings before it are
        wrong), and its probability is q times the parent's mass left after those siblings; the siblings' sum never
        exceeds 1. A first child with siblings is priced by its source's contested model (node_model)."""
        ranks = sibling_ranks(tree)
        contested = _contested(tree)
        left: dict[int, float] = {}  # parent -> probability mass not yet taken by its earlier children
        probs = []
        rates: dict[tuple[str, int, bool], list[float]] = {}  # a kind of node -> its model's rates this step
        bucket = AcceptanceModel.bucket
        for i, parent in enumerate(tree.parents):
            kind = (tree.sources[i], min(ranks[i], 1), contested[i])
            if kind not in rates:
                rates[kind] = self.node_model(*kind).rates()
            q = rates[kind][bucket(tree.match_lens[i])]
            mass = left.get(parent, 1.0)
            probs.append(q * mass)
            left[parent] = mass * (1.0 - q)
        return probs

    def update_tree(
        self,
        tree: DraftTree,
        path: Sequence[int],
        width: int,
        seconds: float,
        accept_probs: Sequence[float] | None = None,
    ) -> None:
        """One verified tree: its width and time, and one trial per node whose parent was reached (the root or an
        accepted node) and whose earlier siblings were all rejected (see node_probs): a success if it was accepted.
        accept_probs (sampling): per node, its probability of being accepted given its parent was reached; the
        trials then count by their expectation (less variance): a node is tried with the probability that its
        earlier siblings were rejected and succeeds with its own.

        A contested first child's trial counts twice: in its source's contested model, and in its source's own
        model as every first child's does. So the rate of the source's other nodes (and of its chains) learns from
        the same evidence whether the tree knows rivals or not, and only where candidates disagree does the
        favourite get the rate that favourites among rivals have shown. (Tried on 2026-12-06: counting contested
        trials only in the contested model made the uncontested rate overconfident where width costs; LOG.md.)"""
        self.costs.observe(width, seconds)
        reached = {-1, *path}
        accepted = set(path)
        ranks = sibling_ranks(tree)
        contested = _contested(tree)
        taken: dict[int, float] = {}  # parent -> acceptance (or its probability) of the children seen so far
        trials: dict[int, list[tuple[int, float, float]]] = {}
        models: dict[int, AcceptanceModel] = {}
        for i, parent in enumerate(tree.parents):
            if parent not in reached:
                continue
            before = taken.get(parent, 0.0)
            success = float(accept_probs[i]) if accept_probs is not None else float(i in accepted)
            success = min(max(success, 0.0), max(0.0, 1.0 - before))
            taken[parent] = before + success
            tried = max(0.0, 1.0 - before)
            if tried <= 0.0:
                continue
            kinds = [self.node_model(tree.sources[i], ranks[i])]
            if contested[i]:  # a first child by definition
                kinds.append(self.node_model(tree.sources[i], 0, contested=True))
            for model in kinds:
                models[id(model)] = model
                trials.setdefault(id(model), []).append((tree.match_lens[i], success, tried))
        for key, model_trials in trials.items():
            models[key].update_trials(model_trials)

    def update(
        self,
        draft: Draft | None,
        drafted: int,
        accepted: int,
        width: int,
        seconds: float,
        accept_probs: Sequence[float] | None = None,
    ) -> None:
        """One verification step: its width and time, and (if it had a draft) the outcome; accept_probs as in
        AcceptanceModel.update (sampling only)."""
        self.costs.observe(width, seconds)
        if draft is not None and drafted > 0:
            self.acceptance_for(draft.source).update(draft.match_len, drafted, accepted, accept_probs)


# ---------------------------------------------------------------------------------------------------------------
# Calibration and the warm-start registry
# ---------------------------------------------------------------------------------------------------------------

_COST_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, dtype): table}
_LAST_POLICIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {kind: DraftPolicy}
_ROUNDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, dtype): largest |dlogit|}


def warm_policy(model, max_draft: int, *, kind: str) -> DraftPolicy:
    """The default policy of a call: fresh, but starting from what the last call on this model with the same kind
    of drafting (drafter class and mode) learned about acceptance, at a quarter of its weight (DraftPolicy.inherit).
    Requests to one model tend to resemble each other (a RAG service, an editor) and a fresh policy spends its
    first steps relearning how often long matches are copied; a first request starts from the prior. The learned
    state only sizes drafts: outputs never depend on it. Remembered by `remember_policy`."""
    policy = DraftPolicy(max_draft=max_draft)
    earlier = _LAST_POLICIES.get(model, {}).get(kind)
    if earlier is None and cost_cache.enabled():  # the first call of a process: what the last process learned
        earlier = _kept_policy(model, kind)
    if earlier is not None:
        policy.inherit(earlier)
    return policy


def remember_policy(model, policy: DraftPolicy, *, kind: str) -> None:
    """Keep a finished call's policy for the next call's warm start (see warm_policy), in this process and on disk
    (cost_cache, unless REFDECODE_COST_CACHE=off) for the first call of the next process."""
    _LAST_POLICIES.setdefault(model, {})[kind] = policy
    if cost_cache.enabled():
        cost_cache.save_policy(cost_cache.fingerprint(model, routable=routable(model)), kind, policy.learned_state())


def _kept_policy(model, kind: str) -> DraftPolicy | None:
    """The learned state an earlier process kept for this model and kind of drafting, or None (none kept, or a
    file that does not describe one)."""
    state = cost_cache.load_policy(cost_cache.fingerprint(model, routable=routable(model)), kind)
    if state is None:
        return None
    try:
        return DraftPolicy.from_learned_state(state)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# Every power of two up to 128 and the width one past it. Matrix kernels work on blocks of rows whose sizes are
# powers of two (AMX tiles of 16 rows, AVX register blocks of 4 or 8, GPU tiles of 8 to 128), so a forward's cost
# by width is close to a staircase whose steps come just after them: measured on Qwen2.5-Coder-1.5B, bfloat16 on
# an AMX Xeon, 32 tokens cost 1.20 one-token forwards and 33 cost 1.39-1.50; float32 on the same CPU 3 tokens 1.13
# and 4 tokens 2.12. Interpolating between powers of two alone priced 33 tokens near 32's cost and 3 tokens half-way
# between 2's and 4's (LOG 2026-12-07, eighth session); timing both sides of each step prices the steps' heights.
# Past 64 a token still gets cheaper where width is nearly free (the same model in bfloat16: 64 tokens 1.54, 65
# 1.86, 128 2.35, 129 2.54; in float32 3.73, 3.84, 5.86, 6.18): a copy right for many tokens pays for a longer
# draft. A call times only the widths its max_draft can use (calibration_widths).
CALIBRATED_WIDTHS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129)


def calibration_widths(max_draft: int) -> tuple[int, ...]:
    """The calibrated widths a policy drafting at most `max_draft` tokens can run (a forward verifies the drafts
    and the pending token: max_draft + 1 wide), and, where that width is not one of them, the first one past it,
    which prices its widest forwards by interpolation."""
    usable = [w for w in CALIBRATED_WIDTHS if w <= max_draft + 1]
    beyond = [w for w in CALIBRATED_WIDTHS if w > max_draft + 1][:1] if max_draft + 1 not in usable else []
    return tuple(usable + beyond)


def calibrate_costs(
    model, cache, pending: int, *, widths=CALIBRATED_WIDTHS, rounds: int | None = None, reuse_kept: bool = True
) -> dict:
    """Seconds of one forward per width, timed on the live cache (each forward rolled back); cached per model.

    The widths are timed in interleaved rounds and the minimum kept, so a burst of load from another process while
    one width is timed does not make that width look expensive for the rest of the process. On the CPU each width
    of 2 or more tokens is also timed with the transposed kernels (kernels.routed), and whichever was faster is
    what that width runs from then on (kernels.set_route): its time is the one in the table. rounds: 5, or 3 when
    both kernels are timed (the first call of a process pays the calibration: 87 forwards at the default widths,
    28 s for a 1.5B model in bfloat16 on a 2-core CPU with AMX, 18.5 s without the widths past 64, and more in
    float32). A model already calibrated at fewer widths times only the widths it lacks.

    The result is kept on disk (cost_cache; REFDECODE_COST_CACHE=off turns that off): a later process with the same
    model shapes, dtype and machine checks the kept table with four forwards (_kept_costs) instead of timing it;
    reuse_kept=False times it afresh and replaces the kept table (`refdecode calibrate --again`).
    """
    can_route = routable(model)
    key = (str(model.device), str(model.dtype), can_route)
    per_model = _COST_TABLES.setdefault(model, {})
    known = per_model.get(key)
    if known is not None and set(widths) <= set(known):
        return known
    kept = cost_cache.fingerprint(model, routable=can_route) if cost_cache.enabled() else None
    if known is None and kept is not None and reuse_kept:  # a calibration an earlier process kept on this machine
        known = _kept_costs(model, cache, pending, kept)
        if known is not None:
            per_model[key] = known
            if set(widths) <= set(known):
                return known
    if known is not None:  # an earlier call timed fewer widths (a smaller max_draft): time only the others
        widths = sorted(set(widths) - set(known))
    trials = [(w, False) for w in widths] + ([(w, True) for w in widths if w >= 2] if can_route else [])
    if rounds is None:
        rounds = 5 if len(trials) == len(widths) else 3
    best = {trial: float("inf") for trial in trials}
    narrow = None  # [V] the pending token's logits from a one-token forward
    rounding = 0.0
    for _ in range(rounds):
        for width, route in trials:
            seconds, logits = _timed_forward(model, cache, pending, width, route=route)
            best[width, route] = min(best[width, route], seconds)
            # row 0 is the same computation at every width, rounded differently: how far a wide forward moves it
            if narrow is None and width == 1:
                narrow = logits[0]
            elif narrow is not None:
                rounding = max(rounding, (logits[0] - narrow).abs().max().item())
    if narrow is not None:  # a call that timed only wider widths leaves the one-token row's rounding as it was
        _keep_rounding(model, rounding)
    decisions = {w: best[w, True] < best[w, False] for w in widths if (w, True) in best}
    if decisions:
        set_route(model, {**dict(route_table(model)), **decisions} if known is not None else decisions)
    table = {w: min(best[w, False], best.get((w, True), float("inf"))) for w in widths}
    if known is not None:
        table = dict(sorted({**known, **table}.items()))
    per_model[key] = table
    if kept is not None:
        entry = {"context": cache.get_seq_length(), "seconds": table, "routes": dict(route_table(model))}
        cost_cache.save(kept, {**entry, "rounding": measured_rounding(model)})
    return table


def _timed_forward(model, cache, pending: int, width: int, *, route: bool | None = None) -> tuple[float, torch.Tensor]:
    """Seconds of one forward of `width` copies of `pending` on the live cache, rolled back afterwards, and its
    logits [width, V] (route: as kernels.forward_tokens)."""
    synchronize(model.device)
    t0 = time.perf_counter()
    logits = forward_tokens(model, cache, [pending] * width, route=route)
    synchronize(model.device)
    seconds = time.perf_counter() - t0
    cache.crop(-width)
    return seconds, logits


# A kept calibration is trusted when a forward of CHECK_WIDTH tokens (or the widest kept one below it) costs, over
# a one-token forward, what the kept table says within this factor: the same machine under other load keeps its
# shape (and the kept seconds are rescaled by the one-token time), a different one, or other kernels, do not.
CHECK_WIDTH = 17
CHECK_TOLERANCE = 1.25


def _kept_costs(model, cache, pending: int, kept: dict) -> dict | None:
    """The calibration kept on disk for this fingerprint (cost_cache) timed after the context length nearest the
    live cache's, after a check of two forwards twice on the live cache: its routes set and its rounding known, its
    seconds rescaled by the one-token time measured now. None when nothing is kept or the check fails (then
    everything is timed afresh and kept beside it, or in its place when timed after a similar context length)."""
    found = cost_cache.nearest(cost_cache.load(kept), cache.get_seq_length())
    if found is None:
        return None
    seconds, routes = found["seconds"], found["routes"]
    if routes and kept["routable"]:
        set_route(model, routes)
    check = max(w for w in seconds if w <= CHECK_WIDTH)
    now = {1: float("inf"), check: float("inf")}
    for _ in range(2):
        for width in now:
            now[width] = min(now[width], _timed_forward(model, cache, pending, width)[0])
    shape_now, shape_kept = now[check] / now[1], seconds[check] / seconds[1]
    if not 1 / CHECK_TOLERANCE <= shape_now / shape_kept <= CHECK_TOLERANCE:
        forget_route(model)
        return None
    if found["rounding"] is not None and measured_rounding(model) is None:
        _keep_rounding(model, found["rounding"])
    scale = now[1] / seconds[1]
    return {w: s * scale for w, s in seconds.items()}


def measured_rounding(model) -> float | None:
    """The largest change of any logit between a one-token forward and a wider one of the same row on `model`, as
    measured by its calibration (calibrate_costs) in this process; None when it never ran."""
    return _ROUNDING.get(model, {}).get((str(model.device), str(model.dtype)))


def _keep_rounding(model, rounding: float) -> None:
    """What measured_rounding answers for this model, dtype and device from now on."""
    _ROUNDING.setdefault(model, {})[(str(model.device), str(model.dtype))] = rounding


def measure_rounding(model, cache, pending: int, *, widths=(1, 8, 64)) -> float:
    """Measure (once per model, dtype and device) how far a forward of several tokens moves a row's logits against
    a one-token forward, on the live cache, each forward rolled back; the largest |dlogit| over `widths`."""
    known = measured_rounding(model)
    if known is not None:
        return known
    rows = []
    for width in widths:
        rows.append(forward_tokens(model, cache, [pending] * width)[0])  # [V]: row 0, the same at every width
        cache.crop(-width)
    rounding = max((row - rows[0]).abs().max().item() for row in rows[1:])
    _keep_rounding(model, rounding)
    return rounding


def tie_margin_for(model, rounding: float) -> float:
    """The greedy tie guard's margin: a row whose top two scores are closer than this is recomputed one token wide.

    Two scores that a wide forward moves by at most `rounding` each can swap order only if they were closer than
    2 x rounding, so that is the margin, measured on the model at hand (bfloat16 moves a 1.5B model's logits by
    ~0.2, float32 by ~1e-5); float32 keeps at least 1e-3, the margin its token-for-token guarantee was proven with.
    The cache the wide forward leaves behind rounds differently too, so the guard makes bfloat16 and float16 far
    more often identical to plain greedy, not always."""
    floor = 1e-3 if model.dtype == torch.float32 else 0.0
    return max(floor, 2.0 * rounding)


def policy_kind(drafter, tree: bool) -> str:
    """What a warm-started policy is keyed by: the drafter's class (or its own `policy_kind`, e.g. a model
    drafter's name) and the mode (their acceptance differs)."""
    return getattr(drafter, "policy_kind", None) or f"{type(drafter).__name__}/{'tree' if tree else 'chain'}"
