"""What every drafter shares: the Draft it proposes, the Drafter protocol, and the base of drafters that guess with a
model.

Knows: the Drafter extension point (propose / observe), the optional hooks a model drafter gets from the decode loop
(`start(session)` once after the prefill with a `DraftSession`: the target model, its cache, the policy, the logits
processors, the generator; `close()` when decoding ends; `session.row` tells which row of the last target forward
chose the pending token), and the shared model-drafter machinery: timing of draft work, the cost-aware rule that
decides whether running a model pays, turning a model's guesses into a token tree. Does not know: references,
acceptance rules (verification.py) or the loop (decoding.py).

A model drafter's drafts carry evidence for the policy like copied text does: node source = the drafter's name,
match length = the model's confidence in the token (its probability, mapped onto the policy's evidence buckets), so
the policy learns per confidence level how often the target agrees, and acceptance stays monotone in confidence.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..policy import MATCH_BUCKETS, DraftPolicy
from ..sampling import process_rows
from ..tree import ROOT, DraftTree

__all__ = [
    "MAX_DRAFT_TOKENS",
    "Draft",
    "DraftSession",
    "Drafter",
    "ModelDrafterBase",
    "confidence_evidence",
]

MAX_DRAFT_TOKENS = 256  # propose() drafts at most this many tokens whatever it is asked: the work stays bounded


@dataclass
class Draft:
    """Tokens proposed to follow the context.

    tokens: the chain of draft tokens.
    match_len: evidence behind it (tokens of context matched at the source; grows while a copied span is followed).
    source: where the tokens were copied from, for stats and debugging.
    probs: optional [len(tokens), V] distributions the tokens were sampled from (a model drafter); None = point
        masses (copied text). Sampling verification uses them in the min(1, p/q) rule.
    """

    tokens: list[int]
    match_len: int = 0
    source: str = ""
    probs: torch.Tensor | None = None

    def truncated(self, length: int) -> Draft:
        probs = None if self.probs is None else self.probs[:length]
        return Draft(self.tokens[:length], self.match_len, self.source, probs)


class Drafter(Protocol):
    """Extension point: anything that proposes draft tokens (like transformers' CandidateGenerator)."""

    def propose(self, context: Sequence[int], max_tokens: int) -> Draft | DraftTree | None:
        """Draft up to max_tokens tokens to follow `context` (the prompt and all committed tokens): a chain (Draft),
        or a token tree (DraftTree, at most max_tokens deep) whose nodes the policy picks from."""

    def observe(self, new_tokens: Sequence[int]) -> None:
        """Tokens just committed to the context (accepted draft tokens and the model's own token)."""


# Confidence (the draft's probability of its token) -> evidence bucket: the policy's acceptance model is keyed by
# "match length" buckets and assumes acceptance does not fall as evidence grows, which holds for confidence too.
_CONFIDENCE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def confidence_evidence(confidence: float) -> int:
    """A draft probability in [0, 1] -> the evidence value (a match length) of its policy bucket."""
    i = max(0, bisect.bisect_right(_CONFIDENCE_LEVELS, float(confidence)) - 1)
    return MATCH_BUCKETS[min(i, len(MATCH_BUCKETS) - 1)]


@dataclass
class DraftSession:
    """What the decode loop shares with a model drafter (given to `start` once, after the prefill)."""

    model: Any  # the target causal LM
    cache: Any  # its DynamicCache: holds the committed tokens except the pending one between steps
    policy: DraftPolicy
    processors: Any  # the LogitsProcessorList of the call (None or empty: greedy without processors)
    generator: torch.Generator | None  # the call's sampling generator; None = greedy
    row: int | None = None  # row of the last target forward whose scores chose the pending token; None = unknown
    forwards: int = 0  # target verification forwards so far (a drafter reading hidden states checks freshness)

    @property
    def sampling(self) -> bool:
        return self.generator is not None


class ModelDrafterBase:
    """The shared base of drafters that guess with a model: the session, timing of draft work, the cost-aware
    stopping rule, building the tree. A subclass sets `name` (its drafts' source) and implements `propose`."""

    name = "model"
    top_k = 3  # alternatives offered at each depth (greedy trees): the target may pick the draft's second guess

    gaps_only = False  # beside references, run only at steps where they propose nothing (see HybridDrafter)

    def __init__(self):
        self.session: DraftSession | None = None
        self.use_q = True  # under sampling, alone: sample the chain from q and hand q to verification
        self.seconds_per_token = 0.0  # measured draft cost of one token (exponential average)
        self.draft_generator: torch.Generator | None = None
        self.proposals = 0
        self.draft_seconds = 0.0
        self.standalone = True  # alone, it decides itself whether to run (HybridDrafter decides for it otherwise)
        self._refused = 0  # steps in a row it decided not to run

    @property
    def policy_kind(self) -> str:
        return f"{type(self).__name__}:{self.name}"

    def start(self, session: DraftSession) -> None:
        self.session = session
        if session.generator is not None:  # the draft's own samples: reproducible from the call's seed, and never
            # drawn from the call's generator (that would shift the verification's noise: a seed would sample
            # differently with a model drafter than without, although point masses make the sample independent of
            # drafts)
            seed = (session.generator.initial_seed() * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63
            self.draft_generator = torch.Generator(device="cpu").manual_seed(seed)

    def close(self) -> None:
        self.session = None

    def observe(self, new_tokens: Sequence[int]) -> None:
        """Nothing to do: the draft state is brought in step with the committed context when drafting."""

    def _time(self, seconds: float, tokens: int) -> None:
        self.draft_seconds += seconds
        per = seconds / max(1, tokens)
        self.seconds_per_token = per if self.seconds_per_token == 0 else 0.8 * self.seconds_per_token + 0.2 * per

    def _acceptance(self, confidence: float, rank: int = 0) -> float:
        assert self.session is not None
        return self.session.policy.node_model(self.name, rank).rate(confidence_evidence(confidence))

    def pays(self, covered: float, width: int) -> bool:
        """Whether running the model drafter this step pays: its first token's expected gain, the chance that the other
        drafts' first tokens are all wrong (`covered`: their summed probability) times the chance its own is right,
        in seconds of a plain step, must exceed what it adds: its draft time per token and the wider verification
        (from `width` to width + 1 tokens). A flat cost curve (a GPU) runs it almost always; a CPU where a 2-token
        forward costs much more than a 1-token one runs it only where it is often right. Every `explore_every`
        refusals in a row it runs anyway: its acceptance estimates only change where its drafts are verified."""
        assert self.session is not None
        costs = self.session.policy.costs
        gain = (1.0 - covered) * self._acceptance(0.5) * costs.cost(1)
        if gain > self.seconds_per_token + costs.cost(width + 1) - costs.cost(width):
            self._refused = 0
            return True
        self._refused += 1
        if self._refused >= self.session.policy.explore_every:
            self._refused = 0
            return True
        return False

    def worth_drafting(self, expected: float, spent: float, path_prob: float, width: int) -> bool:
        """Drafting one more token pays iff it raises expected tokens per second: with E expected tokens for T
        seconds so far (verification of `width` tokens plus drafting), a token reached with probability P for
        dT more seconds (its draft cost and the wider verification) pays iff P > E * dT / T."""
        assert self.session is not None
        costs = self.session.policy.costs
        verify = costs.cost(width)
        d_t = self.seconds_per_token + costs.cost(width + 1) - verify
        return path_prob > expected * d_t / (verify + spent)

    def _token_rows(self, logits: torch.Tensor, context: torch.Tensor, drafted: list[int]):
        """One draft position's full-vocabulary logits [V] -> (token, its draft probability, q row [V] or None,
        alternatives [(token, probability)] by rank)."""
        assert self.session is not None
        s = self.session
        sampled = s.sampling and self.use_q
        if s.processors:
            prefix = torch.cat([context, context.new_tensor(drafted)]) if drafted else context
            scores = process_rows(s.processors, prefix, [], logits[None, :].float())[0]
        else:
            scores = logits.float()
        probs = torch.softmax(scores, dim=-1)
        if sampled:
            token = int(torch.multinomial(probs.cpu(), 1, generator=self.draft_generator))
            return token, float(probs[token]), probs, []
        top = torch.topk(probs, k=min(self.top_k, probs.shape[-1]))
        tokens, values = top.indices.tolist(), top.values.tolist()
        return tokens[0], values[0], None, list(zip(tokens[1:], values[1:], strict=True))

    def _tree(
        self, chain: list[tuple[int, float, Any, list]], *, share_continuations: bool = False
    ) -> DraftTree | None:
        """Chain nodes (token, confidence, q, alternatives) -> a tree: the chain of first choices, and at each
        depth the alternatives as siblings (greedy only; under q-sampling the tree is the chain).

        share_continuations: the guesses at each depth do not depend on the token before (non-autoregressive heads),
        so an alternative is continued by the chain's deeper guesses too (Medusa's tree); otherwise alternatives
        are leaves (an autoregressive model would need a forward to continue them)."""
        if not chain:
            return None
        tokens, parents, evidence, qs = [], [], [], []

        def add(token: int, parent: int, confidence: float, q) -> int:
            tokens.append(token)
            parents.append(parent)
            evidence.append(confidence_evidence(confidence))
            qs.append(q)
            return len(tokens) - 1

        chain_nodes: list[int] = []
        for token, confidence, q, _ in chain:
            chain_nodes.append(add(token, chain_nodes[-1] if chain_nodes else ROOT, confidence, q))
        for depth, (_, _, q, alternatives) in enumerate(chain):
            if q is not None:
                continue
            for token, confidence in alternatives:
                if confidence <= 0.0:
                    continue
                node = add(token, chain_nodes[depth - 1] if depth else ROOT, confidence, None)
                for deeper, deeper_confidence, _, _ in chain[depth + 1 :] if share_continuations else ():
                    node = add(deeper, node, deeper_confidence, None)
        q_rows = torch.stack(qs) if all(q is not None for q in qs) else None
        tree = DraftTree(tokens, parents, [self.name] * len(tokens), evidence, q=q_rows)
        return tree  # parents come before children: every node is appended after its parent
