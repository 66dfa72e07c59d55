"""The attention kernel is rank 0's choice on every rank (2 gloo processes, the kernel packages stubbed per rank).

Rank 0 finds FA3 on the kernel hub. Rank 1's hub probe fails (a node whose network hiccups) and it also has a
source build of FA3 (flash_attn_interface): probing on its own, it would fall through to that other build.
"""

import sys
import types

import torch

from tests.helpers.dist import run_in_processes


def _stub_kernels(rank: int, rank1_download: str):
    from titanlite import attention as attn

    attn.reset_kernels()
    attn._cuda_capability = lambda: (9, 0)  # a Hopper GPU, as far as the chain can tell
    attn.HUB_PROBE_TIMEOUT_S = attn.HUB_DOWNLOAD_TIMEOUT_S = 2.0
    requests = []

    def flash_attn_func(tag):
        def run(q, k, v, causal=False, window_size=(-1, -1)):
            return torch.full_like(q, float(len(tag))), None
        run.tag = tag
        return run

    def has_kernel(repo_id, revision=None, version=None):
        requests.append("has_kernel")
        if rank == 1:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        return True

    def get_kernel(repo_id, revision=None, version=None):
        requests.append("get_kernel")
        if rank == 1 and rank1_download == "error":
            raise OSError("offline: not in the cache")
        return types.SimpleNamespace(flash_attn_interface=types.SimpleNamespace(flash_attn_func=flash_attn_func("hub")))

    sys.modules["kernels"] = types.SimpleNamespace(has_kernel=has_kernel, get_kernel=get_kernel)
    sys.modules["flash_attn_interface"] = types.SimpleNamespace(flash_attn_func=flash_attn_func("source build"))
    return attn, requests


def _agree(rank, world_size, rank1_download):
    from titanlite.errors import UserError
    from titanlite.kernel_choice import agree_attention_backend

    attn, requests = _stub_kernels(rank, rank1_download)
    alone = attn.select_attention_backend("auto", "cuda", torch.bfloat16, "SSSL")[0], attn._SOURCES.get("fa3")
    attn.reset_kernels()
    requests.clear()
    try:
        backend, lines = agree_attention_backend("auto", "cuda", torch.bfloat16, "SSSL")
    except UserError as error:
        return {"alone": alone, "error": str(error), "requests": requests}
    return {"alone": alone, "backend": backend, "source": attn._SOURCES.get(backend), "lines": lines,
            "kernel": attn._KERNELS[backend].tag, "requests": requests}


def test_every_rank_runs_the_kernel_rank_0_chose_even_when_its_own_probe_fails():
    ranks = run_in_processes(_agree, world_size=2, args=("ok",), timeout=120)
    # on its own, rank 1 would have run the other build: the disagreement this prevents
    assert ranks[0]["alone"] == ("fa3", "FA3 (kernel hub)")
    assert ranks[1]["alone"] == ("fa3", "FA3 (flash_attn_interface)")
    for result in ranks:
        assert (result["backend"], result["source"], result["kernel"]) == ("fa3", "FA3 (kernel hub)", "hub")
        assert result["lines"] == ranks[0]["lines"]
    assert ranks[0]["requests"] == ["has_kernel", "get_kernel"]
    assert ranks[1]["requests"] == ["get_kernel"]  # loads the chosen build without asking the hub first


def test_a_rank_that_cannot_load_the_chosen_kernel_stops_every_rank_with_one_line():
    ranks = run_in_processes(_agree, world_size=2, args=("error",), timeout=120)
    for result in ranks:
        error = result["error"]
        assert "\n" not in error
        assert error.startswith("rank 1 cannot load the attention kernel rank 0 chose, FA3 (kernel hub): ")
        assert "sdpa" in error
