"""The forward-cost calibration kept on disk (refdecode.cost_cache): written once, checked and reused by a later
process on the same machine, timed afresh when the check fails or the file is damaged, never a failure of its own.

A later process is stood in for by forgetting the model's in-process table, routes and rounding. Forwards are
timed on a fake clock (the width's price, routed forwards cheaper) so the check's outcome is the test's choice."""

import json
import math

import pytest
import torch
from stats_helpers import IdTokenizer, tiny_llama
from transformers import DynamicCache

import refdecode
import refdecode.policy as policy
from refdecode import cost_cache, kernels
from refdecode.policy import calibrate_costs, calibration_widths, measured_rounding

pytestmark = pytest.mark.usefixtures("one_thread")


def price(width: int) -> float:
    return 1.0 if width <= 4 else 2.0 if width <= 16 else 4.0


class Clock:
    """Stands in for policy.time: forwards advance it by their price; counts them by width."""

    def __init__(self, factor: float = 1.0):
        self.now, self.factor, self.forwards = 0.0, factor, []
        self.long = 1.0  # how much more a forward of 5 tokens or more costs after 100 cached tokens or more

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch, tmp_path):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "on")
    clock = Clock()
    real = policy.forward_tokens

    def timed(model, cache, tokens, *, route=None):
        routed = kernels.takes_route(model, len(tokens)) if route is None else route
        long = clock.long if cache.get_seq_length() >= 100 and len(tokens) >= 5 else 1.0
        clock.now += clock.factor * long * price(len(tokens)) * (0.5 if routed and len(tokens) >= 2 else 1.0)
        clock.forwards.append(len(tokens))
        return real(model, cache, tokens, route=route)

    monkeypatch.setattr(policy, "time", clock)
    monkeypatch.setattr(policy, "forward_tokens", timed)
    return clock


def fresh_model(seed: int = 3):
    return tiny_llama(vocab_size=96, seed=seed, layers=2, hidden=64)


def prefilled(model, length: int = 20):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=(torch.arange(length) % 90 + 2).unsqueeze(0), cache=cache, use_cache=True)
    return cache


def new_process(model) -> None:
    """What a new process knows of the model: nothing (its table, routes and rounding forgotten)."""
    policy._COST_TABLES.pop(model, None)
    policy._ROUNDING.pop(model, None)
    kernels.forget_route(model)


def kept_file(model):
    return cost_cache.table_path(cost_cache.fingerprint(model, routable=kernels.routable(model)))


def test_a_calibration_is_kept_and_a_later_process_checks_it_with_four_forwards(clock):
    model = fresh_model()
    widths = calibration_widths(16)
    first = calibrate_costs(model, prefilled(model), 5, widths=widths, rounds=1)
    routes, rounding = kernels.route_table(model), measured_rounding(model)
    assert kept_file(model).is_file()
    assert len(clock.forwards) == 2 * len(widths) - 1  # every width, and every width >= 2 routed too

    new_process(model)
    clock.forwards.clear()
    clock.factor = 1.5  # the same machine under more load: every forward 1.5 times slower
    second = calibrate_costs(model, prefilled(model), 5, widths=widths, rounds=1)
    assert sorted(clock.forwards) == [1, 1, 17, 17]  # the check: one token and the widest width up to 17, twice
    assert kernels.route_table(model) == routes and measured_rounding(model) == rounding
    assert set(second) == set(first)
    assert all(math.isclose(second[w], 1.5 * first[w]) for w in first)  # rescaled by the one-token time now


def test_a_kept_table_whose_shape_no_longer_matches_is_timed_again_and_replaced(clock):
    model = fresh_model()
    widths = calibration_widths(16)
    calibrate_costs(model, prefilled(model), 5, widths=widths, rounds=1)
    path = kept_file(model)
    body = json.loads(path.read_text())
    body["tables"][0]["seconds"]["17"] *= 3  # another machine: 17 tokens cost three times more there
    path.write_text(json.dumps(body))

    new_process(model)
    clock.forwards.clear()
    table = calibrate_costs(model, prefilled(model), 5, widths=widths, rounds=1)
    assert len(clock.forwards) == 4 + 2 * len(widths) - 1  # the failed check, then the whole calibration
    assert math.isclose(table[17] / table[1], 2.0)  # 17 tokens routed: 4 x 0.5 over one token's 1
    tables = json.loads(path.read_text())["tables"]
    assert len(tables) == 1 and tables[0]["seconds"]["17"] == table[17]  # the new timing, in the old one's place


def test_a_table_is_kept_per_context_length_and_the_nearest_one_is_checked(clock):
    """Wide forwards cost more after a long context (attention): a table timed after 20 tokens fails its check
    after 200, so a second table is kept beside it, and each later process checks the one nearest its context."""
    model = fresh_model()
    widths = calibration_widths(16)
    clock.long = 2.0
    calibrate_costs(model, prefilled(model, 20), 5, widths=widths, rounds=1)
    for length, timed in [(200, 4 + 2 * len(widths) - 1), (25, 4), (180, 4), (30, 4)]:
        new_process(model)
        clock.forwards.clear()
        table = calibrate_costs(model, prefilled(model, length), 5, widths=widths, rounds=1)
        assert len(clock.forwards) == timed, length
        assert math.isclose(table[17] / table[1], 2.0 * (2.0 if length >= 100 else 1.0)), length
    tables = cost_cache.load(cost_cache.fingerprint(model, routable=kernels.routable(model)))
    assert sorted(t["context"] for t in tables) == [20, 200]


def test_a_new_table_replaces_the_kept_ones_of_a_similar_context_and_at_most_eight_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    key = {"format": cost_cache.FORMAT, "model": "stand-in"}

    def table(context: int) -> dict:
        return {"context": context, "seconds": {1: 1.0, 2: 1.1}, "routes": {2: True}, "rounding": None}

    for context in [100, 150, 1000]:  # 150 replaces 100 (within a factor 2)
        cost_cache.save(key, table(context))
    assert [t["context"] for t in cost_cache.load(key)] == [150, 1000]
    for context in [3**i for i in range(1, 12)]:
        cost_cache.save(key, table(context))
    kept = [t["context"] for t in cost_cache.load(key)]
    assert len(kept) == cost_cache.MAX_TABLES and kept[-1] == 3**11  # the newest kept, the oldest dropped
    assert cost_cache.nearest(cost_cache.load(key), 700)["context"] == 729
    assert cost_cache.nearest([], 700) is None


@pytest.mark.parametrize("damage", ["", "{not json", '{"key": 1}', "[]", '{"tables": [{"seconds": {"1": -1}}]}'])
def test_a_damaged_file_is_timed_again_and_replaced_without_an_error(clock, damage):
    model = fresh_model()
    widths = calibration_widths(8)
    calibrate_costs(model, prefilled(model), 5, widths=widths, rounds=1)
    path = kept_file(model)
    path.write_text(damage)
    new_process(model)
    clock.forwards.clear()
    table = calibrate_costs(model, prefilled(model), 5, widths=widths, rounds=1)
    assert len(clock.forwards) == 2 * len(widths) - 1
    assert cost_cache.load(cost_cache.fingerprint(model, routable=kernels.routable(model)))[0]["seconds"] == table


def test_a_later_process_with_a_larger_max_draft_times_only_the_widths_it_adds(clock):
    model = fresh_model()
    calibrate_costs(model, prefilled(model), 5, widths=calibration_widths(8), rounds=1)
    new_process(model)
    clock.forwards.clear()
    table = calibrate_costs(model, prefilled(model), 5, widths=calibration_widths(32), rounds=1)
    added = set(calibration_widths(32)) - set(calibration_widths(8))
    check = max(w for w in calibration_widths(8) if w <= policy.CHECK_WIDTH)
    assert sorted(clock.forwards) == sorted([1, 1, check, check] + [w for w in added for _ in (0, 1)])
    assert set(table) == set(calibration_widths(32))
    [kept] = cost_cache.load(cost_cache.fingerprint(model, routable=kernels.routable(model)))
    assert set(kept["seconds"]) == set(table) and set(kept["routes"]) == set(table) - {1}


def test_switched_off_nothing_is_kept(clock, monkeypatch, tmp_path):
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "off")
    model = fresh_model()
    calibrate_costs(model, prefilled(model), 5, widths=calibration_widths(8), rounds=1)
    assert not (tmp_path / "costs").exists()


def test_an_unknown_switch_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "maybe")
    with pytest.raises(ValueError, match="REFDECODE_COST_CACHE must be 'on' or 'off'"):
        cost_cache.enabled()


def test_a_cache_that_cannot_be_written_does_not_fail_the_calibration(clock, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("REFDECODE_CACHE", str(blocker))
    model = fresh_model()
    table = calibrate_costs(model, prefilled(model), 5, widths=calibration_widths(8), rounds=1)
    assert set(table) == set(calibration_widths(8))
    assert blocker.read_text() == "not a folder"


def test_the_fingerprint_follows_shapes_dtype_and_threads_not_weights():
    a, b = fresh_model(seed=3), fresh_model(seed=4)
    key = cost_cache.fingerprint(a, routable=True)
    assert key == cost_cache.fingerprint(b, routable=True)  # other weights, the same shapes: one table
    assert key != cost_cache.fingerprint(a, routable=False)
    wider = tiny_llama(vocab_size=96, seed=3, layers=2, hidden=128)
    assert key["parameters"] != cost_cache.fingerprint(wider, routable=True)["parameters"]
    assert key["dtype"] != cost_cache.fingerprint(fresh_model().to(torch.bfloat16), routable=True)["dtype"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key["device"] != cost_cache.fingerprint(a, routable=True)["device"]
    finally:
        torch.set_num_threads(threads)


def test_generate_keeps_the_table_and_a_later_process_gives_the_same_greedy_output(monkeypatch, tmp_path):
    """Through the public call, timed for real: the first generate keeps the table, the next (a new process, as far
    as the model knows) reads it, and both outputs are transformers' greedy output."""
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "on")
    model = tiny_llama(vocab_size=64, seed=5)
    prompt = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    first = refdecode.generate(model, IdTokenizer(64), prompt, max_new_tokens=24, max_draft=16)
    assert kept_file(model).is_file()
    new_process(model)
    second = refdecode.generate(model, IdTokenizer(64), prompt, max_new_tokens=24, max_draft=16)
    assert first.token_ids == second.token_ids == expected


# `refdecode calibrate`


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary, saved with its tokenizer, so the command loads it by path."""
    model = tiny_llama(vocab_size=len(smollm2_tokenizer), seed=3, max_positions=256, eos_token_id=None)
    folder = tmp_path_factory.mktemp("tiny-calibrate-model")
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def calibrate_cli(capsys, folder, *extra):
    from refdecode.cli import main

    code = main(["calibrate", "--model", str(folder), "--context", "20", "--max-draft", "16", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_calibrate_command_keeps_the_table_then_finds_it(capsys, clock, tiny_model_dir):
    code, out, err = calibrate_cli(capsys, tiny_model_dir, "--json")
    assert code == 0, err
    first = json.loads(out)
    assert first["source"] == "timed" and first["kept_in"].endswith(".json")
    assert [int(w) for w in first["widths"]] == list(calibration_widths(16))
    assert first["widths"]["1"]["relative"] == 1.0 and first["widths"]["17"]["routed"] is True
    clock.forwards.clear()
    code, out, _ = calibrate_cli(capsys, tiny_model_dir, "--json")  # a new process: the model is loaded again
    second = json.loads(out)
    assert second["source"] == "the kept table, checked" and sorted(clock.forwards) == [1, 1, 17, 17]
    assert second["kept_in"] == first["kept_in"] and second["widths"] == first["widths"]
    clock.forwards.clear()
    code, out, _ = calibrate_cli(capsys, tiny_model_dir, "--again")
    assert code == 0 and "timed in" in out and "kept in" in out
    assert len(clock.forwards) == 3 * (2 * len(calibration_widths(16)) - 1)  # three rounds, both kernels
    assert "\n   17  " in out and "routed" in out  # the table: width, seconds, x one token, kernels
    line = next(x for x in out.splitlines() if x.startswith("chains the draft policy verifies"))
    lengths = [int(part.split("->")[1]) for part in line.split(": ", 1)[1].split(", ")]
    assert lengths == sorted(lengths) and all(0 <= k <= 16 for k in lengths)  # longer where drafts hold
    assert second["chain_lengths"] == first["chain_lengths"]


def test_the_calibrate_command_says_when_nothing_is_kept(capsys, clock, tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "off")
    code, out, _ = calibrate_cli(capsys, tiny_model_dir)
    assert code == 0 and "not kept (REFDECODE_COST_CACHE=off)" in out and not (tmp_path / "costs").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-draft", "0"], "--max-draft must be between 1 and 1024"),
        (["--context", "0"], "--context must be at least 1"),
        (["--context", "250"], "exceed the model's context (256)"),
    ],
)
def test_the_calibrate_command_refuses_bad_options_in_one_line(capsys, tiny_model_dir, extra, message):
    code, _, err = calibrate_cli(capsys, tiny_model_dir, *extra)
    # the last line (a refusal after the model loaded follows its loading bar)
    assert code == 2 and message in err.splitlines()[-1] and "Traceback" not in err


def test_a_bad_switch_value_is_refused_before_any_model_loads(capsys, monkeypatch):
    from refdecode.cli import main

    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "yes")
    code = main(["calibrate", "--model", "no-such-model-xyz"])
    err = capsys.readouterr().err
    assert code == 2 and "REFDECODE_COST_CACHE must be 'on' or 'off'" in err and "no-such-model" not in err


# what the policy learned, kept for the next process's first call


def taught_policy() -> policy.DraftPolicy:
    p = policy.DraftPolicy()
    for _ in range(6):
        p.acceptance.update(32, drafted=20, accepted=20)  # long copies: always right
        p.acceptance.update(1, drafted=4, accepted=0)  # one-token matches: never
    p.acceptance_for("corpus").update(8, drafted=5, accepted=3)
    p._pad_recompute = 0.3
    return p


def test_a_policy_is_kept_and_the_next_process_starts_from_it(monkeypatch, tmp_path):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "on")
    model, taught = fresh_model(), taught_policy()
    policy.remember_policy(model, taught, kind="ReferenceDrafter/tree")
    in_process = policy.warm_policy(model, 128, kind="ReferenceDrafter/tree")
    policy._LAST_POLICIES.pop(model)  # a new process
    kept = policy.warm_policy(model, 128, kind="ReferenceDrafter/tree")
    assert kept.acceptance.rates() == in_process.acceptance.rates() != policy.DraftPolicy().acceptance.rates()
    assert kept.acceptance_for("corpus").rates() == in_process.acceptance_for("corpus").rates()
    assert kept._pad_recompute == 0.3
    # another kind of drafting starts from the prior
    assert policy.warm_policy(model, 128, kind="ReferenceDrafter/chain").acceptance.rates() == (
        policy.DraftPolicy().acceptance.rates()
    )


def test_a_learned_state_survives_json_exactly():
    taught = taught_policy()
    again = policy.DraftPolicy.from_learned_state(json.loads(json.dumps(taught.learned_state())))
    assert again.acceptance == taught.acceptance and again._by_source == taught._by_source
    assert again._pad_recompute == taught._pad_recompute


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s["acceptance"].update(successes=[1.0]),  # a bucket count of another version
        lambda s: s["acceptance"].update(trials=[-1.0] * len(policy.MATCH_BUCKETS)),
        lambda s: s["acceptance"].update(successes=[5.0] * len(policy.MATCH_BUCKETS)),  # more successes than trials
        lambda s: s.update(pad_recompute=2.0),
        lambda s: s.pop("by_source"),
        lambda s: s["acceptance"].update(decay="nan"),
    ],
)
def test_a_kept_policy_that_describes_none_is_ignored(monkeypatch, tmp_path, damage):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "on")
    model = fresh_model()
    state = taught_policy().learned_state()
    damage(state)
    cost_cache.save_policy(cost_cache.fingerprint(model, routable=kernels.routable(model)), "k", state)
    assert policy.warm_policy(model, 128, kind="k").acceptance.rates() == policy.DraftPolicy().acceptance.rates()


def test_switched_off_no_policy_is_kept_or_read(monkeypatch, tmp_path):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    monkeypatch.setenv(cost_cache.SWITCH_VARIABLE, "off")
    model = fresh_model()
    policy.remember_policy(model, taught_policy(), kind="k")
    assert not (tmp_path / "policies").exists()


def test_no_home_folder_means_nothing_kept_and_no_error(clock, monkeypatch):
    """Path.home() raises RuntimeError where the environment names no home folder: the cache is skipped."""
    import refdecode.models

    def nowhere():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(refdecode.models, "cache_dir", nowhere)
    model = fresh_model()
    table = calibrate_costs(model, prefilled(model), 5, widths=calibration_widths(8), rounds=1)
    assert set(table) == set(calibration_widths(8))
    policy.remember_policy(model, taught_policy(), kind="k")
    new_process(model)
    policy._LAST_POLICIES.pop(model)
    assert policy.warm_policy(model, 128, kind="k").acceptance.rates() == policy.DraftPolicy().acceptance.rates()
