"""Year prediction from the gate: its posterior over slices applied to the slices' mid-years.

For a document with gate posterior p over N slices, the expected year is sum_k p_k * mid_k and the argmax year
is the mid-year of the most probable slice (mid_k = (start_k + end_k) / 2). The baseline predicts the mean
year of the training documents for every document.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class YearPrediction:
    """Mean absolute error in years on held-out documents."""

    mae_expected: float
    """Using the posterior-weighted mid-year."""
    mae_argmax: float
    """Using the mid-year of the argmax slice."""
    mae_baseline: float
    """Always predicting the training mean year."""
    baseline_year: float
    documents: int


def mid_years(slices: list[list[int]]) -> torch.Tensor:
    """[N] the mid-year of each slice."""
    return torch.tensor([(s[0] + s[1]) / 2 for s in slices], dtype=torch.float64)


def predict_years(posteriors: torch.Tensor, slices: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected year [D], argmax year [D]) from posteriors [D, N]."""
    mids = mid_years(slices)
    p = posteriors.to(torch.float64)
    return p @ mids, mids[p.argmax(-1)]


def year_mae(posteriors: torch.Tensor, years: torch.Tensor, slices: list[list[int]],
             train_mean_year: float) -> YearPrediction:
    """MAE of the gate's year predictions against the true ``years`` [D], beside the mean-year baseline."""
    if len(years) == 0:
        raise ValueError("year prediction needs at least one held-out document with a year")
    expected, argmax = predict_years(posteriors, slices)
    y = years.to(torch.float64)
    return YearPrediction(float((expected - y).abs().mean()), float((argmax - y).abs().mean()),
                          float((train_mean_year - y).abs().mean()), float(train_mean_year), len(years))
