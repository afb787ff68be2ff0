"""scripts/bench_index_build.PeakRSS: the memory figures the index-build benchmarks print."""

from __future__ import annotations

import subprocess
import sys

from scripts.bench_index_build import PeakRSS

HOLD = 200 * 2**20
CHILD = f"b = bytearray({HOLD}); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.0)"


def watch(sampler: type[PeakRSS]) -> PeakRSS:
    proc = subprocess.Popen([sys.executable, "-c", CHILD])
    rss = sampler(proc.pid, every=0.02)
    proc.wait()
    rss.stop()
    return rss


def test_peaks_cover_what_a_child_process_touched():
    rss = watch(PeakRSS)
    assert rss.peak >= HOLD and rss.peak_pss >= 0.9 * HOLD
    assert rss.samples >= rss.pss_sweeps >= 1


def test_pss_sweeps_wait_a_multiple_of_their_own_duration():
    class Rationed(PeakRSS):
        _PSS_DUTY = 10**6  # the first sweep's milliseconds become many minutes: no second sweep in this test

    rss = watch(Rationed)
    assert rss.pss_sweeps == 1 and rss.samples > 5
    assert rss.peak >= HOLD  # RSS keeps the short period
