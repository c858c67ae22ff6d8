"""conftest's switch for optional packages: a missing one skips the test that needs it, fails it
under CI=true, and MINIGPT_HIDE_OPTIONAL=1 hides transformers, peft and gguf from every import."""

import importlib
import sys

import pytest

from conftest import require


def test_a_missing_optional_package_skips_the_test_and_fails_it_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs minigpt_no_such_package"):
        require("minigpt_no_such_package")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="minigpt_no_such_package is not installed"):
        require("minigpt_no_such_package")
    assert require("json") is importlib.import_module("json")


def test_hidden_optional_packages_cannot_be_imported(monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "HIDDEN_PACKAGES", ("transformers", "peft", "gguf"))
    monkeypatch.setattr(sys, "meta_path", [conftest.HideOptionalPackages(), *sys.meta_path])
    for name in ("transformers", "peft", "gguf", "transformers.models.llama"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        with pytest.raises(ModuleNotFoundError, match="hidden by MINIGPT_HIDE_OPTIONAL=1"):
            importlib.import_module(name)
        with pytest.raises(pytest.skip.Exception, match="is hidden"):
            require(name)
    assert importlib.import_module("json")  # everything else imports as before
