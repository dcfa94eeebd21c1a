"""CI for `examples/`: every YAML recipe passes its entry point's `--dry-run` on CPU, and
every shell script passes `bash -n` and shellcheck."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("examples/**/*.yaml"))
SCRIPTS = [
    *sorted(p for p in ROOT.glob("examples/**/*") if p.suffix in (".sh", ".sbatch")),
    ROOT / ".ci" / "run",
]
# Which entry point a recipe belongs to, by its file name.
ENTRY_POINTS = {
    "sft": "pretrain_sft.py",
    "grpo": "train_grpo.py",
    "dpo": "train_dpo.py",
    "make_preference_data": "tools/make_preference_data.py",
    "generate_sft_data": "tools/generate_sft_data.py",
    "evaluate": "tools/evaluate.py",
    "merge": "tools/merge_models.py",
}


def _entry_point(recipe: Path) -> str:
    for prefix, script in sorted(ENTRY_POINTS.items(), key=lambda kv: -len(kv[0])):
        if recipe.stem.startswith(prefix):
            return script
    raise AssertionError(f"{recipe}: name it after its entry point ({sorted(ENTRY_POINTS)}*)")


def _main(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_recipes_are_found():
    assert any("llm-jp-3-13b" in str(p) for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_dry_run(recipe, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(var, raising=False)
    script = _entry_point(recipe)
    argv = ["--config", str(recipe), "--dry-run", "--allow-missing-files"]
    if script == "tools/merge_models.py":
        argv += ["--out", "unused"]
    rc = _main(script)(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "result: OK" in out
    if script in ("pretrain_sft.py", "train_grpo.py", "train_dpo.py"):
        assert "layout: TP=" in out and "fits in" in out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout
