"""Judge rubrics: prompt templates kept as YAML data files, loaded and validated here.

A rubric has a system and a user template with `{placeholders}`. Sample fields
(`input_text` question, `output_text` reference, `pred` the answer, `eval_aspect`) are
untrusted text: they are inserted fenced (see `fence`) and in one pass, so that an answer
can neither close nor forge the rubric's sections, nor smuggle in another placeholder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RUBRIC_DIR = Path(__file__).parent / "rubrics"
SAMPLE_FIELDS = ("input_text", "output_text", "pred", "eval_aspect")
RUBRIC_FIELDS = ("output_format", "axis_label", "axis_description")
JudgeMode = Literal["choice", "free_text"]
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class Scale(BaseModel):
    """The integer scores a judge may give; normalized = (score - min) / (max - min)."""

    min: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> Scale:
        if self.max <= self.min:
            raise ValueError(f"scale.max ({self.max}) must be > scale.min ({self.min})")
        return self

    @property
    def scores(self) -> list[int]:
        return list(range(self.min, self.max + 1))


class Axis(BaseModel):
    label: str
    description: str


class Rubric(BaseModel):
    """One judge prompt. `axes` (optional) makes one judgement per axis."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    scale: Scale
    metric: Literal["score", "refusal"] = "score"
    system: str
    user: str
    defaults: dict[str, str] = Field(default_factory=dict)
    output_format: dict[JudgeMode, str] = Field(default_factory=dict)
    axes: dict[str, Axis] = Field(default_factory=dict)
    primary_axis: str | None = None
    fence: bool = True

    @model_validator(mode="after")
    def _placeholders_known(self) -> Rubric:
        used = set(_PLACEHOLDER.findall(self.system + self.user))
        unknown = used - set(SAMPLE_FIELDS) - set(RUBRIC_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholders {sorted(unknown)}; allowed: {SAMPLE_FIELDS}")
        if "pred" not in used:
            raise ValueError("the templates never show the answer: add {pred}")
        if "output_format" in used and set(self.output_format) != {"choice", "free_text"}:
            raise ValueError("{output_format} is used: give output_format.choice and .free_text")
        if ({"axis_label", "axis_description"} & used) and not self.axes:
            raise ValueError("{axis_label}/{axis_description} are used but no axes are defined")
        if self.axes and self.primary_axis not in self.axes:
            raise ValueError(f"primary_axis must be one of {sorted(self.axes)}")
        return self

    @property
    def choices(self) -> tuple[str, ...]:
        """The strings a constrained judge may answer."""
        return tuple(str(s) for s in self.scale.scores)

    def normalize(self, score: float) -> float:
        """Map a score on the rubric's scale to [0, 1]: (score - min) / (max - min)."""
        return (score - self.scale.min) / (self.scale.max - self.scale.min)

    def axis_names(self) -> list[str | None]:
        """The judgements one sample needs: one per axis, or a single unnamed one."""
        return list(self.axes) if self.axes else [None]

    def render(
        self, fields: dict[str, str], mode: JudgeMode, axis: str | None = None
    ) -> list[dict[str, str]]:
        """The chat messages for one judgement. Raises KeyError naming a missing field."""
        values: dict[str, str] = {}
        for name in SAMPLE_FIELDS:
            value = fields.get(name)
            # An empty answer is still the answer under judgement (a model that stops at once
            # is judged, not skipped); other empty fields fall back to the rubric's defaults.
            if value is None or (value == "" and name != "pred"):
                value = self.defaults.get(name)
            if value is not None:
                values[name] = fence(value) if self.fence else value
        if self.output_format:
            values["output_format"] = self.output_format.get(mode, "")
        if axis is not None:
            values["axis_label"] = self.axes[axis].label
            values["axis_description"] = self.axes[axis].description

        def fill(match: re.Match) -> str:
            key = match.group(1)
            if key not in values:
                raise KeyError(f"rubric {self.name!r} needs the field {key!r}, which is empty")
            return values[key]

        # One re.sub pass: text inserted for one placeholder is never scanned for another.
        return [
            {"role": "system", "content": _PLACEHOLDER.sub(fill, self.system)},
            {"role": "user", "content": _PLACEHOLDER.sub(fill, self.user)},
        ]


def fence(text: str) -> str:
    """Wrap untrusted text in a Markdown code fence it cannot close.

    The fence is one backtick longer than the longest backtick run inside the text (at
    least three), the CommonMark rule, so nothing in the text can end the block early;
    inside it, `# 採点基準` or 「評価：5」 are literal content, not rubric structure.
    """
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{text}\n{ticks}"


def load_rubric(path_or_name: str | Path) -> Rubric:
    """Load a rubric from a YAML file, or a built-in one by name (e.g. `grpo_safety`)."""
    path = Path(path_or_name)
    if not path.suffix:
        path = RUBRIC_DIR / f"{path_or_name}.yaml"
        if not path.is_file():
            raise ValueError(f"no built-in rubric {path_or_name!r}; have {builtin_rubrics()}")
    if not path.is_file():
        raise FileNotFoundError(f"rubric file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"rubric file {path}: invalid YAML: {exc}") from exc
    try:
        return Rubric.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"rubric file {path}: {exc}") from exc


def builtin_rubrics() -> list[str]:
    """Names of the rubrics shipped with the package."""
    return sorted(p.stem for p in RUBRIC_DIR.glob("*.yaml"))


# Which rubric judges which kind of prompt, for GRPO rewards and for evaluation.
REWARD_RUBRIC_BY_KIND = {"safety": "grpo_safety", "helpful": "grpo_helpful"}
EVAL_RUBRIC_BY_KIND = {
    "safety": "eval_safety",
    "borderline": "eval_borderline",
    "helpful": "eval_helpful",
}
