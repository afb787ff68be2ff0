"""Model prophets: drafters that guess with a model where no reference text matches.

Knows: how to run a draft model between verification steps and keep its KV cache in step with the committed
context (a separate small model with a cache of its own; the target's own first layers, which share the target's
cache; the target quantized to int8), how Medusa-style heads draft from the target's last hidden state, how the
target's own earlier predictions (its verification logits, recorded per input token) draft a tree, how a
model's drafts join the reference drafter's token tree, and when running a model is worth its cost. Does not know:
acceptance rules (verification.py), the loop (decoding.py) or how heads are trained (heads.py).

A prophet is a Drafter with three optional hooks the decode loop calls: `start(session)` once after the prefill
(the `DraftSession`: the target model, its cache, the policy, the logits processors, the generator), and `close()`
when decoding ends; `session.row` tells which row of the last target forward chose the pending token.

Drafts carry evidence for the policy like copied text does: node source = the prophet's name, match length = the
draft model's confidence in the token (its probability, mapped onto the policy's evidence buckets), so the policy
learns per confidence level how often the target agrees, and acceptance stays monotone in confidence.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .drafting import MAX_DRAFT_TOKENS, Draft
from .policy import MATCH_BUCKETS, DraftPolicy
from .sampling import process_rows
from .tree import ROOT, DraftTree

__all__ = [
    "DraftSession",
    "ModelDrafter",
    "HeadsDrafter",
    "RecycleDrafter",
    "SuccessorTable",
    "HybridDrafter",
    "build_prophet",
    "check_draft_model",
    "check_prophet_spec",
    "early_exit_model",
    "forget_learned",
    "int8_model",
    "merge_trees",
    "with_prophet",
]

# Confidence (the draft's probability of its token) -> evidence bucket: the policy's acceptance model is keyed by
# "match length" buckets and assumes acceptance does not fall as evidence grows, which holds for confidence too.
_CONFIDENCE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def confidence_evidence(confidence: float) -> int:
    """A draft probability in [0, 1] -> the evidence value (a match length) of its policy bucket."""
    i = max(0, bisect.bisect_right(_CONFIDENCE_LEVELS, float(confidence)) - 1)
    return MATCH_BUCKETS[min(i, len(MATCH_BUCKETS) - 1)]


@dataclass
class DraftSession:
    """What the decode loop shares with a prophet (given to `start` once, after the prefill)."""

    model: Any  # the target causal LM
    cache: Any  # its DynamicCache: holds the committed tokens except the pending one between steps
    policy: DraftPolicy
    processors: Any  # the LogitsProcessorList of the call (None or empty: greedy without processors)
    generator: torch.Generator | None  # the call's sampling generator; None = greedy
    row: int | None = None  # row of the last target forward whose scores chose the pending token; None = unknown
    forwards: int = 0  # target verification forwards so far (a prophet reading hidden states checks freshness)

    @property
    def sampling(self) -> bool:
        return self.generator is not None


class _Prophet:
    """Shared machinery: the session, timing of draft work, the cost-aware stopping rule, building the tree."""

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
            # differently with a prophet than without, although point masses make the sample independent of drafts)
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
        """Whether running the prophet this step pays: its first token's expected gain, the chance that the other
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


class ModelDrafter(_Prophet):
    """Drafts with a causal LM that shares the target's tokenizer: a separate small model with its own cache, the
    target's int8 copy, or the target's first layers (`shared_cache=True`: it writes into the target's cache rows of
    those layers and crops them back, so it never prefills).

    Each step it feeds the committed tokens it has not seen (its cache is cropped back to the longest prefix it
    shares with the context: rejected drafts roll back there), then drafts one token per forward while another
    token raises the expected tokens per second (see worth_drafting), with the draft's top-k alternatives at each
    depth as siblings (greedy) or, sampling alone, a chain sampled from its distributions q.

    window: an own-cache model sees the last `window` to 2 * `window` tokens of the context: it starts again from
    the last `window` tokens when its cache would grow past twice that or lags by more than that, so catching up
    never costs more than one window-wide forward (measured: prefilling a 1300-token prompt with the int8 copy cost
    more than what its drafts saved).
    """

    def __init__(self, model, *, name: str = "draft", shared_cache: bool = False, top_k: int = 3, window: int = 256):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.model, self.name, self.shared_cache, self.top_k, self.window = model, name, shared_cache, top_k, window
        self.cache: Any = None
        self.cached: list[int] = []  # the tokens in self.cache (own cache only): context[offset : offset + len]
        self.offset = 0

    def start(self, session: DraftSession) -> None:
        super().start(session)
        if not self.shared_cache:
            self._restart(0)

    def _restart(self, offset: int) -> None:
        from transformers import DynamicCache

        self.cache, self.cached, self.offset = DynamicCache(config=self.model.config), [], offset
        self.cache.activate_past_recording()  # sliding-window layers (Gemma 3) must stay croppable on rollback

    def close(self) -> None:
        super().close()
        self.cache, self.cached = None, []

    def _forward(self, cache, token_ids: list[int]) -> torch.Tensor:
        """Logits [V_target] after feeding `token_ids`; the draft's columns beyond the target's vocabulary dropped."""
        assert self.session is not None
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.model.device)
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
        vocab = self.session.model.config.vocab_size
        if logits.shape[-1] > vocab:
            logits = logits[:vocab]
        elif logits.shape[-1] < vocab:
            logits = torch.cat([logits, logits.new_full((vocab - logits.shape[-1],), float("-inf"))])
        return logits.to(self.session.model.device)

    def _catch_up(self, context: Sequence[int]) -> tuple[Any, torch.Tensor, int] | None:
        """Bring the draft's cache to the context minus the pending token and feed the pending token: -> (cache,
        logits after the pending token, rows to crop from a shared cache afterwards)."""
        assert self.session is not None
        if self.shared_cache:
            cache = self.session.cache
            if cache.get_seq_length() != len(context) - 1:  # not between steps as expected: do not guess
                return None
            return cache, self._forward(cache, [context[-1]]), 1
        start, common = self.offset, 0
        limit = min(len(self.cached), len(context) - 1 - start)
        while common < limit and self.cached[common] == context[start + common]:
            common += 1
        if len(context) - start - common > self.window or len(context) - start > 2 * self.window:
            # far behind (skipped steps, a long prompt) or a long cache: start again from the last `window` tokens,
            # so catching up never costs more than one window-wide forward (a draft needs recent context only)
            self._restart(max(0, len(context) - self.window))
            common = 0
        elif common < len(self.cached):
            self.cache.crop(common - len(self.cached))  # transformers 5 takes the count of tokens to drop
            del self.cached[common:]
        feed = list(context[self.offset + common :])
        logits = self._forward(self.cache, feed)
        self.cached.extend(feed)
        return self.cache, logits, 0

    @torch.no_grad()
    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        if self.session is None or max_tokens <= 0 or (self.standalone and not self.pays(0.0, 1)):
            return None
        max_tokens = min(max_tokens, MAX_DRAFT_TOKENS)
        t0 = time.perf_counter()
        caught = self._catch_up(context)
        if caught is None:
            return None
        cache, logits, fed = caught
        first_seconds = time.perf_counter() - t0
        context_t = torch.as_tensor(list(context), dtype=torch.long, device=self.session.model.device)
        chain: list[tuple[int, float, Any, list]] = []
        drafted: list[int] = []
        expected, path_prob, spent = 1.0, 1.0, first_seconds
        steps = 1
        while len(chain) < max_tokens:
            token, confidence, q, alternatives = self._token_rows(logits, context_t, drafted)
            p = path_prob * self._acceptance(confidence)
            if not self.worth_drafting(expected, spent, p, len(chain) + 1) and chain:
                break
            chain.append((token, confidence, q, alternatives))
            drafted.append(token)
            expected, path_prob = expected + p, p
            if len(chain) >= max_tokens:
                break
            t1 = time.perf_counter()
            logits = self._forward(cache, [token])
            spent += time.perf_counter() - t1
            steps += 1
            if self.shared_cache:
                fed += 1
            else:
                self.cached.append(token)
        if self.shared_cache and fed:  # only the first layers hold draft rows (crop(-n) would cut every layer)
            for layer in cache.layers[: self.model.config.num_hidden_layers]:
                layer.crop(-fed)
        self._time(time.perf_counter() - t0, steps)
        self.proposals += 1
        return self._tree(chain)


class HeadsDrafter(_Prophet):
    """Medusa-style heads (refdecode.heads.MedusaHeads) on the target's last hidden state: head k guesses the token
    k + 1 positions after the row that chose the pending token, from the verification forward itself, so drafting
    costs a few small matrix products and no forward. The hidden state is read by a forward hook on the target's
    final norm, registered for the call (start / close)."""

    name = "heads"

    def __init__(self, heads, *, top_k: int = 3):
        super().__init__()
        self.heads, self.top_k = heads, top_k
        self._hook = None
        self._hidden: torch.Tensor | None = None
        self._captured = -1  # session.forwards when the hidden states were captured

    def start(self, session: DraftSession) -> None:
        super().start(session)
        norm = _final_norm(session.model)
        self._hidden, self._captured = None, -1

        def capture(module, inputs, output):
            self._hidden = output if isinstance(output, torch.Tensor) else output[0]
            self._captured = session.forwards + 1  # the forward now running is the next verification

        self._hook = norm.register_forward_hook(capture)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._hidden = None, None
        super().close()

    @torch.no_grad()
    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        s = self.session
        if s is None or max_tokens <= 0 or s.row is None or self._hidden is None or self._captured != s.forwards:
            return None
        if s.row >= self._hidden.shape[1] or (self.standalone and not self.pays(0.0, 1)):
            return None
        t0 = time.perf_counter()
        hidden = self._hidden[0, s.row].to(self.heads.vocab_ids.device)
        logits = self.heads(hidden.to(_dtype(self.heads))).float()  # [K, V']
        depth = min(max_tokens, logits.shape[0])
        if s.sampling and self.use_q or s.processors:  # the processors and q need the full vocabulary
            rows = self._full_rows(logits[:depth], list(context))
        else:  # greedy: top-k over the restricted vocabulary, mapped to token ids (no [V] tensors on a 49k vocabulary)
            rows = self._restricted_rows(logits[:depth])
        chain: list[tuple[int, float, Any, list]] = []
        expected, path_prob = 1.0, 1.0
        for token, confidence, q, alternatives in rows:
            p = path_prob * self._acceptance(confidence)
            if not self.worth_drafting(expected, 0.0, p, len(chain) + 1) and chain:
                break
            chain.append((token, confidence, q, alternatives))
            expected, path_prob = expected + p, p
        self._time(time.perf_counter() - t0, len(chain))
        self.proposals += 1
        return self._tree(chain, share_continuations=True)

    def _restricted_rows(self, logits: torch.Tensor) -> list[tuple[int, float, Any, list]]:
        """[K, V'] head logits -> per head (token, probability, None, alternatives) from a softmax over V'."""
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, k=min(self.top_k, probs.shape[-1]), dim=-1)
        ids = self.heads.vocab_ids[top.indices].tolist()
        values = top.values.tolist()
        return [
            (row[0], vals[0], None, list(zip(row[1:], vals[1:], strict=True)))
            for row, vals in zip(ids, values, strict=True)
        ]

    def _full_rows(self, logits: torch.Tensor, context: list[int]) -> list[tuple[int, float, Any, list]]:
        """[K, V'] head logits -> per head, through the call's processors on the full vocabulary (sampling, or
        greedy with a penalty); each head sees the drafted tokens before it as its prefix."""
        assert self.session is not None
        vocab = self.session.model.config.vocab_size
        full = logits.new_full((logits.shape[0], vocab), float("-inf"))
        full[:, self.heads.vocab_ids] = logits
        full = full.to(self.session.model.device)
        context_t = torch.as_tensor(context, dtype=torch.long, device=self.session.model.device)
        rows: list[tuple[int, float, Any, list]] = []
        drafted: list[int] = []
        for k in range(full.shape[0]):
            row = self._token_rows(full[k], context_t, drafted)
            rows.append(row)
            drafted.append(row[0])
        return rows


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


class RecycleDrafter(_Prophet):
    """Drafts from what the target itself predicted earlier (Token Recycling, Luo et al. 2024): a SuccessorTable
    filled from every verification forward's logits, and a tree grown from the pending token by following each
    node's recorded successors, best path probability first. No training, no forward of its own: a draft costs
    a top-k per verified row and a few table lookups.

    The table belongs to the target model (build_prophet keeps one per target) and grows across calls. Drafts are
    point masses (no q): under sampling they are verified like copied text, which is exact.

    branch: successors considered per node; max_nodes: the largest tree offered (the policy keeps the subtree that
    pays at the measured forward cost, so on a CPU usually 1-3 nodes and more on a GPU).
    """

    name = "recycle"
    gaps_only = True  # beside references (SmolLM2, CPU, scripts/results/cpu-issue12-recycle/): merged into their
    # trees it added no tokens per step (2.41 both; its guesses are mostly what the context already shows) and ran
    # at 0.95x the references alone; run only where they propose nothing, 0.97x: within noise, for less work

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


def _dtype(module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None else torch.float32


def _final_norm(model):
    """The module whose output lm_head reads (the decoder's final norm)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}: heads need the last hidden state")
    return norm


class HybridDrafter:
    """References and a model prophet in one tree per step.

    The reference drafter proposes first. The prophet runs only where it can pay (see _Prophet.pays): its
    expected gain, the chance the references' first tokens are all wrong times the chance its own first token is
    right, in seconds of a plain step, must exceed its draft time and the wider verification. Its nodes are merged into
    the references' trie (a token both propose keeps the reference's evidence) and the policy picks the subtree.
    Under sampling the prophet's tokens are verified as point masses with the references' (exact for any draft
    chosen without the verification's noise), so its own q is not used here.
    """

    def __init__(self, reference, prophet):
        self.reference, self.prophet = reference, prophet
        self.prophet.use_q = False
        self.prophet.standalone = False
        self.session: DraftSession | None = None
        self.skipped = 0  # steps where references matched well enough that the prophet was not run

    @property
    def policy_kind(self) -> str:
        return f"HybridDrafter:{self.prophet.name}/{'tree' if getattr(self.reference, 'tree', True) else 'chain'}"

    def start(self, session: DraftSession) -> None:
        self.session = session
        self.prophet.start(session)

    def close(self) -> None:
        self.prophet.close()
        self.session = None

    def observe(self, new_tokens: Sequence[int]) -> None:
        self.reference.observe(new_tokens)
        self.prophet.observe(new_tokens)

    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        found = self.reference.propose(context, max_tokens)
        tree = (
            DraftTree.chain(found.tokens, source=found.source or "reference", match_len=found.match_len)
            if (isinstance(found, Draft))
            else found
        )
        if self.session is None or not self._prophet_pays(tree):
            self.skipped += 1
            return tree
        guess = self.prophet.propose(context, max_tokens)
        if guess is None:
            return tree
        guess.q = None
        return guess if tree is None or not len(tree) else merge_trees(tree, guess)

    def _prophet_pays(self, tree: DraftTree | None) -> bool:
        """prophet.pays with the references' first-level probability, its first token priced as widening a plain
        step (1 -> 2 tokens): the references' own tree may be dropped by the policy, and the prophet's siblings turn
        a chain (cropped) into a tree (masked and compacted). Measured: priced at the references' width instead,
        SmolLM2 on this CPU lost 10-30% on copy-heavy requests to prophets that were rarely right. A gaps_only
        prophet runs only where the references propose nothing."""
        assert self.session is not None
        if self.prophet.gaps_only and tree is not None and len(tree):
            return False
        policy = self.session.policy
        covered = 0.0
        if tree is not None and len(tree):
            probs = policy.node_probs(tree)
            covered = min(1.0, sum(p for p, parent in zip(probs, tree.parents, strict=True) if parent == ROOT))
        return self.prophet.pays(covered, 1)


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


# ---------------------------------------------------------------------------------------------------------------
# Building prophets by name
# ---------------------------------------------------------------------------------------------------------------

_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target -> {spec: derived model, heads, table}
SELF_PROPHETS = ("self:int8", "self:heads", "self:recycle")  # and self:layers=N


def int8_model(model):
    """A copy of the target whose linear layers are quantized to int8 by torch's dynamic quantization (int8
    weights per output channel, activations quantized per batch), for the CPU; the target is not changed.

    The MLP's down projection and the output head stay in float: their inputs carry outlier activations that
    per-tensor activation quantization flattens. Measured on SmolLM2-135M (600 tokens of chat, teacher-forced),
    the copy's argmax agrees with the target's at 35% with every layer quantized, 67% without those two, 97% for
    bfloat16; weight-only int8 (`_weight_int8pack_mm`) is 16x slower than float32 on a CPU without AVX-512."""
    if model.device.type != "cpu":
        raise ValueError("self:int8 uses torch's dynamic int8 quantization, which runs on the CPU only")
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    clone = copy.deepcopy(model).float()
    names = {
        name
        for name, module in clone.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith(_FLOAT_LINEARS)
    }
    with warnings.catch_warnings():  # torch deprecates eager quantization in favour of torchao, not installed here
        warnings.simplefilter("ignore")
        quantize_dynamic(clone, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8, inplace=True)
    return clone.eval()


_FLOAT_LINEARS = ("down_proj", "lm_head", "fc2", "dense_4h_to_h")  # layers whose inputs have outliers: kept float


def early_exit_model(model, layers: int):
    """The target's first `layers` decoder layers with its final norm and head, sharing the target's weights (no
    copy): a model of the same class built on the meta device whose modules are the target's."""
    config = model.config
    total = getattr(config, "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(total, int) or decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"self:layers=N needs a decoder with a `layers` list; {type(model).__name__} has none")
    if not 1 <= layers < total:
        raise ValueError(f"self:layers=N needs 1 <= N < {total} (the target's layers), got {layers}")
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:layers]
    with torch.device("meta"):
        view = type(model)(small)
    view_decoder = view.get_decoder()
    for name, child in decoder.named_children():
        if name == "layers":
            setattr(view_decoder, name, torch.nn.ModuleList(list(child)[:layers]))
        else:
            setattr(view_decoder, name, child)
    for name, child in model.named_children():
        if child is not decoder:
            setattr(view, name, child)
    leftover = [n for n, p in view.named_parameters() if p.is_meta] + [n for n, b in view.named_buffers() if b.is_meta]
    if leftover:
        raise ValueError(f"self:layers=N cannot share every weight of {type(model).__name__}: {leftover[:3]}")
    view.generation_config = model.generation_config
    return view.eval()


def check_draft_model(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """ValueError unless the draft model can draft for the target: the same vocabulary size and special tokens,
    and (when both tokenizers are known) the same tokenizer."""
    tv, dv = target.config.vocab_size, getattr(draft.config, "vocab_size", None)
    if tv != dv:
        raise ValueError(
            f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}): a draft model must share "
            "the target's tokenizer"
        )
    for key in ("eos_token_id", "bos_token_id"):
        a = getattr(target.generation_config, key, None)
        b = getattr(getattr(draft, "generation_config", None), key, None)
        if a is not None and b is not None and _as_set(a) != _as_set(b):
            raise ValueError(f"the draft model's {key} {b} differs from the target's {a}: not the same tokenizer")
    if target_tokenizer is not None and draft_tokenizer is not None:
        from .corpus.format import tokenizer_fingerprint

        if tokenizer_fingerprint(target_tokenizer) != tokenizer_fingerprint(draft_tokenizer):
            raise ValueError("the draft model's tokenizer differs from the target's: their token ids do not agree")


def _as_set(value) -> set[int]:
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def check_prophet_spec(spec: str) -> None:
    """ValueError for a draft model name that cannot be right whatever the target: an unknown "self:" prophet, a
    layer count that is not a positive whole number, an empty name."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("the draft model name is empty")
    spec = spec.strip()
    if spec.startswith("self:layers="):
        value = spec.split("=", 1)[1]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"self:layers=N needs a whole number of layers >= 1, got {value!r}")
    elif spec.startswith("self:") and spec not in SELF_PROPHETS:
        raise ValueError(
            f"unknown draft model {spec!r}: known self-prophets are self:int8, self:layers=N, self:heads, self:recycle"
        )


def with_prophet(references, draft_model, model, tokenizer=None):
    """What generate and hf_generate draft with: the reference drafter alone (draft_model None), or the reference
    drafter and the prophet `draft_model` names (see build_prophet) in one tree."""
    if draft_model is None:
        return references
    return HybridDrafter(references, build_prophet(draft_model, model, tokenizer))


def forget_learned(model) -> None:
    """Drop what prophets learned across calls for the target `model` (the self:recycle successor table); derived
    models and trained heads are kept. The next self:recycle call starts from an empty table."""
    _DERIVED.get(model, {}).pop("self:recycle", None)


def build_prophet(spec, model, tokenizer=None):
    """A prophet for `spec`: a prophet object (returned as it is), a causal LM object (a draft model sharing the
    tokenizer), "self:int8",
    "self:layers=N", "self:heads", "self:recycle", a known model name or a local checkpoint folder. Derived models,
    heads and the recycled successor table are built once per target and reused (the table keeps learning)."""
    if spec is None:
        raise ValueError("no draft model given")
    if isinstance(spec, _Prophet):  # a prophet built by the caller (e.g. a RecycleDrafter with a table of its own)
        return spec
    if not isinstance(spec, str):
        if not hasattr(spec, "config") or not callable(spec):
            raise ValueError(f"draft_model must be a causal LM or a name, got {type(spec).__name__}")
        check_draft_model(model, spec)
        return ModelDrafter(spec, name="draft")
    check_prophet_spec(spec)
    spec = spec.strip()
    derived = _DERIVED.setdefault(model, {})
    if spec == "self:int8":
        if spec not in derived:
            derived[spec] = int8_model(model)
        return ModelDrafter(derived[spec], name="int8")
    if spec.startswith("self:layers="):
        value = spec.split("=", 1)[1]
        if spec not in derived:
            derived[spec] = early_exit_model(model, int(value))
        return ModelDrafter(derived[spec], name=f"layers{int(value)}", shared_cache=True)
    if spec == "self:recycle":
        if spec not in derived:
            derived[spec] = SuccessorTable()
        return RecycleDrafter(derived[spec])
    if spec == "self:heads":
        if spec not in derived:
            from .heads import load_heads

            derived[spec] = load_heads(_model_name(model), tokenizer=tokenizer, model=model)
        return HeadsDrafter(derived[spec])
    from .models import load_model

    if spec not in derived:
        draft, draft_tokenizer = load_model(spec, dtype=model.dtype, device=model.device)
        check_draft_model(model, draft, tokenizer, draft_tokenizer)
        derived[spec] = draft
    return ModelDrafter(derived[spec], name="draft")


def _model_name(model) -> str:
    """The refdecode name of a loaded model (set by load_model), else its checkpoint folder."""
    from pathlib import Path

    name = getattr(model, "refdecode_name", None) or Path(str(getattr(model.config, "_name_or_path", "") or "")).name
    if not name:
        raise ValueError("self:heads needs to know the model's name: load it with refdecode.load_model")
    return str(name)
