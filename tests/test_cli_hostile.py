"""`refdecode generate` on hostile input: one line on stderr, a non-zero exit, never a traceback."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import refdecode
from refdecode.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code, err, message, status=2):
    assert code == status, err
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("device", ["cuda:99", "banana"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_unavailable_device(capsys, device):
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--device", device)
    assert_one_line(code, err, "device")
    assert "not available" in err or "unknown device" in err


def test_prompt_and_stop_with_undecodable_bytes(capsys):
    """Python turns argv bytes that are not UTF-8 into lone surrogates (PEP 383); the tokenizer raised TypeError."""
    code, _, err = run(capsys, "generate", "--prompt", "caf\udce9")
    assert_one_line(code, err, "--prompt is not valid UTF-8")
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--stop", "\udcff")
    assert_one_line(code, err, "--stop is not valid UTF-8")


@pytest.mark.slow
def test_undecodable_argv_bytes_in_a_real_process(tmp_path):
    """The same through a real command line: the bytes reach the process as the OS gives them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", LC_ALL="C.UTF-8")
    result = subprocess.run(
        [sys.executable, "-m", "refdecode.cli", "generate", "--prompt", b"caf\xe9 \xff"],
        capture_output=True,
        env=env,
        timeout=300,
    )
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "not valid UTF-8" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('["not", "an", "object"]', "holds a list, not a JSON object"),
        ("{not json", "not readable JSON"),
        (b"\xff\xfe\x00", "not readable JSON"),
        ("42", "holds a int"),
    ],
)
def test_model_folder_with_a_bad_config(capsys, tmp_path, content, message):
    config = tmp_path / "config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--model", str(tmp_path))
    assert_one_line(code, err, message)
    with pytest.raises(refdecode.ModelNotFoundError, match=message):
        refdecode.load_model(str(tmp_path))


def test_unknown_model_and_bad_reference_files(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--model", "no/such-model-anywhere")
    assert_one_line(code, err, "unknown model")
    missing, empty, latin1 = tmp_path / "missing.txt", tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    for path, message in (
        (missing, "reference file not found"),
        (empty, "reference file is empty"),
        (latin1, "not UTF-8"),
    ):
        code, _, err = run(capsys, "generate", "--prompt", "hi", "--ref", str(path))
        assert_one_line(code, err, message)


def test_unexpected_exception_is_one_line_exit_1(capsys, monkeypatch):
    """The last resort: a bug anywhere below main is one line naming the exception type, exit status 1."""

    def broken(*args, **kwargs):
        raise KeyError("some\nmultiline detail")

    monkeypatch.setattr(refdecode, "load_model", broken)
    code, _, err = run(capsys, "generate", "--prompt", "hi")
    assert_one_line(code, err, "internal error: KeyError", status=1)


def test_non_finite_logits_are_one_line(capsys, monkeypatch):
    def overflow(*args, **kwargs):
        raise refdecode.NonFiniteLogitsError("the model returned non-finite logits at the prefill")

    model = types.SimpleNamespace(config=types.SimpleNamespace())
    monkeypatch.setattr(refdecode, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(refdecode, "ReferenceStore", lambda tokenizer: [])
    monkeypatch.setattr(refdecode, "generate", overflow)
    code, _, err = run(capsys, "generate", "--prompt", "hi")
    assert_one_line(code, err, "non-finite logits")


def test_huge_reference_file_is_refused_before_it_is_read(capsys, tmp_path, monkeypatch):
    """A reference too large for the store is refused from its size alone (a sparse file: nothing is read)."""
    from refdecode import cli

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse
    monkeypatch.setattr(cli, "_read_text", lambda *a: pytest.fail("the file was read"))
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--ref", str(huge))
    assert_one_line(code, err, "too large")
    assert "refdecode index build" in err


def test_bad_kernel_switch_is_refused_before_any_model_loads(capsys, monkeypatch):
    monkeypatch.setenv("REFDECODE_CPU_KERNELS", "fastest")
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--model", "no/such-model-anywhere")
    assert code == 2
    assert "REFDECODE_CPU_KERNELS must be 'auto' or 'transformers'" in err and "Traceback" not in err
