"""The reference recipe's GPT: the model (model.py, kernels in ops.py), its TrainSpec (spec.py), FSDP units
(parallelize.py) and memory estimate (memory.py)."""

from titanlite.models.gpt.model import GPT, GPTArgs

__all__ = ["GPT", "GPTArgs"]
