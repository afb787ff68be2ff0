"""The benchmark runner and report on a tiny random Llama: the runner end to end on synthetic requests, the oracle
drafter being exact, request export/import, and the files the report writes. No timing assertions."""

import json

import pytest
import torch

import refdecode
from refdecode.bench import cli, report, runner
from refdecode.bench.runner import BenchConfig, OracleDrafter
from refdecode.bench.suffix import suffix_available
from refdecode.bench.workloads import Request
from refdecode.policy import ForwardCostModel


class WordTokenizer:
    """Just enough tokenizer: one id per word (3 + a stable hash), a chat template that joins the turns."""

    def __init__(self, vocab_size=96):
        self.vocab_size = vocab_size

    def __len__(self):
        return self.vocab_size

    def encode(self, text, add_special_tokens=True):
        ids = [3 + sum(map(ord, w)) % (self.vocab_size - 3) for w in text.split()]
        return ([0] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        ids = [0]
        for m in messages:
            ids += [2] + self.encode(m["content"], add_special_tokens=False)
        return {"input_ids": ids + ([2] if add_generation_prompt else [])}


TEXT = "the quick brown fox jumps over the lazy dog while a red cat sleeps on the warm mat near the door " * 3


def fake_loader(name, *, n, seed, tokenizer):
    """Two synthetic requests per call: a completion with a reference, a chat with its answer in the prompt."""
    return [
        Request(
            id=f"{name}/0", workload=name, messages=None, prompt=TEXT[:60], chat=False, references=(("doc", TEXT),)
        ),
        Request(id=f"{name}/1", workload=name, messages=[{"role": "user", "content": TEXT}], prompt=None, chat=True),
    ][:n]


def small_config(**kw):
    defaults = dict(
        workloads=("code-edit-ref",), n=2, max_new_tokens=10, cost_reps=1, cost_context=16, cost_max_width=4
    )
    return BenchConfig(**{**defaults, **kw})


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1)
    return out[0, len(prompt) :].tolist()


def test_oracle_drafter_output_equals_greedy_and_is_accepted(tiny_llama):
    prompt = [5, 9, 11, 5, 9, 11, 20, 30, 40, 50]
    greedy = hf_greedy(tiny_llama, prompt, 24)
    out = refdecode.generate(tiny_llama, None, prompt, max_new_tokens=24, drafter=OracleDrafter(prompt, greedy))
    assert out.token_ids == greedy  # with the calibrated policy, which may not draft at all on a noisy CPU
    flat = refdecode.DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0}))  # wide forwards as cheap as narrow
    out = refdecode.generate(
        tiny_llama, None, prompt, max_new_tokens=24, drafter=OracleDrafter(prompt, greedy), policy=flat
    )
    assert out.token_ids == greedy
    assert out.stats.drafted_tokens > 0 and out.stats.accepted_tokens == out.stats.drafted_tokens


def test_oracle_drafts_nothing_after_a_divergence():
    oracle = OracleDrafter([1, 2], [3, 4, 5])
    assert oracle.propose([1, 2, 3], 5).tokens == [4, 5]
    assert oracle.propose([1, 2, 9], 5) is None
    assert oracle.propose([1, 2, 3, 4, 5], 5) is None


def test_first_mismatch_counts_length_differences():
    assert runner.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert runner.first_mismatch([1, 2, 3], [1, 7, 3]) == 1
    assert runner.first_mismatch([1, 2], [1, 2, 3]) == 2


def test_prepare_renders_chat_and_raw_prompts_and_references():
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 2, 0, tok, loader=fake_loader)
    assert reqs[0].prompt_ids == tok.encode(TEXT[:60]) and reqs[0].references == [("doc", tok.encode(TEXT, False))]
    assert (
        reqs[1].prompt_ids
        == tok.apply_chat_template(
            fake_loader("x", n=2, seed=0, tokenizer=tok)[1].messages, add_generation_prompt=True
        )["input_ids"]
    )
    assert reqs[1].references == []


def test_export_and_load_requests_round_trip(tmp_path):
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["rag"], 2, 0, tok, loader=fake_loader)
    path = tmp_path / "requests.json"
    runner.export_requests(path, reqs, tokenizer=tok, meta={"model": "tiny", "seed": 0, "n": 2})
    back, meta = runner.load_requests(path, tokenizer=tok)
    assert back == reqs and meta["model"] == "tiny"
    with pytest.raises(ValueError, match="another tokenizer"):
        runner.load_requests(path, tokenizer=WordTokenizer(vocab_size=95))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a refdecode requests file"):
        runner.load_requests(tmp_path / "other.json")


def test_config_is_validated_and_greedy_always_runs():
    assert small_config(methods=("refdecode",)).methods == ("greedy", "refdecode")
    assert small_config(methods=("refdecode-chain", "refdecode")).methods == ("greedy", "refdecode", "refdecode-chain")
    assert small_config(sampling=True).all_methods[-3:] == runner.SAMPLING_METHODS
    assert small_config().methods == runner.DEFAULT_METHODS  # the suffix methods are opt-in: an optional extra
    assert not set(runner.SUFFIX_METHODS) & set(cli._config(cli.build_parser().parse_args([])).methods)
    for bad in (dict(workloads=("nope",)), dict(methods=("beam",)), dict(n=0), dict(device="tpu")):
        with pytest.raises(ValueError):
            small_config(**bad)


def test_quick_fills_the_defaults_it_was_not_given():
    cfg = cli._config(cli.build_parser().parse_args(["--quick", "--n", "3", "--workloads", "rag,chat"]))
    assert (cfg.n, cfg.max_new_tokens, cfg.workloads) == (3, 32, ("rag", "chat"))
    cfg = cli._config(cli.build_parser().parse_args([]))
    assert (cfg.n, cfg.max_new_tokens) == (cli.DEFAULTS["n"], 128)


@pytest.mark.parametrize("stopped", [False, True])
def test_cli_keeps_every_record_as_it_is_measured(tmp_path, monkeypatch, capsys, stopped):
    """A long run writes each timed record to records.partial.jsonl as soon as it is measured: stopped early
    (Ctrl-C) it keeps them and says where, exit 130; finished, results.json holds them and the partial file goes."""
    from refdecode.bench import report

    def fake_run(config, *, log, on_record):
        for i in range(2):
            on_record({"method": "greedy", "request_id": f"r{i}"})
        if stopped:
            raise KeyboardInterrupt
        return {"records": []}

    monkeypatch.setattr(runner, "run_benchmark", fake_run)
    monkeypatch.setattr(report, "write_report", lambda results, out, plots: {})
    monkeypatch.setattr(report, "format_report", lambda results, summary: "")
    out = tmp_path / "out"
    code = cli.main(["--n", "1", "--out", str(out)])
    partial = out / cli.PARTIAL_RECORDS
    if stopped:
        assert code == 130 and "the 2 records measured so far" in capsys.readouterr().err
        assert [json.loads(line)["request_id"] for line in partial.read_text().splitlines()] == ["r0", "r1"]
    else:
        assert code == 0 and not partial.exists()


def test_runner_end_to_end_and_report_files(tiny_llama, tmp_path):
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 2, 0, tok, loader=fake_loader)
    lines = []
    results = runner.run_benchmark(
        small_config(sampling=True), model=tiny_llama, tokenizer=tok, requests=reqs, log=lines.append
    )
    methods = list(runner.DEFAULT_METHODS + runner.SAMPLING_METHODS)
    # interleaved per prompt: every method on a prompt before the next prompt, greedy first, the others A B B A
    rest = methods[1:]
    expected = [(reqs[0].id, m) for m in ["greedy", *rest]] + [(reqs[1].id, m) for m in ["greedy", *rest[::-1]]]
    assert methods[0] == "greedy" and [(r["request_id"], r["method"]) for r in results["records"]] == expected
    for r in results["records"]:
        if r["method"] in ("pld", "refdecode", "refdecode-chain", "oracle"):
            assert r["matches_greedy"], (r["request_id"], r["method"], r["first_mismatch"])
        assert r["new_tokens"] == len(r["token_ids"]) >= 1
        if r["method"] in runner.REFDECODE_METHODS:  # the tree statistics of GenerationStats
            assert len(r["tree_sizes"]) == r["steps"] and isinstance(r["accepted_sources"], dict)
    assert results["forward_cost"]["widths"] == [1, 2, 3, 4]
    assert results["forward_cost"]["relative"][0] == 1.0
    # the tiny CPU model is routable: widths 2..4 are also timed with refdecode's CPU kernels
    assert results["forward_cost"]["routed_widths"] == [2, 3, 4]
    assert len(results["forward_cost"]["routed_relative"]) == 3
    assert all(r > 0 for r in results["forward_cost"]["routed_relative"])

    summary = report.write_report(results, tmp_path / "out")
    block = summary["workloads"]["code-edit-ref"]
    assert block["n"] == 2 and set(block["methods"]) == set(methods)
    assert {"refdecode/greedy", "refdecode/pld", "oracle/greedy", "refdecode-sample/hf-sample"} <= set(block["ratios"])
    assert {"refdecode/refdecode-chain", "refdecode-chain/greedy", "refdecode-sample/refdecode-chain-sample"} <= set(
        block["ratios"]
    )
    assert block["methods"]["refdecode"]["mismatches"] == block["methods"]["refdecode-chain"]["mismatches"] == 0
    for m in ("refdecode", "refdecode-chain"):
        assert block["methods"][m]["mean_tree_size"] is not None and "oracle_step_fraction" in block["methods"][m]
    for name in ("results.json", "table.md", "speedup.png", "accept_lengths.png", "forward_cost.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved) == {"meta", "forward_cost", "draft_forward_cost", "requests", "records", "summary"}
    assert saved["draft_forward_cost"] is None  # no draft model in this run
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| code-edit-ref | 2 |" in table and "Sampling" in table
    assert "| code-edit-ref | refdecode chain |" in table and "| code-edit-ref | refdecode chain sampling |" in table
    assert "refdecode / refdecode chain: tok/s, per step" in table  # the head-to-head table


@pytest.mark.skipif(not suffix_available(), reason="arctic-inference is not installed (`make suffix-setup`)")
def test_suffix_methods_run_in_the_benchmark_and_the_report(tiny_llama, tmp_path):
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 1, 0, tok, loader=fake_loader)
    config = small_config(n=1, methods=("refdecode", "suffix", "suffix-tree"))
    results = runner.run_benchmark(config, model=tiny_llama, tokenizer=tok, requests=reqs, log=lambda line: None)
    assert [r["method"] for r in results["records"]] == ["greedy", "refdecode", "suffix", "suffix-tree"]
    for r in results["records"][1:]:
        assert r["matches_greedy"], (r["method"], r["first_mismatch"])
        assert len(r["tree_sizes"]) == r["steps"]
    summary = report.write_report(results, tmp_path / "out", plots=False)
    block = summary["workloads"]["code-edit-ref"]
    assert {"suffix/greedy", "suffix-tree/greedy", "refdecode/suffix-tree", "refdecode/suffix"} <= set(block["ratios"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| code-edit-ref | SuffixDecoding tree |" in table and "refdecode / SuffixDecoding tree" in table


def fake_record(request_id, category, method, tps, matches=True, steps=5):
    rec = {
        "request_id": request_id,
        "workload": "spec-bench",
        "category": category,
        "method": method,
        "new_tokens": 11,
        "first_tokens": 1,
        "decode_tokens": 10,
        "decode_seconds": 10 / tps,
        "prefill_seconds": 0.1,
        "e2e_seconds": 0.1 + 10 / tps,
        "tokens_per_second": tps,
        "steps": steps,
        "accept_lengths": [10 // steps] * steps,
        "token_ids": [0] * 11,
    }
    if method != "greedy":
        rec.update(matches_greedy=matches, first_mismatch=None if matches else 3)
    return rec


def test_spec_bench_summary_uses_the_leaderboard_layout_and_reports_mismatches():
    records = []
    for i, cat in enumerate(("mt_bench", "summarization", "rag")):
        records += [
            fake_record(f"q{i}", cat, "greedy", 10.0),
            fake_record(f"q{i}", cat, "pld", 15.0),
            fake_record(f"q{i}", cat, "refdecode", 20.0, matches=cat != "rag"),
            fake_record(f"q{i}", cat, "oracle", 30.0),
        ]
    results = {
        "records": records,
        "meta": {
            "methods": list(runner.METHODS),
            "notes": [],
            "config": {"model": "m", "max_new_tokens": 10, "seed": 0},
            "machine": {
                "gpu": None,
                "cpu": "cpu",
                "device": "cpu",
                "torch_threads": 1,
                "torch": "t",
                "transformers": "t",
                "refdecode": "r",
                "dtype": "float32",
            },
        },
        "forward_cost": {"context_tokens": 8, "widths": [1, 2], "seconds": [1.0, 1.5], "relative": [1.0, 1.5]},
    }
    summary = report.summarize(results)
    assert list(summary["spec_bench"]) == ["mt_bench", "summarization", "rag", "overall"]
    overall = summary["spec_bench"]["overall"]
    assert overall["ratios"]["refdecode/greedy"]["total"] == pytest.approx(2.0)
    assert overall["oracle_fraction"] == pytest.approx(0.5)
    assert overall["methods"]["refdecode"]["mismatched"] == [{"request_id": "q2", "first_mismatch": 3}]
    text = report.format_report(results, summary)
    assert "| summarization | 1 | 1.50x | 2.00x | 3.00x | 2.00 | 2.66x |" in text
    assert "refdecode: 1/3 differ (@3)" in text  # the main table has a spec-bench row


def test_tokens_per_step_tree_sizes_and_the_oracles_gain_per_method():
    records = []
    for i in range(2):
        records += [
            fake_record(f"q{i}", "", "greedy", 10.0, steps=10),
            fake_record(f"q{i}", "", "refdecode", 20.0, steps=4),  # 2.5 tokens per step
            fake_record(f"q{i}", "", "refdecode-chain", 15.0, steps=5),  # 2
            fake_record(f"q{i}", "", "oracle", 40.0, steps=2),  # 5
        ]
    for r in records:
        r["workload"] = "rag"
        if r["method"] == "refdecode":
            r.update(drafted_tokens=12, tree_sizes=[3] * 4, accepted_sources={"context": 4, "doc": 2})
        elif r["method"] == "refdecode-chain":
            r.update(drafted_tokens=10)  # no tree_sizes: drafted tokens per step
    results = {"records": records, "meta": {"methods": ["greedy", "refdecode", "refdecode-chain", "oracle"]}}
    block = report.summarize(results)["workloads"]["rag"]
    tree, chain = block["methods"]["refdecode"], block["methods"]["refdecode-chain"]
    assert (tree["mean_accepted"], chain["mean_accepted"]) == (2.5, 2.0)
    assert (tree["mean_tree_size"], chain["mean_tree_size"]) == (3.0, 2.0)
    assert tree["accepted_sources"] == {"context": 8, "doc": 4}
    assert tree["oracle_step_fraction"] == pytest.approx(1.5 / 4) and chain["oracle_step_fraction"] == 0.25
    assert block["ratios"]["refdecode/refdecode-chain"]["total"] == pytest.approx(20 / 15)
    assert block["ratios"]["refdecode/refdecode-chain"]["per_step"] == pytest.approx(1.25)
    rows = report.methods_table({"rag": block})
    assert "| rag | refdecode | 20.0 | 2.00x (med 2.00x) | 2.50 | 3.0 | 38% | context 67%, doc 33% |" in rows
    assert "| rag | refdecode chain | 15.0 | 1.50x (med 1.50x) | 2.00 | 2.0 | 25% | - |" in rows
    assert report.comparisons_table({"rag": block})[2] == "| rag | 1.33x, 1.25x |"


def test_where_a_steps_time_goes_per_method():
    """Records that time the target's forwards give forward and overhead milliseconds per step; records without
    them (transformers' methods, older results) give no row."""
    records = [fake_record("q0", "", "greedy", 10.0, steps=10), fake_record("q0", "", "refdecode", 20.0, steps=4)]
    for r in records:
        r["workload"] = "rag"
    records[1].update(decode_seconds=2.0, forward_seconds=1.5, policy_seconds=0.1, draft_seconds=0.2)
    block = report.summarize({"records": records, "meta": {"methods": ["greedy", "refdecode"]}})["workloads"]["rag"]
    tree = block["methods"]["refdecode"]
    assert tree["forward_ms_per_step"] == pytest.approx(375.0) and tree["overhead_ms_per_step"] == pytest.approx(125.0)
    assert tree["policy_ms_per_step"] == pytest.approx(25.0) and tree["overhead_share"] == pytest.approx(0.25)
    assert "forward_ms_per_step" not in block["methods"]["greedy"]
    assert report.overhead_table({"rag": block})[2:] == ["| rag | refdecode | 375.0 | 125.00 | 50.00 | 25.00 | 25.0% |"]
    assert report.overhead_table({"rag": {"methods": {"greedy": block["methods"]["greedy"]}}}) == []


def test_model_drafter_rows_run_alone_and_with_references_and_reach_the_report(tiny_llama, tmp_path):
    """--drafters X adds drafter:X (the model alone) and refdecode+X (in the references' tree): both greedy, both
    checked against greedy token for token, both set against greedy, prompt lookup and the references alone."""
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 1, 0, tok, loader=fake_loader)
    config = small_config(n=1, methods=("pld", "refdecode"), drafters=("self:layers=1",))
    results = runner.run_benchmark(config, model=tiny_llama, tokenizer=tok, requests=reqs, log=lambda line: None)
    methods = ["greedy", "pld", "refdecode", "drafter:self:layers=1", "refdecode+self:layers=1"]
    assert [r["method"] for r in results["records"]] == methods
    for r in results["records"][1:]:
        assert r["matches_greedy"], (r["method"], r["first_mismatch"])
        assert r["method"] == "pld" or r["draft_seconds"] >= 0.0
    summary = report.write_report(results, tmp_path / "out", plots=False)
    block = summary["workloads"]["code-edit-ref"]
    for m in methods[3:]:
        assert {f"{m}/greedy", f"{m}/pld", f"{m}/refdecode"} <= set(block["ratios"])
        assert block["methods"][m]["mismatches"] == 0 and block["methods"][m]["draft_ms_per_step"] is not None
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Model drafters" in table and "| code-edit-ref | refdecode+self:layers=1 |" in table


def test_recycle_rows_keep_one_table_per_method_over_the_timed_requests(tiny_llama, monkeypatch):
    """self:recycle learns across calls. The benchmark gives each recycle row a table of its own, grown over the
    timed requests in order; the warm-up drafts from a table it throws away, so no request drafts from an earlier
    run of itself (the same prompt, by the warm-up or by another method)."""
    import refdecode.drafters

    seen: list = []  # (method's model drafter table, rows recorded in it before the run)
    real_init = refdecode.drafters.RecycleDrafter.__init__

    def spy(self, table=None, **kwargs):
        real_init(self, table, **kwargs)
        seen.append((self.table, self.table.rows))

    monkeypatch.setattr(refdecode.drafters.RecycleDrafter, "__init__", spy)
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 2, 0, tok, loader=fake_loader)
    config = small_config(n=2, methods=("refdecode",), drafters=("self:recycle",))
    results = runner.run_benchmark(config, model=tiny_llama, tokenizer=tok, requests=reqs, log=lambda line: None)
    methods = ["greedy", "refdecode", "drafter:self:recycle", "refdecode+self:recycle"]
    assert [r["method"] for r in results["records"]] == methods + ["greedy", *methods[:0:-1]]  # A B B A
    assert all(r["matches_greedy"] for r in results["records"] if r["method"] != "greedy")
    assert len(seen) == 6  # two rows: a warm-up and two timed requests each
    warm_alone, warm_refs, alone_1, refs_1, refs_2, alone_2 = seen
    tables = [t for t, _ in seen]
    assert len({id(t) for t in tables}) == 4  # the warm-ups' own, and one per row for the timed requests
    assert alone_2[0] is alone_1[0] and refs_2[0] is refs_1[0] and alone_1[0] is not refs_1[0]
    assert [rows for _, rows in (warm_alone, warm_refs, alone_1, refs_1)] == [0, 0, 0, 0]  # each starts empty
    assert alone_2[1] > 0 and refs_2[1] > 0  # and the second request drafts from what the first recorded


def test_draft_model_adds_assisted_generation_and_the_tree_with_it(tiny_llama, tmp_path, monkeypatch):
    """--draft-model NAME loads the draft model once (with the target's dtype and device), times its forward-cost
    curve, and adds transformers' assisted generation with it and refdecode's tree with it beside the references:
    both greedy, both checked against greedy token for token, refdecode+NAME also set against assisted."""
    from stats_helpers import tiny_llama as make_llama

    draft = make_llama(vocab_size=96, seed=5, layers=1)
    draft.refdecode_name = "tiny-draft"
    loads: list = []

    def fake_load_model(name, *, dtype, device):
        loads.append((name, dtype, device))
        return draft, None

    monkeypatch.setattr(refdecode, "load_model", fake_load_model)
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 1, 0, tok, loader=fake_loader)
    config = small_config(n=1, methods=("refdecode",), draft_model="tiny-draft")
    results = runner.run_benchmark(config, model=tiny_llama, tokenizer=tok, requests=reqs, log=lambda line: None)
    assert loads == [("tiny-draft", "float32", "cpu")]
    methods = ["greedy", "refdecode", "assisted", "refdecode+tiny-draft"]
    assert [r["method"] for r in results["records"]] == methods
    for r in results["records"][1:]:
        assert r["matches_greedy"], (r["method"], r["first_mismatch"])
    assert results["draft_forward_cost"]["widths"] == [1, 2, 3, 4]
    summary = report.write_report(results, tmp_path / "out", plots=False)
    block = summary["workloads"]["code-edit-ref"]
    assert {"assisted/greedy", "refdecode+tiny-draft/assisted", "refdecode+tiny-draft/greedy"} <= set(block["ratios"])
    assert block["methods"]["assisted"]["mismatches"] == 0


def test_shared_prefill_serves_only_the_primed_prompt_and_changes_no_output(tiny_llama):
    from refdecode.bench.prefill import SharedPrefill

    prompt, other = [5, 9, 17, 33, 9, 17, 40, 41, 5, 9], [7, 8, 9, 10, 11, 12]
    plain = {p[0]: hf_greedy(tiny_llama, p, 12) for p in (prompt, other)}
    tree = refdecode.generate(tiny_llama, None, prompt, max_new_tokens=12).token_ids
    with pytest.raises(RuntimeError, match="needs the context"):
        SharedPrefill(tiny_llama).prime(prompt)
    with SharedPrefill(tiny_llama) as shared:
        first = shared.prime(prompt)
        assert first >= 0 and shared.hits == 0
        assert hf_greedy(tiny_llama, prompt, 12) == plain[5] and shared.hits == 1
        assert refdecode.generate(tiny_llama, None, prompt, max_new_tokens=12).token_ids == tree
        assert shared.hits == 2
        assert hf_greedy(tiny_llama, other, 12) == plain[7] and shared.hits == 2  # another prompt: a real forward
        full = tiny_llama(input_ids=torch.tensor([prompt])).logits  # every row asked for: a real forward
        assert full.shape[1] == len(prompt) and shared.hits == 2
        assert shared.prime(prompt) == first and shared.hits == 0  # primed already: the kept copy, no new forward
        assert hf_greedy(tiny_llama, prompt, 12) == plain[5] and shared.hits == 1
    assert "forward" not in vars(tiny_llama)  # the class's forward again


def test_benchmark_with_a_shared_prefill_gives_the_same_outputs(tiny_llama):
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 2, 0, tok, loader=fake_loader)
    methods = ("pld", "refdecode", "refdecode-chain", "oracle")
    streamed: list = []
    runs = [
        runner.run_benchmark(
            small_config(methods=methods, share_prefill=shared),
            model=tiny_llama,
            tokenizer=tok,
            requests=reqs,
            log=lambda line: None,
            on_record=streamed.append if shared else None,
        )
        for shared in (False, True)
    ]
    assert streamed == runs[1]["records"]  # every timed record, in order, as it was measured
    outputs = [{(r["request_id"], r["method"]): r["token_ids"] for r in run["records"]} for run in runs]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2 * 5
    assert all(r["matches_greedy"] for r in runs[1]["records"] if r["method"] != "greedy")
    assert all(q["shared_prefill_seconds"] > 0 for q in runs[1]["requests"])
    assert "shared_prefill_seconds" not in runs[0]["requests"][0]
    assert any("prefill shared" in n for n in runs[1]["meta"]["notes"])
    assert "forward" not in vars(tiny_llama)


def test_a_self_drafter_is_not_a_draft_model():
    with pytest.raises(ValueError, match="draft_model must be a model"):
        small_config(draft_model="self:recycle")


def test_unknown_model_drafters_are_refused_up_front():
    with pytest.raises(ValueError, match="self:int8, self:layers=N, self:heads"):
        small_config(drafters=("self:int4",))


@pytest.mark.parametrize(
    ("method", "label"),
    [
        ("refdecode-hf-kernels", "refdecode, transformers kernels"),
        ("refdecode-no-guard", "refdecode without the tie guard"),
    ],
)
def test_variant_rows_are_checked_and_set_against_refdecode(tiny_llama, tmp_path, monkeypatch, method, label):
    """Rows that are refdecode's tree with one thing changed, checked against greedy and set head to head against
    refdecode, neither in the default methods: refdecode-hf-kernels runs transformers' kernels for every forward
    (what the routed CPU kernels add; the switch does not leak), refdecode-no-guard passes tie_margin=0 (what the
    greedy tie guard costs; refdecode keeps generate's default margin, measured on the model)."""
    import os

    from refdecode import kernels

    margins: list = []
    real_generate = refdecode.generate

    def spy(*args, **kwargs):
        margins.append(kwargs.get("tie_margin", "default"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(refdecode, "generate", spy)
    tok = WordTokenizer()
    reqs = runner.prepare_requests(["code-edit-ref"], 1, 0, tok, loader=fake_loader)
    config = small_config(n=1, methods=("refdecode", method))
    assert method not in runner.DEFAULT_METHODS
    results = runner.run_benchmark(config, model=tiny_llama, tokenizer=tok, requests=reqs, log=lambda line: None)
    assert [r["method"] for r in results["records"]] == ["greedy", "refdecode", method]
    assert all(r["matches_greedy"] for r in results["records"] if r["method"] != "greedy")
    assert kernels.SWITCH_VARIABLE not in os.environ
    no_guard = [0.0, 0.0] if method == "refdecode-no-guard" else ["default", "default"]
    assert margins == ["default", *no_guard[:1], "default", *no_guard[1:]]  # warm-up, then the timed request
    summary = report.write_report(results, tmp_path / "out", plots=False)
    assert f"refdecode/{method}" in summary["workloads"]["code-edit-ref"]["ratios"]
    assert label in (tmp_path / "out" / "table.md").read_text()
