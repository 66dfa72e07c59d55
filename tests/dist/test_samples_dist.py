"""Sampling over 2 gloo processes where one rank hits BOS early: both finish, with the same number of forwards."""

import types

import torch

from tests.helpers.dist import run_in_processes

BOS = 0
VOCAB = 8


class ByteTokenizer:
    bos_token_id = BOS

    def encode(self, text, prepend=None):
        return ([prepend] if prepend is not None else []) + [1 + b % (VOCAB - 1) for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


class CollectiveModel:
    """Stands in for an FSDP-sharded model: every forward joins a collective (like FSDP's all-gathers).

    Greedy continuation is token 3 forever, except on `stop_rank`, whose third generated token is BOS.
    """

    def __init__(self, rank: int, stop_rank: int):
        self.rank, self.stop_rank = rank, stop_rank
        self.args = types.SimpleNamespace(n_layer=1, n_kv_head=1, head_dim=2)
        self.wte = types.SimpleNamespace(weight=torch.zeros(1))
        self.compute_dtype = torch.float32
        self.forwards = 0

    def parameters(self):
        return iter([self.wte.weight])

    def new_kv_cache(self, batch_size, max_len):
        from titanlite.generate import KVCache

        a = self.args
        return KVCache(a.n_layer, batch_size, max_len, a.n_kv_head, a.head_dim, torch.device("cpu"),
                       self.compute_dtype)

    def __call__(self, ids, kv_cache=None):
        import torch.distributed as dist

        gathered = torch.ones(1)
        dist.all_reduce(gathered)  # a rank that skipped this forward would leave the others waiting here
        assert gathered.item() == 2
        self.forwards += 1
        kv_cache.advance(ids.size(1))
        logits = torch.zeros(1, ids.size(1), VOCAB)
        generated = self.forwards  # the n-th forward of a prompt predicts its n-th new token
        early = self.rank == self.stop_rank and generated % 16 == 3
        logits[:, -1, BOS if early else 3] = 1.0
        return logits


def _sample_on_rank(rank, world_size):
    from titanlite.eval.samples import sample_completions

    model = CollectiveModel(rank, stop_rank=1)
    texts = sample_completions(model, ByteTokenizer(), max_new_tokens=16, prompts=("ab", "hello"))
    return texts, model.forwards


def test_ranks_stay_in_lockstep_when_one_stops_early():
    (texts0, forwards0), (texts1, forwards1) = run_in_processes(_sample_on_rank, world_size=2, timeout=90)
    assert forwards0 == forwards1 == 2 * 16  # prefill + 15 decoding steps per prompt, on both ranks
    assert texts0 == ["ab" + "d" * 16, "hello" + "d" * 16]
    assert texts1 == ["abdd", "hellodd"]  # rank 1's completions end at its BOS, the extra forwards are dropped


def test_one_process_still_stops_at_bos():
    from titanlite.generate import complete

    class Alone(CollectiveModel):
        def __call__(self, ids, kv_cache=None):
            self.forwards += 1
            kv_cache.advance(ids.size(1))
            logits = torch.zeros(1, ids.size(1), VOCAB)
            logits[:, -1, BOS if self.forwards == 3 else 3] = 1.0
            return logits

    model = Alone(0, 0)
    assert complete(model, [BOS, 1], 16, stop_token=BOS) == [3, 3]
    assert model.forwards == 3  # no process group: stopping early saves the rest
