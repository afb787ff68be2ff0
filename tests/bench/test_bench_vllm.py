"""scripts/bench_vllm.py without engines: the tally, the ratios and the output comparison of its table."""

import pytest

from scripts import bench_vllm
from scripts.bench_vllm import Tally, parse_args, table


def result(tokens, seconds, drafted=0, accepted=0):
    counters = {"vllm:spec_decode_num_draft_tokens": drafted, "vllm:spec_decode_num_accepted_tokens": accepted}
    return {"token_ids": tokens, "seconds": seconds, "counters": counters}


def test_the_table_gives_speeds_ratios_acceptance_and_differing_outputs():
    tally = Tally()
    tally.add("one at a time", "rag", "none", result([[1, 2, 3, 4]], 2.0), [0])
    tally.add("one at a time", "rag", "ngram", result([[1, 2, 3, 4]], 1.0, drafted=8, accepted=2), [0])
    tally.add("one at a time", "rag", "refdecode", result([[1, 2, 3, 5]], 0.5, drafted=4, accepted=3), [0])
    text = table(tally, k=8)
    assert "| rag | 2.0 | 4.0 | 8.0 | 2.00x | 4.00x | 2.00x | 0.25 | 0.75 |" in text
    assert "outputs differing from no speculation: ngram 0, refdecode 1" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--n", "0"],
        ["--k", "0"],
        ["--batch", "-1"],
        ["--workloads", "summarize"],
        ["--n", "2", "--single-n", "3"],
        ["--batch-rounds", "0"],
    ],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_single_n_defaults_to_n():
    assert parse_args(["--n", "3"]).single_n == 3
    assert parse_args(["--n", "4", "--single-n", "2"]).single_n == 2


def test_in_process_engines_turn_vllms_multiprocessing_off(monkeypatch):
    from scripts.bench_vllm import engine_env

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert engine_env(in_process=True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env()
    assert parse_args(["--in-process"]).in_process and not parse_args([]).in_process


def test_a_model_never_converted_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    assert bench_vllm.main(["--model", "qwen2.5-coder-1.5b", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no converted checkpoint" in err[0] and "load_model('qwen2.5-coder-1.5b')" in err[0]
    assert not (tmp_path / "out").exists()


def test_model_and_dtype_reach_the_workers(monkeypatch, tmp_path):
    args = bench_vllm.parse_args(["--model", "qwen2.5-coder-1.5b", "--dtype", "bfloat16"])
    started = []
    monkeypatch.setattr(bench_vllm.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    bench_vllm.Engine("ngram", args, tmp_path / "engine.log")
    cmd = started[0]
    assert cmd[cmd.index("--model") + 1] == "qwen2.5-coder-1.5b" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
