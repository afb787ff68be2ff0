"""refdecode.vllm's proposer logic without vLLM: numpy arrays laid out as vLLM's input batch, a stand-in config.

A small engine stand-in (`Engine`) keeps vLLM's persistent batch (token_ids_cpu, num_tokens_no_spec, rows that
move as requests come and go), binds rows to requests as the plugin does, and accepts each draft's longest prefix
that matches the request's true continuation plus one true token, as greedy verification would.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from stats_helpers import IdTokenizer

from refdecode.policy import AcceptanceModel
from refdecode.vllm import BatchDrafter, Proposer, plugin
from refdecode.vllm.proposer import BatchCosts, ProposerOptions

VOCAB = 1000
MAX_LEN = 256


def config(k=4, additional=None, max_model_len=MAX_LEN):
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        additional_config=additional or {},
        model_config=SimpleNamespace(max_model_len=max_model_len, tokenizer=None),
        scheduler_config=SimpleNamespace(async_scheduling=False),
    )


def text(ids):
    return " ".join(map(str, ids))


class Engine:
    """vLLM's persistent batch in miniature: row i holds request req_ids[i]; finished requests leave their row."""

    def __init__(self, drafter, rows=4, width=MAX_LEN, jump=0.0):
        self.drafter = drafter
        self.now = 0.0
        self.jump = jump  # seconds a step pays on top when it verifies any draft
        self.plain_steps = 0
        drafter.clock = lambda: self.now  # a step of width w takes 10 ms + 1 ms per token (+ jump with drafts)
        self.token_ids = np.zeros((rows, width), dtype=np.int32)
        self.num_tokens = np.zeros(rows, dtype=np.int32)
        self.req_ids: list = [None] * rows
        self.extra: dict = {}
        self.truth: dict = {}  # req_id -> the request's whole sequence as greedy decoding would produce it
        self.drafts: dict = {}  # req_id -> every non-empty draft proposed for it
        self.accepted: dict = {}

    def add(self, req_id, prompt, truth_continuation, references=None, row=None):
        row = self.req_ids.index(None) if row is None else row
        self.req_ids[row] = req_id
        self.token_ids[row, : len(prompt)] = prompt
        self.num_tokens[row] = len(prompt)
        self.truth[req_id] = list(prompt) + list(truth_continuation)
        self.extra[req_id] = {} if references is None else {"references": references}
        self.drafts[req_id], self.accepted[req_id] = [], 0

    def finish(self, req_id):
        row = self.req_ids.index(req_id)
        self.req_ids[row] = None
        self.num_tokens[row] = 0
        del self.extra[req_id]

    def step(self, pending=None):
        """One engine step: each live row got one true token (or its last draft's accepted prefix + one), then
        drafts are proposed. `pending`: req_id -> draft returned for it last step."""
        sampled = []
        for row, req_id in enumerate(self.req_ids):
            if req_id is None:
                sampled.append([])
                continue
            n, truth = int(self.num_tokens[row]), self.truth[req_id]
            draft = (pending or {}).get(req_id, [])
            keep = 0
            while keep < len(draft) and n + keep < len(truth) and draft[keep] == truth[n + keep]:
                keep += 1
            self.accepted[req_id] += keep
            new = truth[n : n + keep + 1]
            self.token_ids[row, n : n + len(new)] = new
            self.num_tokens[row] = n + len(new)
            sampled.append(new)
        self.now += 0.010 + 0.001 * sum(1 + len((pending or {}).get(r, [])) for r in self.req_ids if r is not None)
        self.now += self.jump if pending else 0.0
        self.plain_steps += not pending
        self.drafter.bind_batch(list(self.req_ids), self.extra.get, self.extra)
        drafts = self.drafter.propose(sampled, self.num_tokens, self.token_ids)
        assert len(drafts) == len(self.req_ids)
        out = {}
        for req_id, draft in zip(self.req_ids, drafts, strict=True):
            if req_id is None:
                assert draft == []
            elif draft:
                self.drafts[req_id].append(list(draft))
                out[req_id] = list(draft)
        return out

    def run(self, steps):
        pending = None
        for _ in range(steps):
            pending = self.step(pending)
        return pending


def drafter(k=4, **kw):
    return BatchDrafter(config(k, **kw), tokenizer=IdTokenizer(VOCAB))


PERIOD = [11, 12, 13, 14, 15, 16, 17]


def test_a_row_drafts_from_its_own_prompt_and_output_capped_at_k():
    engine = Engine(drafter(k=3))
    engine.add("a", PERIOD * 3, PERIOD * 10)
    engine.run(30)
    assert engine.drafts["a"], "a repeating request never drafted"
    assert all(1 <= len(d) <= 3 for d in engine.drafts["a"])
    assert engine.accepted["a"] > 20


def test_references_draft_for_their_own_request_only():
    ref = list(range(100, 140))
    engine = Engine(drafter(k=4))
    # same prompt (the reference's first 5 tokens), same true continuation (the reference's rest)
    engine.add("with", ref[:5], ref[5:], references=[text(ref)])
    engine.add("without", ref[:5], ref[5:])
    engine.add("other", ref[:5], ref[5:], references=[text([900, 901, 902])])
    engine.run(12)
    assert engine.accepted["with"] >= 20
    # the others' own prompt and output never repeat, and "other"'s reference never matches: nothing to copy
    assert engine.drafts["without"] == [] and engine.drafts["other"] == []


def test_rows_that_move_keep_their_request_state():
    engine = Engine(drafter(k=4))
    ref = list(range(200, 260))
    engine.add("a", ref[:4], ref[4:], references=[text(ref)])
    engine.add("b", PERIOD * 2, PERIOD * 8)
    pending = engine.run(3)
    # vLLM condenses the batch: swap the two requests' rows, contents included
    engine.token_ids[[0, 1]] = engine.token_ids[[1, 0]]
    engine.num_tokens[[0, 1]] = engine.num_tokens[[1, 0]]
    engine.req_ids[0], engine.req_ids[1] = engine.req_ids[1], engine.req_ids[0]
    before = dict(engine.drafter.sessions)
    for _ in range(5):
        pending = engine.step(pending)
    assert engine.drafter.sessions["a"] is before["a"] and engine.drafter.sessions["b"] is before["b"]
    assert engine.accepted["a"] >= 15


def test_state_of_finished_requests_is_freed():
    engine = Engine(drafter())
    engine.add("a", PERIOD * 2, PERIOD * 4, references=[text(PERIOD)])
    engine.add("b", PERIOD * 2, PERIOD * 4)
    engine.run(2)
    assert set(engine.drafter.sessions) == {"a", "b"}
    engine.finish("a")
    engine.run(1)
    assert set(engine.drafter.sessions) == {"b"}
    engine.drafter.finish("b")
    assert engine.drafter.sessions == {}


@pytest.mark.parametrize("memory_tokens", [1_000_000, 0])
def test_finished_outputs_draft_for_later_requests(memory_tokens):
    answer = list(range(300, 340))
    engine = Engine(drafter(k=4, additional={"refdecode": {"memory_tokens": memory_tokens}}))
    engine.add("first", [1, 2], answer)
    engine.run(45)  # the whole answer, one token a step (nothing to copy yet)
    engine.finish("first")
    engine.run(1)  # the next step frees its state: its output joins the memory
    assert engine.drafter.sessions == {}
    # a later request whose prompt ends like the start of that answer, and whose answer is the same
    engine.add("second", [7, 300, 301], answer[2:])
    engine.run(12)
    if memory_tokens:
        assert engine.accepted["second"] >= 20  # copied from the first request's output
        assert len(engine.drafter.memory) == 1
    else:
        assert engine.drafts["second"] == [] and engine.drafter.memory is None


def test_a_request_id_reused_with_other_tokens_starts_afresh():
    engine = Engine(drafter())
    ref = list(range(300, 340))
    engine.add("r", ref[:5], ref[5:], references=[text(ref)])
    engine.run(3)
    old = engine.drafter.sessions["r"]
    engine.finish("r")
    engine.add("r", [7, 8, 9, 10], PERIOD * 3)  # same id, no references, other tokens (e.g. preempted + reset)
    engine.run(2)
    assert engine.drafter.sessions["r"] is not old
    assert engine.drafter.sessions["r"].store is None


def test_rows_that_sampled_nothing_get_no_draft():
    d = drafter()
    tokens = np.array([PERIOD * 3, PERIOD * 3], dtype=np.int32)
    d.bind_batch(["a", "b"], lambda r: None, {"a", "b"})
    drafts = d.propose([[], [PERIOD[0]]], np.array([21, 21]), tokens)
    assert drafts[0] == [] and "a" not in d.sessions  # a prefill chunk in progress
    assert "b" in d.sessions


def test_placeholder_tokens_give_no_draft_and_no_error():
    d = drafter()
    tokens = np.array([PERIOD * 3 + [-1]], dtype=np.int32)
    d.bind_batch(["a"], lambda r: None, {"a"})
    assert d.propose([[-1]], np.array([22]), tokens) == [[]]


def test_drafts_stop_at_the_model_length():
    d = BatchDrafter(config(k=8, max_model_len=23), tokenizer=IdTokenizer(VOCAB))
    tokens = np.zeros((1, 32), dtype=np.int32)
    tokens[0, :21] = PERIOD * 3
    d.bind_batch(["a"], lambda r: None, {"a"})
    for _ in range(20):  # the policy may explore before drafting: several steps at the same length
        drafts = d.propose([[PERIOD[-1]]], np.array([21]), tokens)
        assert len(drafts[0]) <= 23 - 21 - 1


@pytest.mark.parametrize("bad", [42, [""], ["  "], [7], {"a": 1}])
def test_bad_references_are_skipped_without_stopping_the_engine(bad):
    engine = Engine(drafter())
    engine.add("a", PERIOD * 2, PERIOD * 3, references=bad)
    engine.run(3)
    assert engine.drafter.sessions["a"].store is None


def test_references_beyond_the_engines_limit_are_skipped():
    engine = Engine(drafter(additional={"refdecode": {"max_reference_tokens": 10}}))
    engine.add("a", [1, 2, 3], PERIOD, references=[text(range(100, 120)), text(range(200, 205))])
    engine.run(2)
    store = engine.drafter.sessions["a"].store
    assert store is not None and len(store) == 1 and store.num_tokens == 5


def test_a_single_text_is_one_reference_not_one_per_character():
    engine = Engine(drafter())
    ref = list(range(400, 420))
    engine.add("a", ref[:3], ref[3:], references=text(ref))
    engine.run(2)
    store = engine.drafter.sessions["a"].store
    assert store is not None and len(store) == 1 and store.num_tokens == len(ref)


def test_propose_needs_the_batch_bound():
    with pytest.raises(RuntimeError, match="bind_batch"):
        drafter().propose([[1]], np.array([1]), np.ones((1, 4), dtype=np.int32))


@pytest.mark.parametrize(
    "cfg, match",
    [
        (config(k=0), "num_speculative_tokens"),
        (config(additional={"refdecode": {"nope": 1}}), "unknown"),
        (config(additional={"refdecode": {"max_ngram": 0}}), "max_ngram"),
        (config(additional={"refdecode": {"index": 3}}), "index"),
        (config(additional={"refdecode": {"max_reference_tokens": 0}}), "max_reference_tokens"),
        (config(additional={"refdecode": [1]}), "mapping"),
    ],
)
def test_bad_configuration_is_a_value_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        BatchDrafter(cfg, tokenizer=IdTokenizer(VOCAB))


def test_options_are_read_from_additional_config():
    options = ProposerOptions.from_additional_config({"refdecode": {"max_ngram": 6, "explore_every": 4}})
    assert options == ProposerOptions(index=None, max_ngram=6, explore_every=4)
    assert options.max_reference_tokens == 1_000_000
    assert ProposerOptions.from_additional_config(None) == ProposerOptions()


def test_a_draft_costs_the_whole_batch():
    costs = BatchCosts()
    for width in (24, 40, 80):  # a busy batch: never timed at its plain width (16)
        costs.steps.observe(width, 0.010 + 0.001 * width)
    assert costs.line() == (pytest.approx(0.010), pytest.approx(0.001))
    one, sixteen = costs.row_view(1), costs.row_view(16)
    assert one.cost(1) == pytest.approx(1.0) and sixteen.cost(1) == pytest.approx(1.0)
    assert one.cost(9) == pytest.approx(0.019 / 0.011)
    # 8 more tokens in a batch of 16: 16 rows wait for them
    assert sixteen.cost(9) == pytest.approx(1 + 16 * (0.034 / 0.026 - 1))
    assert sixteen.cost(9) > one.cost(9)


def test_plain_steps_are_timed_apart_and_priced_by_the_nearest_row_count():
    costs = BatchCosts()
    assert costs.plain_time(16) is None
    for width in (24, 40):
        costs.observe(16, width, 0.050 + 0.001 * width)  # drafted steps: a jump of 40 ms over the plain line
    costs.observe(16, 16, 0.026)
    assert costs.line() == (pytest.approx(0.050), pytest.approx(0.001))
    assert costs.plain_time(16) == pytest.approx(0.026)
    assert costs.plain_time(12) == pytest.approx(0.022)  # moved along the drafted steps' slope
    assert costs.steps.table.keys() == {24, 40} and costs.plain.table.keys() == {16}


def half_right_rows(engine, rows):
    """Requests whose copies are right for 2 tokens, then wrong: drafts pay a little, never a lot."""
    for r in range(rows):
        truth = [t for i in range(120) for t in (11, 12, 13, 500 + 7 * i + r)]
        engine.add(f"r{r}", truth[:8], truth[8:])


def test_a_batch_drafts_only_where_its_drafts_beat_the_fixed_cost_of_verifying_any():
    free = Engine(drafter(k=4, additional={"refdecode": {"memory_tokens": 0}}))
    half_right_rows(free, 4)
    free.run(100)
    costly = Engine(drafter(k=4, additional={"refdecode": {"memory_tokens": 0}}), jump=0.5)  # 0.5 s per drafted step
    half_right_rows(costly, 4)
    costly.run(100)
    # no jump: every step that has a copy drafts it (half the steps follow a token never seen before: no copy)
    assert free.plain_steps <= 60 and min(free.accepted.values()) >= 80
    # a jump 35x a plain step: only the exploration steps draft, and they still learn
    assert costly.plain_steps >= 85 and 0 < min(costly.accepted.values()) <= 20


def test_a_clock_that_does_not_move_still_drafts():
    """Steps timed at 0 s (a coarse clock): no division by zero, and drafting is not priced out."""
    engine = Engine(drafter(k=4))
    engine.drafter.clock = lambda: 0.0
    truth = [1, 2, 3, 4, 5, 6, 7, 8] * 8
    engine.add("a", truth[:12], truth[12:])
    engine.run(20)
    assert engine.accepted["a"] > 0
    costs = BatchCosts()
    costs.steps.observe(1, 0.0)
    assert costs.row_view(1).cost(5) == pytest.approx(1.0)


def test_untimed_steps_cost_like_refdecodes_prior():
    view = BatchCosts().row_view(1)
    assert view.cost(5) == pytest.approx(1 + 0.05 * 4)


def test_the_policy_learns_that_a_row_is_never_right():
    engine = Engine(drafter(k=4))
    # "11" is always followed by a token never seen before: every draft (copied after "11") is rejected at once
    truth = [t for i in range(200) for t in (11, 600 + i)]
    engine.add("a", truth[:6], truth[6:])
    engine.run(200)
    assert engine.drafts["a"] and engine.accepted["a"] == 0
    # after the first rejections only the policy's exploration drafts (2 tokens every 16 plain steps)
    late = sum(map(len, engine.drafts["a"][-8:]))
    assert late <= 2 * 8, engine.drafts["a"]


def test_the_vllm_shell_answers_a_drafting_error_with_no_drafts(monkeypatch):
    monkeypatch.setattr(plugin, "attach", lambda cls: None)
    proposer = Proposer(config(), tokenizer=IdTokenizer(VOCAB))
    proposer.bind_batch(["a"], lambda r: None, {"a"})
    monkeypatch.setattr(proposer, "_draft_row", lambda *a: 1 / 0)
    assert proposer.propose([[11]], np.array([21]), np.array([PERIOD * 3], dtype=np.int32)) == [[]]
    assert proposer.sessions == {}


def test_the_vllm_shell_refuses_async_scheduling(monkeypatch):
    monkeypatch.setattr(plugin, "attach", lambda cls: None)
    cfg = config()
    cfg.scheduler_config.async_scheduling = True
    with pytest.raises(ValueError, match="async_scheduling"):
        Proposer(cfg, tokenizer=IdTokenizer(VOCAB))


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu"])
def test_the_tested_vllm_version_is_accepted(version):
    plugin.check_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.32.1", "1.0.0"])
def test_an_untested_vllm_version_is_refused_with_a_clear_message(version):
    with pytest.raises(ValueError, match=f"tested with vLLM 0.32.0, not {version}"):
        plugin.check_version(version)


@pytest.mark.slow
def test_importing_refdecode_vllm_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, refdecode, refdecode.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# Property: requests with disjoint vocabularies, random references, random arrivals/finishes and row moves. A draft
# copies from its own request's prompt, output and references, so its tokens always lie in that request's range.
@pytest.mark.fuzz
@given(
    data=st.data(),
    k=st.integers(1, 6),
    num_requests=st.integers(1, 5),
)
def test_drafts_only_ever_hold_tokens_of_their_own_request(data, k, num_requests):
    engine = Engine(drafter(k=k), rows=3)
    alphabet = {f"r{i}": list(range(20 + 30 * i, 30 + 30 * i)) for i in range(num_requests)}
    waiting = list(alphabet)
    pending: dict = {}
    for _ in range(data.draw(st.integers(5, 25), label="steps")):
        if waiting and None in engine.req_ids and data.draw(st.booleans(), label="arrive"):
            req_id = waiting.pop(0)
            tokens = st.lists(st.sampled_from(alphabet[req_id]), min_size=1, max_size=30)
            prompt, truth = data.draw(tokens, label="prompt"), data.draw(tokens, label="continuation")
            refs = data.draw(st.lists(tokens, max_size=2), label="references")
            engine.add(req_id, prompt, truth + [0] * 40, references=[text(r) for r in refs] or None)
        live = [r for r in engine.req_ids if r is not None]
        if live and data.draw(st.integers(0, 5), label="finish?") == 0:
            engine.finish(data.draw(st.sampled_from(live), label="finished"))
        if data.draw(st.booleans(), label="move rows"):
            a, b = 0, len(engine.req_ids) - 1
            engine.token_ids[[a, b]] = engine.token_ids[[b, a]]
            engine.num_tokens[[a, b]] = engine.num_tokens[[b, a]]
            engine.req_ids[a], engine.req_ids[b] = engine.req_ids[b], engine.req_ids[a]
        pending = engine.step(pending)
        for req_id, draft in pending.items():
            assert 1 <= len(draft) <= k
            assert set(draft) <= set(alphabet[req_id]) | {0}, (req_id, draft)
        assert set(engine.drafter.sessions) <= {r for r in engine.req_ids if r is not None}


class FakeSpans:
    """A corpus span index over one text that repeats 70 71 ... 75: continues the context's last token in it."""

    CYCLE = [70, 71, 72, 73, 74, 75]

    def __init__(self):
        self.calls = 0

    def span_continuations(self, context_tail, max_tokens, *, max_candidates=8, min_match=2):
        self.calls += 1
        if context_tail[-1] not in self.CYCLE:
            return 0, []
        start = self.CYCLE.index(context_tail[-1]) + 1
        return 1, [(self.CYCLE * 3)[start : start + max_tokens]]


def test_the_engine_corpus_index_drafts_for_every_request():
    spans = FakeSpans()
    engine = Engine(BatchDrafter(config(k=4), tokenizer=IdTokenizer(VOCAB), spans=spans))
    engine.add("a", [1, 2, 3], [70, 71, 72, 73, 74, 75] * 3)
    engine.add("b", [4, 5, 6], [70, 71, 72, 73, 74, 75] * 3, references=[text([900, 901])])
    engine.run(3)
    assert spans.calls > 0
    assert engine.accepted["a"] > 0 and engine.accepted["b"] > 0
    assert engine.drafter.sessions["a"].drafter.spans is spans is engine.drafter.sessions["b"].drafter.spans


def fake_vllm(monkeypatch, version="0.32.0"):
    """Just enough of vLLM's modules for the plugin: a version and a model runner that calls its drafter."""
    import sys
    import types

    class GPUModelRunner:
        def __init__(self, drafter, req_ids, requests):
            self.drafter, self.requests = drafter, requests
            self.input_batch = SimpleNamespace(req_ids=req_ids)

        def propose_draft_token_ids(self, sampled, num_tokens, token_ids):
            return self.drafter.propose(sampled, num_tokens, token_ids)

    modules = {"vllm": types.ModuleType("vllm")}
    for name in ("vllm.v1", "vllm.v1.worker", "vllm.v1.worker.gpu_model_runner"):
        modules[name] = types.ModuleType(name)
    modules["vllm"].__version__ = version
    modules["vllm.v1.worker.gpu_model_runner"].GPUModelRunner = GPUModelRunner
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(plugin, "_registered", False)
    return GPUModelRunner


def test_the_plugin_binds_rows_to_requests_before_the_proposer_runs(monkeypatch):
    runner_class = fake_vllm(monkeypatch)
    plugin.register()
    proposer = Proposer(config(), tokenizer=IdTokenizer(VOCAB))
    plugin.attach(Proposer)  # a second engine in the same process: hooked once
    ref = list(range(100, 120))
    requests = {
        "a": SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"references": [text(ref)]})),
        "b": SimpleNamespace(sampling_params=None),  # a pooling request has no sampling parameters
    }
    runner = runner_class(proposer, ["b", "a"], requests)
    tokens = np.array([ref[:4], ref[:4]], dtype=np.int32)
    drafts = runner.propose_draft_token_ids([[ref[3]], [ref[3]]], np.array([4, 4]), tokens)
    assert drafts[0] == [] and drafts[1] and set(drafts[1]) <= set(ref[4:])
    assert proposer.sessions["a"].store is not None and proposer.sessions["b"].store is None
    del requests["a"]
    runner.input_batch.req_ids = ["b", None]
    runner.propose_draft_token_ids([[ref[3]], []], np.array([4, 0]), tokens)
    assert set(proposer.sessions) == {"b"}


def test_the_proposer_refuses_an_untested_vllm(monkeypatch):
    fake_vllm(monkeypatch, version="0.33.0")
    plugin.register()  # logs, never raises: engines without refdecode's proposer keep working
    with pytest.raises(ValueError, match="not 0.33.0"):
        Proposer(config(), tokenizer=IdTokenizer(VOCAB))


def test_the_proposer_says_when_the_plugin_was_not_loaded(monkeypatch):
    fake_vllm(monkeypatch)
    with pytest.raises(RuntimeError, match="plugin was not loaded"):
        Proposer(config(), tokenizer=IdTokenizer(VOCAB))


def test_the_vllm_shell_loads_the_tokenizer_with_the_engine(monkeypatch):
    monkeypatch.setattr(plugin, "attach", lambda cls: None)
    with pytest.raises(ValueError, match="names no tokenizer"):  # at start-up, not in the first request's step
        Proposer(config())


def test_a_new_request_starts_from_what_earlier_requests_taught():
    engine = Engine(drafter(k=4))
    truth = [t for i in range(60) for t in (11, 600 + i)]  # every draft rejected at once (see above)
    engine.add("a", truth[:6], truth[6:])
    engine.run(60)
    engine.finish("a")
    engine.add("b", [5, 6, 7], PERIOD)
    engine.run(1)
    learned = engine.drafter.sessions["b"].policy.acceptance
    assert learned.rate(1) < 0.2 < AcceptanceModel().rate(1)
    assert learned is not engine.drafter.acceptance


@given(
    observed=st.lists(
        st.tuples(st.integers(1, 64), st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)), max_size=12
    ),
    rows=st.integers(1, 32),
)
def test_a_row_cost_is_finite_at_least_one_and_never_cheaper_for_more_tokens(observed, rows):
    costs = BatchCosts()
    for width, seconds in observed:
        costs.steps.observe(width, seconds)
    view = costs.row_view(rows)
    prices = [view.cost(w) for w in range(1, 20)]
    assert prices[0] == pytest.approx(1.0)
    assert all(np.isfinite(p) and p >= 1.0 - 1e-9 for p in prices)
    assert all(b >= a - 1e-9 for a, b in zip(prices, prices[1:], strict=False))


@given(
    data=st.data(),
    ticks=st.lists(st.sampled_from([0.0, 1e-9, 0.01, 0.1, 5.0, 1e6]), min_size=1, max_size=40),
)
def test_any_step_timing_leaves_drafting_working(data, ticks):
    """Steps that take no time, a tick, or a day (a suspended host): propose never fails and keeps its bounds."""
    engine = Engine(drafter(k=4), rows=2)
    clock = iter(np.cumsum(ticks + [0.0] * 200))
    engine.drafter.clock = lambda: float(next(clock))
    tokens = st.lists(st.integers(20, 40), min_size=1, max_size=30)
    engine.add("a", data.draw(tokens, label="prompt"), data.draw(tokens, label="continuation") + [0] * 40)
    engine.add("b", PERIOD * 2, PERIOD * 20)
    pending: dict = {}
    for _ in range(30):
        pending = engine.step(pending)
        assert all(1 <= len(d) <= 4 for d in pending.values())
    assert engine.accepted["b"] > 0
