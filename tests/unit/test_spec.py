"""The model registry: families are found by name, a name that is not there is one line, and a registration
cannot silently replace another family."""

from dataclasses import replace

import pytest

import titanlite.models as registry
from titanlite.errors import UserError
from titanlite.models import get_train_spec, register_train_spec, registered_names
from titanlite.models.gpt import GPT, GPTArgs


@pytest.fixture
def private_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after the test


def test_gpt_is_registered_by_default():
    spec = get_train_spec("gpt")
    assert spec.model_cls is GPT and spec.model_args_cls is GPTArgs
    assert "gpt" in registered_names()


def test_unknown_name_lists_registered():
    with pytest.raises(UserError, match=r"model.name = 'mamba' is not a registered model; registered: "
                                        + ", ".join(registered_names())):
        get_train_spec("mamba")


def test_duplicate_registration_is_refused(private_registry):
    gpt = get_train_spec("gpt")
    with pytest.raises(ValueError, match="already registered"):
        register_train_spec(gpt)
    register_train_spec(replace(gpt, name="gpt2"))
    assert get_train_spec("gpt2").model_cls is GPT
    register_train_spec(replace(gpt, export_format="other"), replace=True)
    assert get_train_spec("gpt").export_format == "other"
