"""The kernel chain, best first: each loader's import stubbed to succeed, fail or hang; what runs and what is said."""

import sys
import threading
import time
import types

import pytest
import torch

from titanlite import attention as attn
from titanlite.errors import UserError

HUB_LINE = "✓ Using Flash Attention 3 (Hopper GPU detected), efficient, new and awesome."


def flash_stub(tag: str, calls: list):
    """A flash_attn_func that records its call and returns (out, lse) like the FA3/FA4 builds."""
    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        calls.append((tag, causal, window_size))
        return torch.full_like(q, float(len(tag))), None
    return flash_attn_func


class Hub:
    """A stand-in for the `kernels` package: has_kernel / get_kernel answer, raise or hang."""

    def __init__(self, calls, probe="yes", download="ok"):
        self.calls, self.probe, self.download = calls, probe, download
        self.requests = []
        self.release = threading.Event()  # lets a hanging call end when the test is over

    def module(self):
        hub = self

        def has_kernel(repo_id, revision=None, version=None):
            hub.requests.append(("has_kernel", repo_id, revision))
            if hub.probe == "hang":
                hub.release.wait(60)
            if hub.probe == "error":
                raise ConnectionError("Failed to resolve 'huggingface.co'")
            return hub.probe == "yes"

        def get_kernel(repo_id, revision=None, version=None):
            hub.requests.append(("get_kernel", repo_id, revision))
            if hub.download == "hang":
                hub.release.wait(60)
            if hub.download in ("error", "hang"):
                raise OSError("offline: not in the cache")
            return types.SimpleNamespace(flash_attn_interface=types.SimpleNamespace(
                flash_attn_func=flash_stub("hub", hub.calls)))

        return types.SimpleNamespace(has_kernel=has_kernel, get_kernel=get_kernel)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, with every optional kernel package absent by default."""
    attn.reset_kernels()
    state = {"capability": (9, 0)}
    monkeypatch.setattr(attn, "_cuda_capability", lambda: state["capability"])
    monkeypatch.setattr(attn, "HUB_PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(attn, "HUB_DOWNLOAD_TIMEOUT_S", 0.5)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("kernels", "flash_attn_interface", "flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: `import name` raises ImportError
    calls = []

    def install(name, tag):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(flash_attn_func=flash_stub(tag, calls)))

    def hub(**kw):
        h = Hub(calls, **kw)
        monkeypatch.setitem(sys.modules, "kernels", h.module())
        return h

    yield types.SimpleNamespace(state=state, calls=calls, install=install, hub=hub)
    attn.reset_kernels()


def select(pattern="SSSL", dtype=torch.bfloat16, requested="auto"):
    return attn.select_attention_backend(requested, "cuda", dtype, pattern)


def test_hub_fa3_first_and_loaded_once(gpu):
    hub = gpu.hub()
    gpu.install("flash_attn_interface", "iface")
    name, lines = select()
    assert name == "fa3"
    assert lines == [f"{HUB_LINE} [FA3 (kernel hub)]"]
    assert hub.requests == [("has_kernel", "kernels-community/flash-attn3", "main"),
                            ("get_kernel", "kernels-community/flash-attn3", "main")]
    select()
    assert len(hub.requests) == 2  # the hub is asked once per process
    q = torch.randn(1, 8, 2, 16)
    out = attn.attention(q, q, q, 5, backend="fa3")
    assert gpu.calls == [("hub", True, (5, 0))]  # the hub's kernel runs, causal with a left window
    assert torch.equal(out, torch.full_like(q, 3.0))  # the (out, lse) tuple is unpacked


def test_without_the_kernels_package_the_source_build_of_fa3_runs(gpu):
    gpu.install("flash_attn_interface", "iface")
    name, lines = select()
    assert name == "fa3"
    assert lines == [f"{HUB_LINE} [FA3 (flash_attn_interface)] Skipped: FA3 (kernel hub): the kernels "
                     "package is not installed (pip install -e '.[gpu]')."]


def test_hub_that_never_answers_falls_through_within_its_deadline(gpu):
    hub = gpu.hub(probe="hang")
    gpu.install("flash_attn.cute", "fa4")
    start = time.perf_counter()
    name, lines = select()
    elapsed = time.perf_counter() - start
    hub.release.set()
    assert name == "fa4" and elapsed < 3.0
    assert lines == ["WARNING: Flash Attention 3 not available, using Flash Attention 4 (flash-attn-4). Training "
                     "will be less efficient. Skipped: FA3 (kernel hub): kernel hub unreachable (no answer within "
                     "0.5 s); FA3 (flash_attn_interface): flash_attn_interface is not installed (a source build of "
                     "flash-attn's hopper/)."]
    assert [r[0] for r in hub.requests] == ["has_kernel"]  # no download attempted after the probe failed


def test_download_that_hangs_falls_through_too(gpu):
    hub = gpu.hub(download="hang")
    gpu.install("flash_attn", "fa2")
    start = time.perf_counter()
    name, lines = select()
    hub.release.set()
    assert name == "flash_attn" and time.perf_counter() - start < 3.0
    assert "FA3 (kernel hub): kernel hub download of kernels-community/flash-attn3 took over 0.5 s" in lines[0]
    assert "FA4 (flash-attn-4): flash-attn-4 is not installed" in lines[0]
    assert lines[0].startswith("WARNING: Flash Attention 3 not available, using Flash Attention 2 (flash-attn).")


def test_hub_errors_and_offline_mode(gpu, monkeypatch):
    gpu.hub(probe="error")
    name, lines = select()
    assert name == "flex"
    assert "FA3 (kernel hub): kernel hub unreachable (ConnectionError: Failed to resolve 'huggingface.co')" in lines[0]
    attn.reset_kernels()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = gpu.hub(probe="hang", download="error")  # offline: no probe, the cache lookup fails at once
    start = time.perf_counter()
    name, lines = select()
    assert name == "flex" and time.perf_counter() - start < 0.4
    assert [r[0] for r in hub.requests] == ["get_kernel"]
    assert ("FA3 (kernel hub): HF_HUB_OFFLINE is set and kernels-community/flash-attn3 is not in the local cache"
            in lines[0])
    attn.reset_kernels()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    gpu.hub(probe="no")
    assert "the kernel hub has no kernels-community/flash-attn3 build for torch" in select()[1][0]


def test_nothing_installed_gives_flex_for_windows_and_sdpa_for_full_context(gpu):
    name, lines = select("SSSL")
    assert name == "flex"
    assert lines == ["WARNING: Flash Attention 3 not available, using flex_attention with a sliding-window block "
                     "mask. Training will be less efficient. Skipped: FA3 (kernel hub): the kernels package is not "
                     "installed (pip install -e '.[gpu]'); FA3 (flash_attn_interface): flash_attn_interface is not "
                     "installed (a source build of flash-attn's hopper/); FA4 (flash-attn-4): flash-attn-4 is not "
                     "installed; flash-attn 2: flash-attn 2 is not installed (needs nvcc to build)."]
    name, lines = select("L")
    assert name == "sdpa" and len(lines) == 1
    assert lines[0].endswith("flex_attention: not needed without short windows (SDPA's causal kernel covers full "
                             "context).")


def test_gpu_generation_and_dtype_decide_before_any_loader_runs(gpu):
    hub = gpu.hub()
    for name in ("flash_attn_interface", "flash_attn.cute", "flash_attn"):
        gpu.install(name, name)
    gpu.state["capability"] = (8, 0)  # Ampere: no FA3, no FA4
    name, lines = select()
    assert name == "flash_attn" and hub.requests == []
    assert "FA3 (kernel hub), FA3 (flash_attn_interface): needs a Hopper GPU (this GPU is sm8x)" in lines[0]
    assert "FA4 (flash-attn-4): needs a Hopper or Blackwell GPU (this GPU is sm8x)" in lines[0]
    gpu.state["capability"] = (10, 0)  # Blackwell: FA4
    assert select()[0] == "fa4" and hub.requests == []
    gpu.state["capability"] = (9, 0)
    name, lines = select(dtype=torch.float32)  # flash kernels need bf16; the hub is not even asked
    assert name == "flex" and hub.requests == []
    assert "flash-attn 2: needs bfloat16 compute (training.dtype)" in lines[0]


def test_forced_backend_tries_only_its_loaders(gpu):
    gpu.install("flash_attn", "fa2")
    assert select(requested="flash_attn")[0] == "flash_attn"
    with pytest.raises(UserError) as err:
        select(requested="fa3")
    assert str(err.value) == (
        "model.attention_backend = 'fa3' is not available here: FA3 (kernel hub): the kernels package is not "
        "installed (pip install -e '.[gpu]'); FA3 (flash_attn_interface): flash_attn_interface is not installed "
        "(a source build of flash-attn's hopper/); use model.attention_backend = \"auto\" (or sdpa)")
