"""The reference recipe's GPT: model (model.py) and KV-cache generation (generate.py)."""

from titanlite.models.gpt.model import GPT, GPTArgs, args_from_plan, count_flops_per_token, count_params

__all__ = ["GPT", "GPTArgs", "args_from_plan", "count_flops_per_token", "count_params", "gpt_train_spec"]


def gpt_train_spec():
    """The TrainSpec registered under "gpt" (parallelize/optimizer builders are attached where they live)."""
    from titanlite.models.gpt.parallelize import parallelize_gpt
    from titanlite.spec import TrainSpec

    return TrainSpec(name="gpt", model_args_cls=GPTArgs, model_cls=GPT, args_from_plan=args_from_plan,
                     parallelize=parallelize_gpt)
