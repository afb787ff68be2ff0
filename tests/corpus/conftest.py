"""Corpus test fixtures: one local Ray for the whole test session, for the tests marked `ray`."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray of 2 CPUs on the loopback address (no dashboard, a small object store), started on first use
    and shut down at the session's end. Builds inside the session find it initialised and use it as it is."""
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
