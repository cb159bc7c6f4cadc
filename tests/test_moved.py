"""deeproots 0.1's module names keep working for one release: each says where its contents
moved (a DeprecationWarning) and forwards there, the same objects, not copies."""
import importlib
import sys
import warnings

import pytest

MOVED = {"train": ("training.loop", "train"), "calibration": ("conversion.calibrate", "calibrate"),
         "deploy": ("speed.deploy", "optimize_for_inference"),
         "checkpoint": ("training.checkpoint", "load_checkpoint"),
         "rundir": ("training.folder", "RunFolder"), "registry": ("models.registry",
                                                                  "create_model"),
         "finetune": ("conversion.checkpoint", "convert_checkpoint"),
         "analysis": ("inspection.covariance", "analyze"),
         "paper": ("reproduction.tables", "PAPER_TABLES")}


@pytest.mark.parametrize("old", list(MOVED))
def test_an_old_module_name_warns_and_forwards_to_the_new_place(old):
    new, name = MOVED[old]
    sys.modules.pop(f"deeproots.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"deeproots.{old}")
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any(m.startswith(f"deeproots.{old} moved to deeproots.{new}") for m in messages)
    assert getattr(module, name) is getattr(importlib.import_module(f"deeproots.{new}"), name)
    assert name in module.__all__
    with pytest.raises(AttributeError, match=f"moved to deeproots.{new}"):
        module.no_such_name


def test_the_old_conversion_module_is_the_conversion_package():
    """``from deeproots.conversion import rootify`` is unchanged (no warning): the package
    holds the names the module did."""
    from deeproots.conversion import rootify
    from deeproots.conversion.rule import rootify as defined

    assert rootify is defined
