"""Optional GPU packages: lazy imports whose error names the extra to install."""

import json
import subprocess
import sys

import pytest

from megatron_kaja.extras import MissingExtraError, is_available, require
from tests.helpers import REPO


def test_require_returns_an_installed_module():
    assert require("json") is json


@pytest.mark.skipif(is_available("vllm"), reason="vllm is installed")
def test_missing_gpu_package_names_the_extra():
    with pytest.raises(MissingExtraError, match=r"vLLM generation backends.*megatron-kaja\[gpu\]"):
        require("vllm")


@pytest.mark.skipif(is_available("apex"), reason="apex is installed")
def test_missing_apex_points_at_building_it_from_source():
    with pytest.raises(MissingExtraError, match="built from source"):
        require("apex")


def test_is_available_without_site_imports():
    """`importlib.util` must be imported explicitly: `python -S` does not preload it."""
    code = (
        f"import sys; sys.path[:0] = [{str(REPO)!r}, *{sys.path!r}]; "
        "from megatron_kaja.extras import is_available; "
        "print(is_available('json'), is_available('no_such_module_kaja'))"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_megatron_core_import_warnings_are_silenced_and_named_once():
    """Importing megatron-core through megatron_kaja prints none of its known-harmless
    warnings (apex / transformer-engine absent, deprecations), and the trainers' one log line
    names the absent packages instead."""
    code = (
        "import logging, sys; logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
        "import megatron_kaja\n"
        "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs\n"
        "from megatron_kaja.extras import log_absent_packages\n"
        "log_absent_packages(); log_absent_packages()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    absent = [m for m in ("apex", "transformer_engine") if not is_available(m)]
    notes = [line for line in proc.stderr.splitlines() if "optional packages absent" in line]
    assert len(notes) == (1 if absent else 0), proc.stderr
    for module in absent:
        assert module in notes[0]
