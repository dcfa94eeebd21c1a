"""YAML recipes for the argparse tools (`tools/generate_sft_data.py`, `tools/evaluate.py`).

A recipe is a mapping `flag-name: value` (`_` or `-`); `--config FILE` is replaced by the
flags it spells, placed before the rest of the command line, so flags given there win
(for repeatable flags such as `--dataset` both are kept).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml


def recipe_flags(path: str | Path) -> list[str]:
    """The command-line flags a YAML recipe spells: `true` -> `--flag`, `false` -> nothing,
    a list -> `--flag a b`, a mapping -> `--flag k=v` once per entry (`--dataset kind=file`)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--config {path}: no such file")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(recipe, dict):
        raise SystemExit(f"{path}: a recipe is a mapping of flag: value")
    argv: list[str] = []
    for key, value in recipe.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            for k, v in value.items():
                argv += [flag, f"{k}={v}"]
        else:
            argv += [flag, str(value)]
    return argv


def expand_config(argv: list[str]) -> list[str]:
    """Replace `--config FILE` (or `--config=FILE`) in `argv` by the recipe's flags."""
    out: list[str] = []
    recipe: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            recipe += recipe_flags(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--config="):
            recipe += recipe_flags(argv[i].split("=", 1)[1])
        else:
            out.append(argv[i])
        i += 1
    return recipe + out


def report_files(entries: list[tuple[str, str | None]]) -> list[str]:
    """Print `flag path: found | NOT ON THIS MACHINE` lines; return the missing ones."""
    missing = []
    print("files:")
    for flag, path in entries:
        if path is None:
            continue
        found = Path(path).exists()
        print(f"  {flag} {path}: {'found' if found else 'NOT ON THIS MACHINE'}")
        if not found:
            missing.append(f"{flag} {path}")
    return missing


def check_data_files(checks: list[tuple[str, str, Callable[[], int]]]) -> str | None:
    """Read each `(flag, path, read)` data file that is on this machine through the run's own
    reader (`read` returns its record count), so that a dry run fails where the run would.
    Prints a line per file; returns the first error (naming file:line:field), else None."""
    print("data:")
    for flag, path, read in checks:
        if not Path(path).exists():
            continue  # listed as missing by report_files
        try:
            count = read()
        except ValueError as exc:  # the readers' errors name the file, line and field
            return str(exc)
        print(f"  {flag} {path}: {count} records, all valid")
    return None


def dry_run_result(missing: list[str], allow_missing: bool) -> int:
    if missing and not allow_missing:
        print(f"result: missing: {', '.join(missing)} (--allow-missing-files to plan anyway)")
        return 1
    print("result: OK")
    return 0


def add_recipe_arguments(parser) -> None:
    """`--config RECIPE.yaml`, `--dry-run` and `--allow-missing-files` for a tool's parser."""
    parser.add_argument("--config", help="YAML recipe of these flags; flags given here win")
    parser.add_argument("--dry-run", action="store_true", help="check settings and files, exit")
    parser.add_argument(
        "--allow-missing-files", action="store_true", help="dry run: list missing files, not fail"
    )
