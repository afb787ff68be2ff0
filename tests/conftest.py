"""Shared fixtures: tiny random models built from a config (no weights downloaded) and the real SmolLM2."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every test process calibrates afresh: a forward-cost table kept on disk by another test (or by the user's own
# runs) would change the policy's choices between runs. The tests of the kept tables turn it back on in a tmp dir.
os.environ["REFDECODE_COST_CACHE"] = "off"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

# Property-based tests: a fixed, modest number of examples per property in CI (`make test`), far more in
# `make fuzz` (HYPOTHESIS_PROFILE=fuzz). Deadlines are off: a forward on 2 shared cores varies too much to time.
try:
    from hypothesis import HealthCheck, settings

    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK, print_blob=True
    )
    settings.register_profile("fuzz", max_examples=1000, deadline=None, suppress_health_check=_SLOW_OK, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; the property tests import it themselves and say so
    pass


def _tiny_llama(vocab_size: int = 96, seed: int = 0):
    from stats_helpers import tiny_llama

    return tiny_llama(vocab_size=vocab_size, seed=seed)


def _tiny_gemma3(vocab_size: int = 96, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny_llama()


@pytest.fixture(scope="session")
def tiny_gemma3():
    return _tiny_gemma3()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-model tests: small matrices gain nothing from a second thread, and
    two threads spin against each other on a busy 2-core machine. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=["llama", "gemma3"])
def tiny_model(request):
    return _tiny_llama() if request.param == "llama" else _tiny_gemma3()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, loaded once for the whole run (a few seconds each time): tests only encode, decode and
    save it, never change it. Raises refdecode.ModelNotFoundError when it is not installed; tests that skip then
    take it through `request.getfixturevalue` and catch that."""
    import refdecode

    return refdecode.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2():
    try:
        import refdecode

        return refdecode.load_model("smollm2-135m")
    except refdecode.ModelNotFoundError as err:
        pytest.skip(f"SmolLM2 not installed: {err}")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, for the tests marked `ray` (tests/corpus/test_ray_build.py): 2 CPUs on
    the loopback address, no dashboard, a small object store; started on first use and shut down at the session's
    end. Builds inside the session find it initialised and use it as it is. (Here and not in tests/corpus/: a
    second conftest.py would shadow this module for `from conftest import ...`.)"""
    ray = pytest.importorskip("ray", reason="the Ray build tests need ray[data] (the test extra)")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=512 << 20,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    if started:
        ray.shutdown()
