"""Corpus test fixtures: one local Ray for the whole session, for the tests marked `ray`."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray of 2 CPUs (no dashboard), started once per session and shut down at its end; a Ray this process
    had already started is used and left running."""
    ray = pytest.importorskip("ray", reason="the Ray build tests need ray[data] (the test extra)")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
