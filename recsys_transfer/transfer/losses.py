"""Transfer losses ``l_transfer(e) = Dist({e_i}_S, {e_i}_T')`` (paper Eq. 2), one instance per field.

Each loss takes the embedding rows of the source items and of the target items that are present in the current
batch (``source: [Ns, D]``, ``target: [Nt, D]``) and returns a scalar; its gradient therefore lives on the touched
rows only, like the main loss's. When either side is empty the loss is 0 (no transfer signal this step).

* :class:`AdversarialLoss` — a discriminator with its own optimizer learns source (1) vs target (0); the target
  rows get the inverted-label term ``-mean log D(e_t)`` (ADDA, Tzeng et al. 2017, the network the paper uses for
  CTR; FRAGE, Gong et al. 2018, is the same game). The discriminator is updated by :meth:`update_discriminator`
  on detached rows, after the embeddings' transfer gradient of the step has been taken.
* :class:`MMDLoss` — squared Maximum Mean Discrepancy with a multi-bandwidth RBF kernel; bandwidths are
  multiples of the mean pairwise squared distance (detached), as in multi-kernel MMD (DAN).
* :class:`MomentLoss` — moment matching: ``||m_S - m_T||^2 + ||C_S - C_T||_F^2 / (4 D^2)`` (CORAL's scaling on
  the covariance term).
* :class:`CosRegLoss` — Gao et al. 2019: mean pairwise cosine similarity over all touched rows
  (its target domain is every item, its "source" the uniform spherical distribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransferLoss", "AdversarialLoss", "MMDLoss", "MomentLoss", "CosRegLoss", "make_transfer_loss"]


class TransferLoss(nn.Module):
    #: CosReg regularizes every touched row; the others compare source rows with target rows.
    uses_all_rows: bool = False

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError("use a concrete transfer loss")

    def update_discriminator(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Adversarial losses train their discriminator here; the others have nothing to learn."""


def _zero(x: torch.Tensor) -> torch.Tensor:
    return x.sum() * 0.0


class AdversarialLoss(TransferLoss):
    def __init__(self, dim: int, hidden: int = 64, lr: float = 1e-3, seed: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.discriminator = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)).to(dtype)
        if gen is not None:
            with torch.no_grad():
                for p in self.discriminator.parameters():
                    p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=gen) / p.shape[-1] ** 0.5)
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if len(target) == 0 or len(source) == 0:
            return _zero(torch.cat([source, target]))
        logits = self.discriminator(target).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # -mean log D(e_t)

    def discriminator_loss(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = self.discriminator(source).squeeze(1)
        t = self.discriminator(target).squeeze(1)
        return 0.5 * (F.binary_cross_entropy_with_logits(s, torch.ones_like(s))
                      + F.binary_cross_entropy_with_logits(t, torch.zeros_like(t)))

    def update_discriminator(self, source: torch.Tensor, target: torch.Tensor) -> None:
        if len(source) == 0 or len(target) == 0:
            return
        with torch.enable_grad():
            loss = self.discriminator_loss(source.detach(), target.detach())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()


class MMDLoss(TransferLoss):
    def __init__(self, multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> None:
        super().__init__()
        self.multipliers = tuple(multipliers)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if len(source) == 0 or len(target) == 0:
            return _zero(torch.cat([source, target]))
        x = torch.cat([source, target])
        d2 = torch.cdist(x, x).pow(2)  # [N, N]
        n = len(x)
        base = (d2.detach().sum() / max(n * n - n, 1)).clamp_min(1e-12)
        k = sum(torch.exp(-d2 / (2 * m * base)) for m in self.multipliers)
        ns = len(source)
        return k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()


class MomentLoss(TransferLoss):
    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if len(source) == 0 or len(target) == 0:
            return _zero(torch.cat([source, target]))
        mean_term = (source.mean(0) - target.mean(0)).pow(2).sum()
        if len(source) < 2 or len(target) < 2:
            return mean_term
        d = source.shape[1]
        cov_term = (torch.cov(source.T) - torch.cov(target.T)).pow(2).sum() / (4 * d * d)
        return mean_term + cov_term


class CosRegLoss(TransferLoss):
    uses_all_rows = True

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = torch.cat([source, target])
        n = len(x)
        if n < 2:
            return _zero(x)
        u = F.normalize(x, dim=1)
        s = u.sum(0)
        # sum_{i != j} cos(e_i, e_j) = ||sum_i u_i||^2 - sum_i ||u_i||^2, averaged over the N (N - 1) pairs
        return (s.dot(s) - (u * u).sum()) / (n * (n - 1))


def make_transfer_loss(name: str, dim: int, **kwargs) -> TransferLoss:
    """``adversarial`` | ``mmd`` | ``moment`` | ``cosreg``."""
    name = name.lower()
    if name in ("adversarial", "frage", "adda"):
        return AdversarialLoss(dim, **kwargs)
    if name == "mmd":
        return MMDLoss(**kwargs)
    if name in ("moment", "coral"):
        return MomentLoss(**kwargs)
    if name == "cosreg":
        return CosRegLoss(**kwargs)
    raise ValueError(f"unknown transfer loss {name!r}: adversarial, mmd, moment, cosreg")
