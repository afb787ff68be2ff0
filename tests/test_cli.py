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


@pytest.mark.real_model
def test_stream_prints_the_text(capsys, smollm2):
    code, out, err = run(capsys, "generate", "--prompt", "Say hello.", "--chat", "--max-new-tokens", "8", "--stream")
    assert code == 0, err
    assert out.strip()
