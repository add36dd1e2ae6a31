"""Transfer losses ``l_transfer(e) = Dist({e_i}_S, {e_i}_T')`` (paper Eq. 2), batched over tables.

A loss object serves every table (field) it was built for; the fused row update calls it once per backward
group with the touched rows of several tables, padded: ``x: [T, N, D]``, ``src, tgt: bool [T, N]`` (source rows /
target rows present in the batch), ``tables: int64 [T]`` (which of the loss's tables each slice is). It returns
the per-table losses ``[T]`` and, from :meth:`TransferLoss.grad`, their gradient with respect to ``x``; padded
and non-domain rows get zero gradient. A table with an empty side has loss 0 (no transfer signal this step).
Per-table results do not depend on which other tables share the call (there are no cross-table reductions),
so sharded and single-process runs agree.

* :class:`AdversarialLoss` — one discriminator per table with its own optimizer (lazy Adam over the tables present)
  learns source (1) vs target (0); the target rows get the inverted-label term ``-mean log D(e_t)`` (ADDA, Tzeng
  et al. 2017, the network the paper uses for CTR; FRAGE, Gong et al. 2018, is the same game). One forward serves
  both the rows' gradient and the discriminator's step, which uses the rows' current (pre-update) values.
* :class:`MMDLoss` — squared Maximum Mean Discrepancy with a multi-bandwidth RBF kernel; bandwidths are multiples
  of the mean pairwise squared distance (detached), as in multi-kernel MMD (DAN). O(N^2) per table: at most
  ``max_rows`` rows per side are used (an evenly spaced subset in id order, deterministic).
* :class:`MomentLoss` — moment matching: ``||m_S - m_T||^2 + ||C_S - C_T||_F^2 / (4 D^2)`` (CORAL's scaling on
  the covariance term; covariances with the ``n - 1`` normalizer, mean term only when a side has one row).
* :class:`CosRegLoss` — Gao et al. 2019: mean pairwise cosine similarity over all touched rows (its target domain is
  every item; ``src | tgt`` are the rows it regularizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys_transfer.optim.rowwise import adam_rows

__all__ = ["TransferLoss", "AdversarialLoss", "MMDLoss", "MomentLoss", "CosRegLoss", "make_transfer_loss"]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-table mean of the masked rows: ([T, D], counts [T])."""
    n = mask.sum(dim=1)
    m = (x * mask.unsqueeze(-1)).sum(dim=1) / n.clamp_min(1).unsqueeze(-1).to(x.dtype)
    return m, n


class TransferLoss(nn.Module):
    #: CosReg regularizes every touched row; the others compare source rows with target rows.
    uses_all_rows: bool = False

    def __init__(self, num_tables: int) -> None:
        super().__init__()
        self.num_tables = num_tables

    def forward(self, x: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        raise TypeError("use a concrete transfer loss")  # pragma: no cover

    def table_state(self, table: int) -> dict[str, torch.Tensor]:
        """The learned state that belongs to table ``table`` (a copy; checkpoints save it by table name, so it
        can be loaded under another sharding): none for a loss without learnable parts."""
        return {}

    def load_table_state(self, table: int, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`table_state` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no per-table state, got {sorted(state)}")

    def grad(self, x: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor,
             tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-table losses [T], d sum(losses) / dx [T, N, D]); learnable parts take their step here."""
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            values = self(leaf, src, tgt, tables)
            total = values.sum()
            g = torch.autograd.grad(total, leaf)[0] if total.requires_grad else torch.zeros_like(leaf)
        return values.detach(), g


class AdversarialLoss(TransferLoss):
    def __init__(self, num_tables: int, dim: int, hidden: int = 32, lr: float = 1e-3, seed: int = 0,
                 betas: tuple[float, float] = (0.5, 0.999), dtype: torch.dtype = torch.float32,
                 update_every: int = 1) -> None:
        super().__init__(num_tables)
        self.lr, self.betas = lr, betas
        # transfer.disc_every: the discriminators take their step on every k-th call only; the calls between
        # skip the discriminator's gradient (two of the four bmm's over [T, N, H]) and its Adam step
        self.update_every, self.calls = int(update_every), 0
        self.dim, self.hidden = dim, hidden
        # every table's discriminator is ONE row of a [T, K] buffer: [w1 (D x H, row-major); b1; w2; b2], so the
        # augmented first layer [w1; b1] is a [D + 1, H] view and one lazy Adam call updates all parameters
        k = (dim + 1) * hidden + hidden + 1
        packed = torch.zeros(num_tables, k, dtype=dtype)
        w1, b1, w2, b2 = self._views(packed)
        for t in range(num_tables):  # each table's discriminator from its own seed: independent of grouping
            gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
            w1[t].uniform_(-1, 1, generator=gen).mul_(dim ** -0.5)
            w2[t].uniform_(-1, 1, generator=gen).mul_(hidden ** -0.5)
        self.w1, self.b1, self.w2, self.b2 = (nn.Parameter(v) for v in (w1, b1, w2, b2))
        self._packed = packed  # not a buffer: the parameters are its views (state-dict keys w1, b1, w2, b2)
        self._adam = (torch.zeros_like(packed), torch.zeros_like(packed), torch.zeros(num_tables, dtype=torch.int64))
        self._buffers_ws: dict[tuple, torch.Tensor] = {}  # see _workspace

    def _views(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d, h = self.dim, self.hidden
        return (packed[:, : d * h].view(-1, d, h), packed[:, d * h : (d + 1) * h], packed[:, (d + 1) * h : (d + 2) * h],
                packed[:, -1])

    def _packed_params(self) -> torch.Tensor:
        """The [T, K] buffer the parameters view; re-packed if something (``.to()``, assigning ``.data``) gave
        them their own storage."""
        buf = self._packed
        views = self._views(buf)
        if all(p.data_ptr() == v.data_ptr() and p.dtype == v.dtype and p.device == v.device
               for p, v in zip(self.parameters(), views)):
            return buf
        buf = torch.empty((self.num_tables, buf.shape[1]), dtype=self.w1.dtype, device=self.w1.device)
        with torch.no_grad():
            for p, v in zip(list(self.parameters()), self._views(buf)):
                v.copy_(p)
                p.data = v
        self._packed = buf
        self._adam = tuple(t.to(buf.device, buf.dtype if t.dtype != torch.int64 else t.dtype) for t in self._adam)
        return buf

    def table_state(self, table: int) -> dict[str, torch.Tensor]:
        """Table ``table``'s discriminator (its row of the packed ``[T, K]`` buffer) and its lazy-Adam state."""
        m, v, step = self._adam
        return {"discriminator": self._packed_params()[table].clone(), "adam_exp_avg": m[table].clone(),
                "adam_exp_avg_sq": v[table].clone(), "adam_step": step[table].clone()}

    @torch.no_grad()
    def load_table_state(self, table: int, state: dict[str, torch.Tensor]) -> None:
        m, v, step = self._adam
        expected = {"discriminator", "adam_exp_avg", "adam_exp_avg_sq", "adam_step"}
        if set(state) != expected:
            raise ValueError(f"adversarial loss state: expected {sorted(expected)}, got {sorted(state)}")
        self._packed_params()[table].copy_(state["discriminator"])
        m[table].copy_(state["adam_exp_avg"])
        v[table].copy_(state["adam_exp_avg_sq"])
        step[table].copy_(state["adam_step"])

    def logits(self, x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Discriminator logits ``[T, N]`` of each table's own discriminator."""
        h = torch.baddbmm(self.b1[tables].unsqueeze(1), x, self.w1[tables])  # [T, N, H]
        h = F.leaky_relu(h, 0.2)
        return (h * self.w2[tables].unsqueeze(1)).sum(-1) + self.b2[tables].unsqueeze(1)

    @staticmethod
    def _terms(z: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor):
        ns = src.sum(1).clamp_min(1).to(z.dtype)
        nt = tgt.sum(1).clamp_min(1).to(z.dtype)
        active = (src.any(1) & tgt.any(1)).to(z.dtype)
        adv = (F.softplus(-z) * tgt).sum(1) / nt * active  # -mean_T log D(e)
        disc = 0.5 * ((F.softplus(-z) * src).sum(1) / ns + (F.softplus(z) * tgt).sum(1) / nt) * active
        return adv, disc, active

    def forward(self, x, src, tgt, tables):
        return self._terms(self.logits(x, tables), src, tgt)[0]

    def discriminator_loss(self, x, src, tgt, tables) -> torch.Tensor:
        return self._terms(self.logits(x, tables), src, tgt)[1]

    def _workspace(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer (dtype and device of ``like``): the [T, N, H] intermediates are ~10 MB per step, and
        fresh buffers of that size are page-faulted in by the OS on every step (that alone tripled the cost of
        :meth:`grad` on CPU)."""
        n = 1
        for d in shape:
            n *= d
        key = (name, like.dtype, like.device)
        buf = self._buffers_ws.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers_ws[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def grad(self, x, src, tgt, tables):
        """One forward and a hand-written backward of the 2-layer discriminator (no autograd graph):
        ``d adv / dx`` for the rows and ``d disc / d params`` for the discriminator's lazy Adam step.
        ``test_adversarial_manual_gradients_match_autograd`` checks both against autograd.

        Cost: the [T, N, H] tensors are the expensive part (memory-bound: each pass over them is a pass over
        ~10 MB), so there are only two of them (pre-activation, turned into the activation in place, and
        ``G = dz/da`` per unit of ``dz``), both in reused buffers, and as few passes as possible: the bias b1 is
        a row of the augmented weight [w1; b1] against rows [x, 1], so it costs no pass of its own, and its
        gradient comes out of the same bmm as w1's; every per-row scalar (``dz``) is applied on the [T, N, D]
        or [T, 1, N] side of a bmm instead."""
        with torch.no_grad():
            t_, n_, d_ = x.shape
            h_ = self.hidden
            packed = self._packed_params()
            par = packed.index_select(0, tables)  # [T, K]: every parameter of these tables in one gather
            wa = par[:, : (d_ + 1) * h_].view(t_, d_ + 1, h_)  # [w1; b1]
            w1 = wa[:, :d_]
            w2, b2 = par[:, (d_ + 1) * h_ : (d_ + 2) * h_], par[:, -1]
            xa = self._workspace("x1", (t_, n_, d_ + 1), x)  # [x, 1]
            xa[..., :d_].copy_(x)
            xa[..., d_].fill_(1.0)
            shape = (t_, n_, h_)
            a = torch.bmm(xa, wa, out=self._workspace("a", shape, x))  # [T, N, H] pre-activation
            # G[t, n, :] = d z / d a = w2 * leaky_relu'(a): the slope 1 or 0.2 per unit, from a before it is activated
            g_act = torch.ops.aten.leaky_relu_backward.grad_input(
                w2.unsqueeze(1).expand(shape), a, 0.2, False, grad_input=self._workspace("G", shape, x))
            h = F.leaky_relu_(a, 0.2)  # a's buffer now holds the activation
            # z^T = w2^T h^T ([1, H] x [H, N]: a gemm over h in place; h @ w2 as a gemv is ~4x slower on CPU)
            z = torch.baddbmm(b2.view(t_, 1, 1), w2.unsqueeze(1), h.transpose(1, 2)).squeeze(1)  # [T, N]
            srcf, tgtf = src.to(x.dtype), tgt.to(x.dtype)
            ns = srcf.sum(1, keepdim=True)
            nt = tgtf.sum(1, keepdim=True)
            active = (ns > 0) & (nt > 0)  # [T, 1]: a table with an empty side has no transfer signal
            inv_t = torch.where(active, 1.0 / nt.clamp_min(1), 0.0)
            half_inv_s = torch.where(active, 0.5 / ns.clamp_min(1), 0.0)
            sig = torch.sigmoid(z)
            sm1 = sig - 1
            tw = tgtf * inv_t  # the weight of each target row in the means over T
            adv = (F.softplus(-z) * tw).sum(1)
            # d softplus(-z)/dz = sigmoid(z) - 1 ; d softplus(z)/dz = sigmoid(z)
            dz_adv = sm1 * tw  # [T, N]
            dz_disc = sm1 * srcf * half_inv_s + sig * tw * 0.5
            # d adv / dx = dz_adv * (G @ w1^T); the discriminator's gradients contract dz_disc with G and h
            gx = torch.bmm(g_act, w1.transpose(1, 2)).mul_(dz_adv.unsqueeze(-1))  # [T, N, D]
            update = self.calls % self.update_every == 0
            self.calls += 1
            if not update:
                return adv, gx
            xd = torch.mul(xa, dz_disc.unsqueeze(-1), out=self._workspace("xd", xa.shape, x))
            grads = torch.cat([torch.bmm(xd.transpose(1, 2), g_act).view(t_, -1),  # [w1; b1]  [T, (D + 1) H]
                               torch.bmm(dz_disc.unsqueeze(1), h).squeeze(1),  # w2 [T, H]
                               dz_disc.sum(1, keepdim=True)], 1)  # b2 [T, 1]
        live = active.squeeze(1)
        if bool(live.any()):  # lazy Adam over the tables that had both sides this step
            m, v, step = self._adam
            adam_rows(packed, tables[live], grads[live], m, v, step, lr=self.lr, beta1=self.betas[0],
                      beta2=self.betas[1], eps=1e-8, weight_decay=0.0)
        return adv, gx


class MMDLoss(TransferLoss):
    def __init__(self, num_tables: int, multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0),
                 max_rows: int = 1024) -> None:
        super().__init__(num_tables)
        self.multipliers = tuple(multipliers)
        self.max_rows = max_rows

    def _subset(self, idx: torch.Tensor) -> torch.Tensor:
        if len(idx) <= self.max_rows:
            return idx
        pick = torch.linspace(0, len(idx) - 1, self.max_rows).round().long()
        return idx[pick]

    def forward(self, x, src, tgt, tables):
        out = []
        for k in range(x.shape[0]):
            s = self._subset(torch.nonzero(src[k]).squeeze(1))
            t = self._subset(torch.nonzero(tgt[k]).squeeze(1))
            if len(s) == 0 or len(t) == 0:
                out.append(x[k].sum() * 0.0)
                continue
            z = x[k][torch.cat([s, t])]
            d2 = torch.cdist(z, z).pow(2)
            n = len(z)
            base = (d2.detach().sum() / max(n * n - n, 1)).clamp_min(1e-12)
            kern = sum(torch.exp(-d2 / (2 * m * base)) for m in self.multipliers)
            ns = len(s)
            out.append(kern[:ns, :ns].mean() + kern[ns:, ns:].mean() - 2 * kern[:ns, ns:].mean())
        return torch.stack(out)


class MomentLoss(TransferLoss):
    def forward(self, x, src, tgt, tables):
        ms, ns = _masked_mean(x, src)
        mt, nt = _masked_mean(x, tgt)
        active = ((ns > 0) & (nt > 0)).to(x.dtype)
        mean_term = (ms - mt).pow(2).sum(-1)
        d = x.shape[-1]

        def cov(m, mask, n):
            c = (x - m.unsqueeze(1)) * mask.unsqueeze(-1)
            return c.transpose(1, 2) @ c / (n - 1).clamp_min(1).to(x.dtype).view(-1, 1, 1)

        has_cov = ((ns >= 2) & (nt >= 2)).to(x.dtype)
        cov_term = (cov(ms, src, ns) - cov(mt, tgt, nt)).pow(2).sum((1, 2)) / (4 * d * d)
        return (mean_term + has_cov * cov_term) * active


class CosRegLoss(TransferLoss):
    uses_all_rows = True

    def forward(self, x, src, tgt, tables):
        rows = (src | tgt).unsqueeze(-1).to(x.dtype)
        u = F.normalize(x, dim=-1) * rows
        n = rows.squeeze(-1).sum(1)
        s = u.sum(1)
        # sum_{i != j} cos(e_i, e_j) = ||sum_i u_i||^2 - sum_i ||u_i||^2, averaged over the N (N - 1) pairs
        pairs = (s * s).sum(-1) - (u * u).sum((1, 2))
        return torch.where(n >= 2, pairs / (n * (n - 1)).clamp_min(1), torch.zeros_like(pairs))


def make_transfer_loss(name: str, num_tables: int, dim: int, **kwargs) -> TransferLoss:
    """``adversarial`` | ``mmd`` | ``moment`` | ``cosreg``."""
    name = name.lower()
    if name in ("adversarial", "frage", "adda"):
        return AdversarialLoss(num_tables, dim, **kwargs)
    kwargs.pop("seed", None)
    if name == "mmd":
        return MMDLoss(num_tables, **kwargs)
    if name in ("moment", "coral"):
        return MomentLoss(num_tables, **kwargs)
    if name == "cosreg":
        return CosRegLoss(num_tables, **kwargs)
    raise ValueError(f"unknown transfer loss {name!r}: adversarial, mmd, moment, cosreg")
