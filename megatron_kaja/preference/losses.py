"""Preference losses, registered by name (`--loss-type`), on per-answer log-probabilities.

Every loss sees the summed log-probs of each pair's answers under the policy and the frozen
reference, and the answers' token counts; it returns one loss per pair. With
h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

* `sigmoid` (DPO, Rafailov et al. 2023): -log sigma(beta h); with label smoothing eps the
  conservative form -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) (cDPO, Mitchell 2023),
  for pairs whose label is wrong with probability eps.
* `ipo` (Azar et al. 2023, eq. 17): (h' - 1 / (2 beta))^2, with h' built from per-token mean
  log-ratios (each answer's log-ratio divided by its token count), as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AnswerLogps:
    """Summed log-probs of each pair's answers ([pairs] each) and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected


PreferenceLoss = Callable[[AnswerLogps, float, float], torch.Tensor]
_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str):
    """Function decorator: `fn(logps, beta, label_smoothing) -> per-pair losses`."""

    def wrap(fn: PreferenceLoss) -> PreferenceLoss:
        _LOSSES[name] = fn
        return fn

    return wrap


def preference_loss_names() -> tuple[str, ...]:
    return tuple(_LOSSES)


def preference_loss(name: str) -> PreferenceLoss:
    if name not in _LOSSES:
        raise ValueError(f"loss type {name!r}: use one of {', '.join(preference_loss_names())}")
    return _LOSSES[name]


@register_preference_loss("sigmoid")
def sigmoid_loss(logps: AnswerLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    h = logps.chosen_logratios - logps.rejected_logratios
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


@register_preference_loss("ipo")
def ipo_loss(logps: AnswerLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    chosen = logps.chosen_logratios / logps.chosen_tokens.clamp(min=1.0)
    rejected = logps.rejected_logratios / logps.rejected_tokens.clamp(min=1.0)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def reward_stats(logps: AnswerLogps, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair sums for the step's metrics: implicit rewards beta x log-ratio of each answer,
    their margin and whether the chosen answer wins (as TRL reports them)."""
    chosen = beta * logps.chosen_logratios.detach()
    rejected = beta * logps.rejected_logratios.detach()
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "logps/chosen": logps.chosen.detach().sum(),
        "logps/rejected": logps.rejected.detach().sum(),
    }
