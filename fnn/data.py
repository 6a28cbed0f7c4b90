"""The data of seed 000: two Iris classes, two features, shipped with the package."""

from __future__ import annotations

import csv
from importlib import resources

import torch


def load_iris() -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher's Iris data (150 rows): features (150, 4) float64 and species (150,) int64."""
    with resources.files("fnn").joinpath("data/iris.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    features = torch.tensor([[float(v) for v in r[:4]] for r in rows], dtype=torch.float64)
    species = torch.tensor([int(r[4]) for r in rows])
    return features, species


def seed000_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 000's training set: X (100, 2) float32, y (100, 1) float32 in {0, 1}.

    Sepal length and width, each row scaled to unit L2 norm (sklearn's `normalize`), the
    rows of species 0 and 1 only, as the seed prepares them.
    """
    features, species = load_iris()
    x = features[:, :2]
    x = x / x.norm(dim=1, keepdim=True)
    keep = species < 2
    return x[keep].float(), species[keep].float().reshape(-1, 1)
