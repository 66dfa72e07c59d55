"""CORE over 2 gloo processes equals CORE in 1 process, and every rank runs the same number of forwards."""

import pytest

from tests.helpers.dist import run_in_processes
from tests.unit.test_core import LM_ITEMS, MC_ITEMS, SCHEMA_ITEMS, ByteTokenizer, SuccessorModel, write_bundle
from titanlite.eval.core import evaluate_core


def _core_on_rank(rank, world_size, bundle_dir):
    model = SuccessorModel()
    # batch_size=3 rows: ranks plan different numbers of forwards (odd item counts, 2- and 3-choice items)
    result = evaluate_core(model, ByteTokenizer(), bundle_dir, rank=rank, world_size=world_size, batch_size=3)
    return result.accuracy, result.core, len(model.forward_shapes)


def test_two_processes_give_the_same_core_as_one(tmp_path):
    # odd item counts so the ranks get unequal shares; repeated items are shuffled apart by Random(1337)
    bundle = write_bundle(tmp_path / "bundle", mc=MC_ITEMS * 3 + MC_ITEMS[:1], schema=SCHEMA_ITEMS * 3,
                          lm=LM_ITEMS * 2 + LM_ITEMS[:1])
    single = evaluate_core(SuccessorModel(), ByteTokenizer(), bundle, batch_size=3)
    assert single.accuracy["mc_test"] == pytest.approx(10 / 13)  # 3 of 4 per copy, plus item 0 (right)
    results = run_in_processes(_core_on_rank, world_size=2, args=(str(bundle),))
    for accuracy, core_value, _ in results:
        assert accuracy == pytest.approx(single.accuracy, abs=1e-7)
        assert core_value == pytest.approx(single.core, abs=1e-7)
    assert results[0][2] == results[1][2]  # equal forward counts: safe for FSDP's per-forward all-gathers
