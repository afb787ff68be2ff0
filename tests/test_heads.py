"""Medusa-style heads: shapes, the identity start, label alignment, training on a learnable pattern, the on-disk
format (round trip and every hostile folder), the train command's expected errors, and the ShareGPT split."""

import json
import os
import random

import pytest
import torch
from stats_helpers import tiny_llama

from refdecode import heads as H
from refdecode.bench import data, workloads
from refdecode.checked_folder import file_entry
from refdecode.cli import main
from refdecode.heads import HeadsNotFoundError, MedusaHeads, load_heads, save_heads, train_heads

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 48


class VocabTokenizer:
    """Just enough of a tokenizer for the heads' manifest: a vocabulary (its fingerprint) and an end token."""

    def __init__(self, vocab_size: int = VOCAB, prefix: str = "t"):
        self.vocab = {f"{prefix}{i}": i for i in range(vocab_size)}
        self.all_special_tokens = [f"{prefix}1"]
        self.eos_token_id = 1

    def get_vocab(self):
        return dict(self.vocab)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return VocabTokenizer()


def pattern_texts(n: int, length: int, seed: int) -> list[list[int]]:
    """Token-id texts that walk a fixed cycle over 20 tokens from a random start: the tokens after the next one
    follow from the current one, so heads can learn them."""
    cycle = random.Random(99).sample(range(2, VOCAB), 20)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.randrange(20)
        out.append([cycle[(s + i) % 20] for i in range(length)])
    return out


@pytest.fixture(scope="module")
def trained(model, tokenizer):
    heads, metrics = train_heads(
        model,
        tokenizer,
        pattern_texts(60, 24, seed=0),
        num_heads=2,
        vocab_size=32,
        max_tokens=10_000,
        minutes=10,
        progress=False,
        epochs=8,
        lr=1e-2,
        batch=128,
        heldout_every=5,
        train_output=True,
    )
    return heads, metrics


def test_forward_shapes(model):
    heads = MedusaHeads.from_model(model, torch.arange(10), num_heads=3)
    assert heads.num_heads == 3 and heads.hidden_size == 32 and heads.vocab_ids.tolist() == list(range(10))
    assert heads(torch.randn(2, 5, 32)).shape == (2, 5, 3, 10)
    assert heads(torch.randn(32)).shape == (3, 10)


def test_untrained_heads_are_the_output_layer_restricted_to_their_vocabulary(model):
    vocab_ids = torch.tensor([7, 3, 40, 0, 12])
    heads = MedusaHeads.from_model(model, vocab_ids, num_heads=2)
    hidden = torch.randn(4, 32)
    expected = model.lm_head(hidden)[:, vocab_ids]  # [4, V']
    got = heads(hidden)  # [4, 2, V']
    torch.testing.assert_close(got[:, 0], expected)
    torch.testing.assert_close(got[:, 1], expected)


def test_final_hidden_records_what_the_output_layer_reads(model):
    ids = torch.tensor([[2, 5, 9, 11]])
    with torch.no_grad(), H.final_hidden(model) as seen:
        logits = model(ids).logits
    assert len(seen) == 1 and seen[0].shape == (1, 4, 32)
    torch.testing.assert_close(model.lm_head(seen[0]), logits)


def test_bad_configuration_is_a_value_error(model, tokenizer):
    with pytest.raises(ValueError, match="num_heads"):
        MedusaHeads(32, torch.arange(4), num_heads=0)
    with pytest.raises(ValueError, match="out_weight"):
        MedusaHeads(32, torch.arange(4), out_weight=torch.zeros(5, 32))
    with pytest.raises(ValueError, match="vocab_ids"):
        MedusaHeads.from_model(model, torch.tensor([0, VOCAB]))
    with pytest.raises(ValueError, match="vocab_size"):
        train_heads(model, tokenizer, [[2, 3, 4]], vocab_size=0, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        train_heads(model, tokenizer, [], progress=False)


def test_rows_align_each_head_with_the_token_it_guesses():
    # positions 0-1 are a prompt (not generated), 2-5 one reply, 6 after it, 7-8 another reply
    example = H.Example(ids=[10, 11, 12, 13, 14, 15, 16, 17, 18], span=[-1, -1, 3, 3, 3, 3, -1, 5, 5])
    argmax = torch.tensor([20, 21, 22, 23, 24, 25, 26, 27, 28])  # argmax[t] = the base's guess for token t + 1
    cached = H.Cached(example, torch.arange(9, dtype=torch.float16).unsqueeze(1), argmax)
    vocab = torch.arange(30)
    rows = H.build_rows([cached], vocab, 30, num_heads=2)
    # rows: positions t whose next token is generated: t = 1, 2, 3, 4 (reply 3) and t = 6, 7 (reply 5)
    assert rows.hidden[:, 0].tolist() == [1, 2, 3, 4, 6, 7]
    # head 1 guesses t + 2 within the same reply; head 2 guesses t + 3
    assert rows.labels_text.tolist() == [[13, 14], [14, 15], [15, -100], [-100, -100], [18, -100], [-100, -100]]
    assert rows.target.tolist() == [[22, 23], [23, 24], [24, -1], [-1, -1], [27, -1], [-1, -1]]
    assert rows.labels_distill.tolist() == [[22, 23], [23, 24], [24, -100], [-100, -100], [27, -100], [-100, -100]]
    # tokens outside the restricted vocabulary are not trained on, but still count as targets to measure against
    small = H.build_rows([cached], torch.tensor([13, 22, 27]), 30, num_heads=1)
    assert small.labels_text[:, 0].tolist() == [0, -100, -100, -100, -100, -100]
    assert small.labels_distill[:, 0].tolist() == [1, -100, -100, -100, 2, -100]
    assert H.coverage(small, torch.tensor([13, 22, 27])) == pytest.approx(2 / 4)


def test_vocabulary_is_the_most_frequent_base_outputs():
    example = H.Example(ids=[1, 2, 3, 4, 5], span=[-1, 0, 0, 0, 0])
    cached = H.Cached(example, torch.zeros(5, 1, dtype=torch.float16), torch.tensor([7, 7, 9, 7, 9]))
    # argmax[:-1] at generated next positions: 7, 7, 9, 7 -> 7 first, then 9, then text tokens by count and id
    assert H.choose_vocab([cached], 12, 4).tolist() == [7, 9, 1, 2]
    assert H.choose_vocab([cached], 12, 100).numel() == 12


def test_replies_are_generated_up_to_their_end_token():
    assert H._reply_span([5, 6, 1, 9], 3, eos=1) == [3, 3, 3, -1]
    assert H._reply_span([5, 6], 3, eos=1) == [3, 3]


def test_training_lowers_the_loss_and_raises_agreement(trained):
    _, m = trained
    for name in ("distill", "text"):
        r = m["by_labels"][name]
        assert r["heldout_loss_after"] < r["heldout_loss_before"]
        assert r["epoch_losses"][-1] < r["epoch_losses"][0]
    assert m["labels"] in ("distill", "text")
    assert m["top1"][0] > m["untrained_top1"][0] + 0.5
    # the base's greedy continuation of the pattern is not the pattern itself: self-distillation wins here
    assert m["labels"] == "distill" and m["top1"][0] > m["by_labels"]["text"]["top1"][0]
    assert m["top1"] == m["by_labels"][m["labels"]]["top1"]
    assert m["coverage"] == pytest.approx(1.0)  # 20 pattern tokens fit in a 32-token vocabulary
    assert m["heldout_texts"] == len(pattern_texts(60, 24, 0)) // 5


def test_by_default_only_the_residual_blocks_learn(model, tokenizer):
    heads, m = train_heads(
        model, tokenizer, pattern_texts(30, 24, seed=1), num_heads=1, vocab_size=32, epochs=3, progress=False
    )
    torch.testing.assert_close(heads.out_weight, model.lm_head.weight[heads.vocab_ids], rtol=0, atol=0)
    assert heads.res_weight.abs().sum() > 0 and m["train_output"] is False
    assert m["by_labels"]["distill"]["heldout_loss_after"] < m["by_labels"]["distill"]["heldout_loss_before"]


def test_save_load_round_trip_is_bit_identical(trained, model, tokenizer, tmp_path):
    heads, metrics = trained
    save_heads(heads, tmp_path / "h", tokenizer=tokenizer, model_name="tiny", metrics=metrics, model=model)
    loaded = load_heads(tmp_path / "h", tokenizer=tokenizer, model=model)
    assert not loaded.training and loaded.num_heads == heads.num_heads
    for name, tensor in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    hidden = torch.randn(3, 32)
    assert torch.equal(loaded(hidden), heads(hidden))
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["metrics"] == json.loads(json.dumps(metrics)) and manifest["model_name"] == "tiny"
    # saving again over its own folder works and leaves files that are not its own alone
    (tmp_path / "h" / "notes.txt").write_text("mine")
    save_heads(heads, tmp_path / "h", tokenizer=tokenizer, model_name="tiny", metrics=metrics, model=model)
    assert (tmp_path / "h" / "notes.txt").read_text() == "mine"
    gen = _gen(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == sorted([gen.name, "manifest.json", "notes.txt"])
    assert [p.name for p in gen.iterdir()] == ["heads.safetensors"]
    mode = 0o666 & ~_umask()
    assert all(f.stat().st_mode & 0o777 == mode for f in (gen / "heads.safetensors", tmp_path / "h" / "manifest.json"))


def _gen(folder):
    """The generation subfolder the manifest names: where the weights are."""
    return folder / json.loads((folder / "manifest.json").read_text())["generation"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_heads_follow_the_models_dtype(trained, model, tokenizer, tmp_path):
    heads, metrics = trained
    save_heads(heads, tmp_path, tokenizer=tokenizer, model_name="tiny", metrics=metrics)
    half = tiny_llama(vocab_size=VOCAB, seed=0).to(torch.bfloat16)
    assert load_heads(tmp_path, tokenizer=tokenizer, model=half).out_weight.dtype == torch.bfloat16


def test_default_folder_is_in_the_model_cache(monkeypatch, tmp_path, model, tokenizer):
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    assert H.heads_dir("smollm2-135m") == tmp_path / "heads" / "smollm2-135m"
    assert H.heads_dir("org/name").parent == tmp_path / "heads"
    with pytest.raises(HeadsNotFoundError, match="refdecode heads train --model smollm2-135m"):
        load_heads("smollm2-135m", tokenizer=tokenizer, model=model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadsNotFoundError, match=f"--out {tmp_path / 'empty'}"):
        load_heads(tmp_path / "empty", tokenizer=tokenizer, model=model)


@pytest.fixture
def saved(trained, model, tokenizer, tmp_path):
    heads, metrics = trained
    return save_heads(heads, tmp_path / "h", tokenizer=tokenizer, model_name="tiny", metrics=metrics, model=model)


def _rewrite_manifest(folder, **changes):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_hostile_folders_are_refused_with_a_clear_message(saved, model, tokenizer, tmp_path):
    from safetensors.torch import save_file

    def refused(match, tok=tokenizer, mdl=model):
        with pytest.raises(ValueError, match=match) as err:
            load_heads(saved, tokenizer=tok, model=mdl)
        assert not isinstance(err.value, HeadsNotFoundError)

    weights = _gen(saved) / "heads.safetensors"
    good = weights.read_bytes()
    # truncated or changed weights
    weights.write_bytes(good[: len(good) // 2])
    refused(r"heads.safetensors has \d+ bytes, the manifest says \d+ \(truncated")
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    refused("heads.safetensors fails its checksum")
    weights.unlink()
    refused("heads.safetensors is missing")
    weights.write_bytes(good)
    # wrong tokenizer, wrong model
    refused("another tokenizer", tok=VocabTokenizer(prefix="u"))
    refused("size 32, this model's are 48", mdl=_wide_model())
    refused("another model", mdl=tiny_llama(vocab_size=VOCAB + 4, seed=0))
    # a manifest that is not JSON, not ours, or from a future version
    manifest = (saved / "manifest.json").read_bytes()
    (saved / "manifest.json").write_bytes(b"{not json")
    refused("manifest.json is corrupt")
    (saved / "manifest.json").write_text("[1, 2]")
    refused("not a refdecode heads manifest")
    (saved / "manifest.json").write_bytes(manifest)
    _rewrite_manifest(saved, version=99)
    refused("version 99")
    # weights whose shapes disagree with the manifest (the checksum matches: a consistent but wrong file)
    (saved / "manifest.json").write_bytes(manifest)
    tensors = {"res_weight": torch.zeros(2, 32, 32), "res_bias": torch.zeros(2, 32), "vocab_ids": torch.arange(31)}
    tensors |= {"out_weight": torch.zeros(31, 32), "out_bias": torch.zeros(31)}
    save_file(tensors, str(weights))
    _rewrite_manifest(saved, files={"heads.safetensors": file_entry(weights)})
    refused(r"'out_weight' is \[31, 32\]")
    # weights without a manifest (an interrupted first save) are not "not found"
    (saved / "manifest.json").unlink()
    refused("no manifest")


def _as_version_1(folder):
    """Rewrite a saved folder in the version 1 layout, as refdecode saved heads before checked folders: the weights
    flat beside the manifest, their size in `weights` and their checksum in `weights_sha256`."""
    manifest = json.loads((folder / "manifest.json").read_text())
    gen = folder / manifest.pop("generation")
    (gen / "heads.safetensors").rename(folder / "heads.safetensors")
    gen.rmdir()
    entry = manifest.pop("files")["heads.safetensors"]
    manifest |= {"version": 1, "weights": {"file": "heads.safetensors", "bytes": entry["bytes"]}}
    manifest["weights_sha256"] = entry["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def test_version_1_folders_load_are_checked_and_are_replaced_cleanly(trained, model, tokenizer, tmp_path):
    heads, metrics = trained
    folder = save_heads(heads, tmp_path / "h", tokenizer=tokenizer, model_name="tiny", metrics=metrics, model=model)
    _as_version_1(folder)
    loaded = load_heads(folder, tokenizer=tokenizer, model=model)
    for name, tensor in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    weights, manifest = folder / "heads.safetensors", (folder / "manifest.json").read_bytes()
    good = weights.read_bytes()
    for bad, match in ((good[:-1] + bytes([good[-1] ^ 1]), "fails its checksum"), (good[:-9], "truncated")):
        weights.write_bytes(bad)
        with pytest.raises(ValueError, match=f"heads.safetensors.*{match}"):
            load_heads(folder, tokenizer=tokenizer, model=model)
    weights.write_bytes(good)
    _rewrite_manifest(folder, weights_sha256="not a checksum")
    with pytest.raises(ValueError, match="'sha256' \\(64 hex digits\\)"):
        load_heads(folder, tokenizer=tokenizer, model=model)
    (folder / "manifest.json").write_bytes(manifest)
    # saving over a version 1 folder writes version 2 and removes the flat weights
    save_heads(heads, folder, tokenizer=tokenizer, model_name="tiny", metrics=metrics, model=model)
    assert sorted(p.name for p in folder.iterdir()) == sorted([_gen(folder).name, "manifest.json"])
    assert json.loads((folder / "manifest.json").read_text())["version"] == H.FORMAT_VERSION == 2
    assert torch.equal(load_heads(folder, tokenizer=tokenizer, model=model).out_weight, heads.out_weight)


def _wide_model():
    from stats_helpers import tiny_llama

    return tiny_llama(vocab_size=VOCAB, seed=0, hidden=48)


def test_saving_never_overwrites_a_foreign_folder(trained, tokenizer, tmp_path):
    heads, metrics = trained
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a refdecode heads manifest"):
        save_heads(heads, tmp_path, tokenizer=tokenizer, model_name="tiny", metrics=metrics)
    assert (tmp_path / "manifest.json").read_text() == '{"format": "something-else"}'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        save_heads(heads, tmp_path / "file", tokenizer=tokenizer, model_name="tiny", metrics=metrics)


# ---------------------------------------------------------------------------------------------------------------
# the command line


def _fake_sharegpt(root, n=6):
    folder = root / "sharegpt"
    folder.mkdir(parents=True)
    records = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(n)
    ]
    (folder / data.SHAREGPT_FILE).write_text(json.dumps(records))
    (folder / data.MARKER).write_text("")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--minutes", "0"], "--minutes must be positive"),
        (["--max-tokens", "10"], "--max-tokens must be at least"),
        (["--heads", "0"], "--heads must be between"),
        (["--vocab", "2"], "--vocab must be at least"),
    ],
)
def test_train_command_refuses_bad_options(args, message, capsys):
    assert main(["heads", "train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_train_command_without_data_says_make_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REFDECODE_DATA", str(tmp_path / "empty"))
    assert main(["heads", "train", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert "run `make data`" in err and err.count("\n") == 1


def test_train_command_with_an_unknown_model_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REFDECODE_DATA", str(tmp_path / "data"))
    _fake_sharegpt(tmp_path / "data")
    assert main(["heads", "train", "--model", "no-such-model", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_train_command_refuses_a_file_as_output(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["heads", "train", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the ShareGPT split: the benchmark never asks what the heads were trained on


def test_sharegpt_split_is_two_disjoint_halves():
    convs = [[{"role": "user", "content": str(i)}] for i in range(7)]
    bench, train = data.sharegpt_split(convs)
    assert bench == convs[:4] and train == convs[4:]
    assert data.sharegpt_split([]) == ([], [])


def test_chat_workload_draws_only_from_the_bench_half(monkeypatch):
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(40)]
    monkeypatch.setattr(data, "sharegpt_conversations", lambda: convs)
    requests = workloads.load_workload("chat", n=40, seed=0)
    assert len(requests) == 20
    assert {r.id for r in requests} == {f"chat/sharegpt-{i}" for i in range(20)}
