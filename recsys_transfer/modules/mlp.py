"""Multi-layer perceptron block: ``Linear -> [BatchNorm] -> activation -> Dropout`` per hidden layer."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """``MLP(in_dim, (400, 400, 400), out_dim=1)``; ``out_dim=None`` ends with the last hidden layer."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] | list[int], out_dim: int | None = 1,
                 dropout: float = 0.0, batch_norm: bool = False, activation: type[nn.Module] = nn.ReLU) -> None:
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            layers.append(nn.Linear(prev, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        if out_dim is not None:
            layers.append(nn.Linear(prev, out_dim))
        super().__init__(*layers)
        self.out_dim = out_dim if out_dim is not None else prev
