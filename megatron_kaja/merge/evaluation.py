"""Evaluation right after a merge: run `tools/evaluate.py` on the merged model.

The seed's lesson is that a merge can break the model's Japanese while every tensor looks
fine, so `tools/merge_models.py --evaluate ...` hands the result straight to the
evaluation tool, in a subprocess so that its memory is not added to the merge's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EVALUATE_TOOL = REPO_ROOT / "tools" / "evaluate.py"


def check_evaluate_tool(tool: Path = EVALUATE_TOOL) -> Path:
    """Fail before merging, not after, when the evaluation tool is not there."""
    if not tool.is_file():
        raise FileNotFoundError(
            f"--evaluate needs {tool}, which does not exist in this checkout; "
            "merge without --evaluate, or update the checkout"
        )
    return tool


def evaluate_merged(model_dir: str | Path, args: list[str], tool: Path = EVALUATE_TOOL) -> int:
    """Run `python tools/evaluate.py --model MODEL_DIR ARGS...`; return its exit status."""
    check_evaluate_tool(tool)
    command = [sys.executable, str(tool), "--model", str(model_dir), *args]
    return subprocess.run(command, check=False).returncode
