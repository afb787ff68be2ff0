"""The `refdecode` command line: clear one-line errors with exit status 2, and a real generation with --json."""

import json

import pytest

from refdecode.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found"),
        (["generate", "--prompt", "   "], "the prompt is empty"),
        (["generate", "--prompt", "hi", "--ref", "/nonexistent/ref.txt"], "reference file not found"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "hi", "--model", "no-such-model-xyz"], "known names: smollm2-135m"),
        (["generate", "--prompt", "hi", "--index", "/nonexistent/index"], "index directory not found"),
        (["generate", "--prompt", "hi", "--rerank", "10"], "--rerank N needs"),
    ],
)
def test_errors_are_one_line_without_traceback(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_non_utf8_and_empty_files(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "generate", "--prompt-file", str(bad))
    assert code == 2 and "not UTF-8" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--ref", str(bad))
    assert code == 2 and "not UTF-8" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--ref", str(empty))
    assert code == 2 and "empty" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--ref", str(tmp_path))
    assert code == 2 and "directory" in err


@pytest.mark.slow
@pytest.mark.real_model
def test_generate_json_with_reference_longer_than_context(capsys, tmp_path, smollm2):
    ref = tmp_path / "long.txt"
    ref.write_text("The quick brown fox jumps over the lazy dog. " * 900)  # ~10k tokens > 8192 context
    code, out, err = run(
        capsys,
        "generate",
        "--prompt",
        "Repeat: The quick brown fox",
        "--chat",
        "--ref",
        str(ref),
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert code == 0, err
    assert "only copied from" in err
    record = json.loads(out)
    for key in ("text", "token_ids", "steps", "drafted_tokens", "accepted_tokens", "seconds", "tokens_per_second"):
        assert key in record
    assert len(record["token_ids"]) <= 12


@pytest.mark.slow
@pytest.mark.real_model
def test_stream_prints_the_text(capsys, smollm2):
    code, out, err = run(capsys, "generate", "--prompt", "Say hello.", "--chat", "--max-new-tokens", "8", "--stream")
    assert code == 0, err
    assert out.strip()


# ---------------------------------------------------------------------------------------------------------------
# --memory DIR, --no-tree and the tree line of --stats, on a tiny saved model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary, saved with its tokenizer, so the CLI loads it by path."""
    import torch
    from stats_helpers import tiny_llama

    tokenizer = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tokenizer), seed=3, max_positions=256, eos_token_id=None)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # words rather than ties
    folder = tmp_path_factory.mktemp("tiny-cli-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def flat_costs(monkeypatch):
    """Wide forwards cost as much as narrow ones: no calibration forwards per run, drafting independent of timing."""
    import refdecode.decoding

    monkeypatch.setattr(refdecode.decoding, "calibrate_costs", lambda *args, **kwargs: {1: 1.0, 64: 1.0})


def _generate_with_memory(capsys, model_dir, memory_dir, *extra):
    prompt = "The old lighthouse keeper wrote in his log every night that"
    return run(
        capsys, "generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "24", "--json",
        "--memory", str(memory_dir), *extra,
    )  # fmt: skip


def test_memory_round_trip(capsys, tmp_path, tiny_model_dir, flat_costs):
    from refdecode.memory import OutputMemory

    memory_dir = tmp_path / "memory"
    code, out, err = _generate_with_memory(capsys, tiny_model_dir, memory_dir)
    assert code == 0, err
    first = json.loads(out)
    assert OutputMemory.load(memory_dir).outputs() == [first["token_ids"]]
    code, out, err = _generate_with_memory(capsys, tiny_model_dir, memory_dir, "--stats")
    assert code == 0, err
    second = json.loads(out)
    assert second["token_ids"] == first["token_ids"]  # the same greedy output, drafted from the first one
    assert second["accepted_tokens"] > first["accepted_tokens"]
    assert "refdecode: tree:" in err and "nodes per step" in err and "by source" in err
    assert "ms in the target's forward" in err and "drafting" in err and "policy" in err
    assert second["forward_seconds"] > 0 and second["overhead_seconds"] >= second["draft_seconds"]
    assert len(OutputMemory.load(memory_dir)) == 2
    code, out, err = _generate_with_memory(capsys, tiny_model_dir, memory_dir, "--no-tree")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == first["token_ids"]


def test_memory_refuses_a_folder_that_is_not_one(capsys, tmp_path, tiny_model_dir, flat_costs):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    code, _, err = _generate_with_memory(capsys, tiny_model_dir, mine)
    assert code == 2 and "not a refdecode output memory" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    file = tmp_path / "file.txt"
    file.write_text("x")
    code, _, err = _generate_with_memory(capsys, tiny_model_dir, file)
    assert code == 2 and "not a folder" in err and file.read_text() == "x"


def test_memory_refuses_a_corrupt_memory(capsys, tmp_path, tiny_model_dir, flat_costs):
    from refdecode.memory import OutputMemory

    memory = OutputMemory()
    memory.record([1, 2, 3, 4])
    memory.save(tmp_path / "memory")
    manifest = json.loads((tmp_path / "memory" / "manifest.json").read_text())
    tokens = tmp_path / "memory" / manifest["generation"] / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    before = tokens.read_bytes()
    code, _, err = _generate_with_memory(capsys, tiny_model_dir, tmp_path / "memory")
    assert code == 2 and "truncated" in err and "Traceback" not in err and err.count("\n") == 1
    assert tokens.read_bytes() == before


def test_memory_save_failure_is_one_line_after_the_output(capsys, tmp_path, tiny_model_dir, flat_costs, monkeypatch):
    from refdecode.memory import OutputMemory

    def refuse(self, path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(OutputMemory, "save", refuse)
    code, out, err = _generate_with_memory(capsys, tiny_model_dir, tmp_path / "memory")
    assert code == 2 and json.loads(out)["token_ids"]
    ours = [line for line in err.splitlines() if line.startswith("refdecode:")]  # not transformers' progress bars
    assert len(ours) == 1 and "could not save the output memory" in ours[0] and "Permission denied" in ours[0]
    assert "Traceback" not in err
