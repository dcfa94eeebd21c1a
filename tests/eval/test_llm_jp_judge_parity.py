"""Our `--protocol llm-jp-judge` reading against llm-jp-judge's own score extractors and its
real prompt files, on canned judge outputs. Runs where llm-jp-judge is importable (installed,
or a checkout named by the LLM_JP_JUDGE environment variable, with its dependencies)."""

import itertools
import os
import sys
from pathlib import Path

import pytest

from megatron_kaja.judge.llm_jp_judge import AXIS_NAMES, load_tasks

if os.environ.get("LLM_JP_JUDGE"):
    sys.path.insert(0, str(Path(os.environ["LLM_JP_JUDGE"]) / "src"))
reference = pytest.importorskip(
    "llm_jp_judge.evaluator.quality", reason="llm-jp-judge not importable"
)

PIECES = ["理由。", "評価：", "[[", "]]", "4", "７", "２", "10", "[[3]]", "[[9]]", "評価：4",
          "［［５］］", "\n", "[[４]]"]  # fmt: skip
OUTPUTS = ["".join(p) for n in (1, 2, 3) for p in itertools.product(PIECES, repeat=n)]


def theirs(extractor, text):
    try:
        return extractor(text)
    except ValueError:  # its extractors raise on an unreadable output
        return None


def test_single_score_extractors_agree():
    tasks, _ = load_tasks(os.environ.get("LLM_JP_JUDGE"), ["safety", "borderline"])
    for kind, key in (("safety", "regex"), ("borderline", "regex"), ("borderline", "regex_safety")):
        extractor = reference.BaseScoreExtractor(regex=tasks[kind].template[key])
        part = "safety" if key == "regex_safety" else "main"
        for text in OUTPUTS:
            expected = theirs(extractor, text)
            ours = tasks[kind].read(text, "無関係な回答", part)
            assert (None if ours is None else ours["score"]) == (
                None if expected is None else int(expected)
            ), (kind, key, text)


def test_quality_extractor_agrees():
    (task,) = load_tasks(os.environ.get("LLM_JP_JUDGE"), ["helpful"])[0].values()
    labels = task.template["metrics"]
    extractor = reference.QualityScoreExtractor(task.template["regex"], labels)
    for values in itertools.product(["[[1]]", "[[5]]", "[[6]]", None, "dup"], repeat=len(labels)):
        lines = []
        for label, v in zip(labels, values, strict=True):
            if v == "dup":
                lines += [f"{label}: [[2]]", f"{label}: [[3]]"]
            elif v is not None:
                lines.append(f"{label}: {v}")
        text = "\n".join(lines)
        expected = theirs(extractor, text)
        ours = task.read(text, "無関係な回答")
        assert (None if ours is None else ours["axes"]) == (
            None if expected is None else {AXIS_NAMES[k]: v for k, v in expected.items()}
        ), text
