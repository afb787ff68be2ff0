"""Token Recycling as a drafter (`"self:recycle"`): the target's own earlier predictions draft a tree.

Knows: a table of what the target last predicted after each token, filled from every verification forward's logits
through forward hooks, and how to grow a tree from it, best path probability first. Does not know: acceptance
rules or the loop; no training, no forward of its own.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..tree import ROOT, DraftTree
from .base import DraftSession, ModelDrafterBase, confidence_evidence

__all__ = ["RecycleDrafter", "SuccessorTable"]


class SuccessorTable:
    """What the target last predicted after each token (Token Recycling's adjacency matrix): for every token id, the
    top-`k` tokens of the most recent logits row whose input was that token, with their probabilities.

    Filled from the target's own verification forwards (every row, accepted or not: a rejected draft token's row
    still says what the target expects after that token), kept across calls, so it learns a model's habits over
    many requests. Memory: vocabulary x k x 8 bytes (3 MB for a 49k vocabulary and k = 8).
    """

    def __init__(self, k: int = 8):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.ids: torch.Tensor | None = None  # [V, k] int32, -1 = never seen
        self.probs: torch.Tensor | None = None  # [V, k] float32
        self.rows = 0  # logits rows recorded so far

    def update(self, input_ids: Sequence[int] | torch.Tensor, logits: torch.Tensor) -> None:
        """Record one forward: row i of `logits` [T, V] scored the token after `input_ids[i]`. Of repeated ids the
        last row wins (as if the rows were recorded in order)."""
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else [int(t) for t in input_ids]
        if logits.dim() != 2 or logits.shape[0] != len(ids):
            raise ValueError(f"need one logits row per input id: {len(ids)} ids, logits {tuple(logits.shape)}")
        if not ids:
            return
        vocab = logits.shape[-1]
        if self.ids is None or self.ids.shape[0] != vocab:  # first use, or another vocabulary: start afresh
            self.ids = torch.full((vocab, self.k), -1, dtype=torch.int32)
            self.probs = torch.zeros((vocab, self.k), dtype=torch.float32)
        assert self.probs is not None
        last = {token: i for i, token in enumerate(ids) if 0 <= token < vocab}
        if not last:
            return
        rows = torch.tensor(list(last.values()), dtype=torch.long, device=logits.device)
        chosen = logits.index_select(0, rows).float()
        k = min(self.k, vocab)
        top = torch.topk(chosen, k, dim=-1)
        probs = torch.exp(top.values - torch.logsumexp(chosen, dim=-1, keepdim=True))
        finite = torch.isfinite(probs)
        tokens = torch.tensor(list(last.keys()), dtype=torch.long)
        self.ids[tokens, :k] = torch.where(finite, top.indices, -1).to(torch.int32).cpu()
        self.probs[tokens, :k] = torch.where(finite, probs, 0.0).cpu()
        self.rows += len(ids)

    def successors(self, token: int, n: int) -> list[tuple[int, float]]:
        """Up to n (token, probability) pairs the target last predicted after `token`, most likely first; [] when
        it has not been seen."""
        if self.ids is None or not 0 <= token < self.ids.shape[0]:
            return []
        assert self.probs is not None
        ids = self.ids[token, :n].tolist()
        probs = self.probs[token, :n].tolist()
        return [(t, p) for t, p in zip(ids, probs, strict=True) if t >= 0]


class RecycleDrafter(ModelDrafterBase):
    """Drafts from what the target itself predicted earlier (Token Recycling, Luo et al. 2024): a SuccessorTable
    filled from every verification forward's logits, and a tree grown from the pending token by following each
    node's recorded successors, best path probability first. No training, no forward of its own: a draft costs
    a top-k per verified row and a few table lookups.

    The table belongs to the target model (build_model_drafter keeps one per target) and grows across calls. Drafts are
    point masses (no q): under sampling they are verified like copied text, which is exact.

    branch: successors considered per node; max_nodes: the largest tree offered (the policy keeps the subtree that
    pays at the measured forward cost, so on a CPU usually 1-3 nodes and more on a GPU).
    """

    name = "recycle"
    # beside references (SmolLM2, CPU, scripts/results/cpu-smollm2-recycle-drafter/): merged into their
    # trees it added no tokens per step (2.41 both; its guesses are mostly what the context already shows) and ran
    # at 0.95x the references alone; run only where they propose nothing, 0.97x: within noise, for less work
    gaps_only = True

    def __init__(self, table: SuccessorTable | None = None, *, branch: int = 4, max_nodes: int = 24):
        super().__init__()
        if branch < 1 or max_nodes < 1:
            raise ValueError(f"branch and max_nodes must be >= 1, got {branch} and {max_nodes}")
        self.table = table if table is not None else SuccessorTable()
        self.branch, self.max_nodes = branch, max_nodes
        self.use_q = False
        self._hooks: list[Any] = []
        self._inputs: torch.Tensor | None = None
        self._record_seconds = 0.0  # table updates since the last proposal (draft work done inside the forward)

    def start(self, session: DraftSession) -> None:
        super().start(session)
        embed, head = session.model.get_input_embeddings(), session.model.get_output_embeddings()
        if embed is None or head is None:
            raise ValueError("self:recycle needs a model with input and output embeddings (a causal LM)")
        self._inputs, self._record_seconds = None, 0.0

        def inputs(module, args):
            self._inputs = args[0] if args and isinstance(args[0], torch.Tensor) else None

        def record(module, args, output):
            ids, logits = self._inputs, output if isinstance(output, torch.Tensor) else None
            if ids is None or logits is None or ids.dim() != 2 or logits.dim() != 3 or ids.shape[0] != 1:
                return
            t0 = time.perf_counter()
            rows = logits.shape[1]  # a prefill may keep only its last rows (logits_to_keep)
            if rows <= ids.shape[1]:
                self.table.update(ids[0, ids.shape[1] - rows :], logits[0].detach())
            self._record_seconds += time.perf_counter() - t0

        self._hooks = [embed.register_forward_pre_hook(inputs), head.register_forward_hook(record)]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._inputs = [], None
        super().close()

    @torch.no_grad()
    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        if self.session is None or max_tokens <= 0 or not context:
            return None
        t0 = time.perf_counter()
        tree = self.grow(int(context[-1]), max_tokens)
        spent = time.perf_counter() - t0 + self._record_seconds
        self._record_seconds = 0.0
        self._time(spent, len(tree) if tree is not None else 0)
        self.proposals += 1
        return tree

    def grow(self, root: int, max_depth: int) -> DraftTree | None:
        """The tree of the `max_nodes` paths of highest recorded probability after `root` (a path's probability is
        the product of its tokens'; each node's children are its `branch` recorded successors), at most
        `max_depth` deep; None when nothing after `root` was recorded."""
        heap: list[tuple[float, int, int, int, float, int]] = []  # (-path prob, order, parent, token, prob, depth)
        order = 0
        for token, prob in self.table.successors(root, self.branch):
            heapq.heappush(heap, (-prob, order, ROOT, token, prob, 1))
            order += 1
        tokens: list[int] = []
        parents: list[int] = []
        evidence: list[int] = []
        while heap and len(tokens) < self.max_nodes:
            path, _, parent, token, prob, depth = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            evidence.append(confidence_evidence(prob))
            node = len(tokens) - 1
            if depth < max_depth:
                for child, child_prob in self.table.successors(token, self.branch):
                    heapq.heappush(heap, (path * child_prob, order, node, child, child_prob, depth + 1))
                    order += 1
        if not tokens:
            return None
        return DraftTree(tokens, parents, [self.name] * len(tokens), evidence)
