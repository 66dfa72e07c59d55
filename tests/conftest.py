"""Suite-wide fixtures.

Every Trainer on CPU divides MFU by a measured matmul peak (titanlite.cpu_peak): seven 2048 x 2048 matmuls, a
few seconds on a shared 2-core box, and tests usually point $TITANLITE_HOME at a fresh tmp dir, so nearly every
Trainer measured again. No test but those of the measurement itself needs the real number, so the measurement
returns a fixed value for the whole session (module- and session-scoped fixtures that train included).
tests/unit/test_cpu_peak.py, and any test marked `real_cpu_peak`, get the real function back.
Subprocesses (the gloo workers, scripts run with subprocess) are not patched: they measure for real.
"""

import logging
import os

import pytest

FAKE_CPU_PEAK_FLOPS = 1e11
# modules that test the measurement and its cache themselves
REAL_PEAK_MODULES = {"test_cpu_peak"}


def pytest_configure(config):
    config.addinivalue_line("markers", "real_cpu_peak: run titanlite.cpu_peak.measure_matmul_peak for real")


def _fake_measure(dtype, *args, **kwargs):
    return FAKE_CPU_PEAK_FLOPS


@pytest.fixture(scope="session", autouse=True)
def _fixed_cpu_matmul_peak(tmp_path_factory):
    from titanlite import cpu_peak, paths

    mp = pytest.MonkeyPatch()
    real = cpu_peak.measure_matmul_peak
    # The fake number must never land in the user's real cache (~/.cache/titanlite), where later real runs would
    # read it: without $TITANLITE_HOME the peak cache (only it) goes to a throw-away folder. If the module no
    # longer looks its cache folder up through `cache_dir`, nothing is faked (slower, never wrong).
    if hasattr(cpu_peak, "cache_dir"):
        fallback = tmp_path_factory.getbasetemp() / "cpu_peak_cache"

        def peak_cache_dir():
            return paths.cache_dir() if os.environ.get("TITANLITE_HOME") else fallback

        mp.setattr(cpu_peak, "cache_dir", peak_cache_dir)
        mp.setattr(cpu_peak, "measure_matmul_peak", _fake_measure)
    yield real
    mp.undo()


@pytest.fixture(autouse=True)
def _real_cpu_peak_where_asked(request, _fixed_cpu_matmul_peak, monkeypatch):
    """Opt-out: the measurement's own tests see the real function (and may monkeypatch it themselves)."""
    module = getattr(request.node, "module", None)
    name = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
    if name in REAL_PEAK_MODULES or request.node.get_closest_marker("real_cpu_peak"):
        from titanlite import cpu_peak, paths

        monkeypatch.setattr(cpu_peak, "measure_matmul_peak", _fixed_cpu_matmul_peak)
        monkeypatch.setattr(cpu_peak, "cache_dir", paths.cache_dir, raising=False)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.extend(record.getMessage().splitlines())


@pytest.fixture
def captured():
    """The lines titanlite's logger printed during the test (INFO and up), one list item per line."""
    from titanlite.logging_utils import logger

    handler = _Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
