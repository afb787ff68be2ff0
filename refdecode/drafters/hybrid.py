"""References and a model drafter in one token tree per step.

Knows: when running the model drafter beside the references pays (the chance that the references' first tokens are
all wrong, priced at the measured forward cost), and how two trees merge into one. Does not know: how either
drafter finds its tokens, acceptance rules or the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tree import ROOT, DraftTree
from .base import Draft, DraftSession

__all__ = ["HybridDrafter", "merge_trees"]


class HybridDrafter:
    """References and a model drafter in one tree per step.

    The reference drafter proposes first. The model drafter runs only where it can pay (see ModelDrafterBase.pays): its
    expected gain, the chance the references' first tokens are all wrong times the chance its own first token is
    right, in seconds of a plain step, must exceed its draft time and the wider verification. Its nodes are merged into
    the references' trie (a token both propose keeps the reference's evidence) and the policy picks the subtree.
    Under sampling the model drafter's tokens are verified as point masses with the references' (exact for any draft
    chosen without the verification's noise), so its own q is not used here.
    """

    def __init__(self, reference, model_drafter):
        self.reference, self.model_drafter = reference, model_drafter
        self.model_drafter.use_q = False
        self.model_drafter.standalone = False
        self.session: DraftSession | None = None
        self.skipped = 0  # steps where references matched well enough that the model drafter was not run

    @property
    def policy_kind(self) -> str:
        return f"HybridDrafter:{self.model_drafter.name}/{'tree' if getattr(self.reference, 'tree', True) else 'chain'}"

    def prime(self, prompt_ids: Sequence[int]) -> None:
        """The model drafter's prompt work, with the target's prefill (see ModelDrafter.prime)."""
        prime = getattr(self.model_drafter, "prime", None)
        if prime is not None:
            prime(prompt_ids)

    def start(self, session: DraftSession) -> None:
        self.session = session
        self.model_drafter.start(session)

    def close(self) -> None:
        self.model_drafter.close()
        self.session = None

    def observe(self, new_tokens: Sequence[int]) -> None:
        self.reference.observe(new_tokens)
        self.model_drafter.observe(new_tokens)

    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        found = self.reference.propose(context, max_tokens)
        tree = (
            DraftTree.chain(found.tokens, source=found.source or "reference", match_len=found.match_len)
            if (isinstance(found, Draft))
            else found
        )
        if self.session is None or not self._model_drafter_pays(tree):
            self.skipped += 1
            return tree
        guess = self.model_drafter.propose(context, max_tokens)
        if guess is None:
            return tree
        guess.q = None
        return guess if tree is None or not len(tree) else merge_trees(tree, guess)

    def _model_drafter_pays(self, tree: DraftTree | None) -> bool:
        """model_drafter.pays with the references' first-level probability, its first token priced as widening a
        plain step (1 -> 2 tokens): the references' own tree may be dropped by the policy, and the model drafter's
        siblings turn a chain (cropped) into a tree (masked and compacted). Measured: priced at the references'
        width instead, SmolLM2 on this CPU lost 10-30% on copy-heavy requests to model drafters that were rarely
        right. A gaps_only model drafter runs only where the references propose nothing."""
        assert self.session is not None
        if self.model_drafter.gaps_only and tree is not None and len(tree):
            return False
        policy = self.session.policy
        covered = 0.0
        if tree is not None and len(tree):
            probs = policy.node_probs(tree)
            covered = min(1.0, sum(p for p, parent in zip(probs, tree.parents, strict=True) if parent == ROOT))
        return self.model_drafter.pays(covered, 1)


def merge_trees(base: DraftTree, extra: DraftTree) -> DraftTree:
    """`extra`'s nodes inserted into `base` (a node equal to an existing one, same token under the same parent, is
    that node; the rest are appended), in flat order; q is dropped (the merged nodes are point masses)."""
    tokens, parents = list(base.tokens), list(base.parents)
    sources, lens, counts = list(base.sources), list(base.match_lens), list(base.counts)
    index = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens, strict=True))}
    mapped: dict[int, int] = {ROOT: ROOT}
    for i, (token, parent) in enumerate(zip(extra.tokens, extra.parents, strict=True)):
        p = mapped[parent]
        key = (p, token)
        if key in index:
            mapped[i] = index[key]
            counts[index[key]] += extra.counts[i]
            continue
        tokens.append(token)
        parents.append(p)
        sources.append(extra.sources[i])
        lens.append(extra.match_lens[i])
        counts.append(extra.counts[i])
        index[key] = mapped[i] = len(tokens) - 1
    return DraftTree(tokens, parents, sources, lens, counts)
