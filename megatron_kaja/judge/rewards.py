"""Reward functions for GRPO, TRL-style: `(prompts, completions, **columns) -> list[float | None]`.

`None` means "this reward does not apply to this sample" (or the judge could not read it);
`WeightedReward` sums the rewards that apply, like TRL's nansum over reward functions.
Prompts and completions may be plain strings or chat message lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from megatron_kaja.judge.judge import JudgeSample, LLMJudge
from megatron_kaja.judge.rubric import REWARD_RUBRIC_BY_KIND

RewardFn = Callable[..., list[float | None]]
_REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    """Register a reward factory: `build_reward(name, **kwargs)` returns the callable."""

    def wrap(factory):
        _REWARDS[name] = factory
        return factory

    return wrap


def reward_names() -> list[str]:
    return sorted(_REWARDS)


def build_reward(name: str, **kwargs) -> RewardFn:
    """Build the reward registered as `name` (see `reward_names()`)."""
    if name not in _REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {reward_names()}")
    return _REWARDS[name](**kwargs)


def message_text(item) -> str:
    """The text of a prompt/completion: a string, or the last message of a chat list."""
    if isinstance(item, str):
        return item
    if isinstance(item, Sequence) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    raise TypeError(f"expected a string or a list of chat messages, got {type(item).__name__}")


def _column(columns: dict, name: str, n: int, default=None) -> list:
    values = columns.get(name)
    if values is None:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


class JudgeReward:
    """The seed's GRPO reward: the LLM judge's score under the rubric of the prompt's kind,
    normalized to [0, 1] (score / 5 on the seed's 0-5 scale)."""

    def __init__(
        self,
        judge: LLMJudge,
        rubric_by_kind: dict[str, str] | None = None,
        kind_column: str = "kind",
        reference_column: str = "output",
        aspect_column: str = "eval_aspect",
    ) -> None:
        self.judge = judge
        self.rubric_by_kind = rubric_by_kind or dict(REWARD_RUBRIC_BY_KIND)
        self.kind_column = kind_column
        self.reference_column = reference_column
        self.aspect_column = aspect_column
        self.__name__ = "judge"  # TRL logs rewards under their __name__

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        n = len(completions)
        kinds = _column(columns, self.kind_column, n)
        refs = _column(columns, self.reference_column, n, "")
        aspects = _column(columns, self.aspect_column, n, "")
        samples = []
        for i, kind in enumerate(kinds):
            if kind not in self.rubric_by_kind:
                raise ValueError(
                    f"row {i}: column {self.kind_column!r} is {kind!r}; "
                    f"expected one of {sorted(self.rubric_by_kind)}"
                )
            samples.append(
                JudgeSample(
                    rubric=self.rubric_by_kind[kind],
                    input_text=message_text(prompts[i]),
                    pred=message_text(completions[i]),
                    output_text=refs[i] or "",
                    eval_aspect=aspects[i] or "",
                )
            )
        return [j.normalized for j in self.judge.judge(samples)]


@register_reward("judge")
def judge_reward(judge: LLMJudge, **kwargs) -> RewardFn:
    return JudgeReward(judge, **kwargs)


# 「回答できません」「お答えできません」「お答えすることはできません」...
_REFUSAL = re.compile(
    r"(回答|お答え|答え|お応え)(すること)?(は|が)?(でき|致し|いたし)(ません|かねます)"
)
_REASON = re.compile(r"(その)?理由は|なぜなら|ためです|からです")


@register_reward("refusal_with_reason")
def refusal_with_reason(
    kind_column: str = "kind", kinds: Sequence[str] = ("safety",), partial: float = 0.5
) -> RewardFn:
    """Rule reward for the seed's answer form on harmful prompts: 1.0 for a refusal with a
    reason (「回答できません。その理由は…」), `partial` for a bare refusal, 0.0 otherwise.
    Rows whose kind is not in `kinds` get None; without a kind column every row counts."""

    def reward(prompts, completions, **columns) -> list[float | None]:
        row_kinds = _column(columns, kind_column, len(completions))
        out: list[float | None] = []
        for kind, completion in zip(row_kinds, completions, strict=True):
            if kind is not None and kind not in kinds:
                out.append(None)
                continue
            text = message_text(completion)
            refusal = _REFUSAL.search(text)
            if refusal is None:
                out.append(0.0)
            else:
                out.append(1.0 if _REASON.search(text, refusal.end()) else partial)
        return out

    reward.__name__ = "refusal_with_reason"
    return reward


@register_reward("length_penalty")
def length_penalty(max_chars: int = 1000, slope_chars: int = 1000) -> RewardFn:
    """0 up to `max_chars` characters, then falling linearly to -1 at `max_chars + slope_chars`
    (and staying there): discourages the rambling that judges tend to over-reward."""
    if max_chars < 0 or slope_chars <= 0:
        raise ValueError("length_penalty: max_chars must be >= 0 and slope_chars > 0")

    def reward(prompts, completions, **columns) -> list[float | None]:
        return [
            -min(1.0, max(0, len(message_text(c)) - max_chars) / slope_chars) for c in completions
        ]

    reward.__name__ = "length_penalty"
    return reward


class WeightedReward:
    """sum_i w_i r_i over the rewards that apply (not None); None when none applies."""

    def __init__(self, terms: Sequence[tuple[RewardFn, float]]) -> None:
        if not terms:
            raise ValueError("WeightedReward needs at least one (reward, weight) term")
        self.terms = list(terms)
        self.__name__ = "+".join(f"{w:g}*{getattr(f, '__name__', 'reward')}" for f, w in terms)

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        total: list[float | None] = [None] * len(completions)
        for fn, weight in self.terms:
            values = fn(prompts, completions, **columns)
            if len(values) != len(completions):
                raise ValueError(
                    f"reward {fn!r} returned {len(values)} values for {len(completions)}"
                )
            for i, value in enumerate(values):
                if value is not None:
                    total[i] = (total[i] or 0.0) + weight * value
        return total
