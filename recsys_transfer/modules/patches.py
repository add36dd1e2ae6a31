"""PeterRec's model patch (Eq. 10, Fig. 3 (f)) and the patched residual block (Eq. 11-12, Fig. 3 (b)-(e)).

Shape symbols: B = batch size, L = padded sequence length, C = channels (the paper's k), K = bottleneck (the
paper's d; default C / 8, the paper's k = 8d, footnote 3).

Model patch::

    H_MP(E) = E + phi_up(act(phi_down(E)))              (Eq. 10)

``phi_down`` / ``phi_up``: the paper's 1x1 convolutions, i.e. position-wise ``Linear(C, K)`` / ``Linear(K, C)``
with bias. ``act``: GELU (tanh approximation), as the official code's ``get_mp`` (FACTS.md); the paper writes
sigma, which Eq. 4 defines as ReLU (``activation="relu"`` gives that). The official ``get_mp`` sums ``cardinality``
parallel bottlenecks of width ``C / (4 * cardinality)``, which is one bottleneck of width ``C / 4`` (the
activation is element-wise); we follow the paper's width ``K = C / 8``. Init: ``phi_down`` truncated normal std
0.02 (the official 1x1 conv init), ``phi_up`` ZERO (weight and bias), so ``H_MP`` is exactly the identity at init
(the issue's "initialized near identity"; the official code initializes ``phi_up`` like every conv).

Patched block (Eq. 11: ``H~_DC(E) = E + F~(E)``), with ``psi`` the pretrained block's dilated convs::

    (b) serial:   F~ = relu(LN_2(MP_2(psi_2(relu(LN_1(MP_1(psi_1(E))))))))
    (c) serial:   F~ = MP(relu(LN_2(psi_2(relu(LN_1(psi_1(E)))))))
    (d) parallel: F~ = relu(LN_2(MP_2(E~) + psi_2(E~))),   E~ = relu(LN_1(MP_1(E) + psi_1(E)))
    (e) parallel: F~ = MP_2(E~) + relu(LN_2(psi_2(E~))),   E~ = MP_1(E) + relu(LN_1(psi_1(E)))

(Eq. 12 exactly; (d) is the official ``peter_2mp_parallel``, (b) ``peter_2mp_serial``, (c) ``peter_mp_serial``.)
With ``phi_up = 0`` the serial blocks (b), (c) equal the pretrained block at init. The parallel ones do not: in
Eq. 12 the parallel ``MP(E) = E + ...`` carries its own shortcut, so at init (d) computes ``LN_1(E + psi_1(E))``
where the pretrained block computes ``LN_1(psi_1(E))`` (the official code does the same). ``parallel_shortcut=False``
(an option, not the paper's) adds only the patch's branch ``phi_up(act(phi_down(.)))`` beside the conv, which makes
(d) and (e) exact identities of the pretrained block at init. Measured on the cold task (ML-1M-partial, 3 seeds,
benchmarks/results/peterrec_patch_init.md): (d) with Eq. 12's shortcut HR@5 47.8, below FineCLS; without it 56.3,
as serial (b) 56.5 and above FineAll 54.6. The PeterRec pipelines set ``parallel_shortcut: false``; the default
here stays the paper's.

The patched block WRAPS the pretrained :class:`~recsys_transfer.modules.dilated_cnn.DilatedResidualBlock`: it
reads that block's convs and LayerNorms (the same Parameters, never copies), held outside this module's own
parameter tree so that a model owning both keeps one name per pretrained weight (``cnn.blocks.i.conv1.weight``,
what a pretrained checkpoint holds) and this module's parameters are the patches only. Padding is masked as in the
pretrained block (every tensor a conv reads, and ``F~``, is zero at padded positions).
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.errors import UserError
from recsys_transfer.modules.dilated_cnn import DilatedResidualBlock, _masked, init_truncated_normal

INSERTIONS = ("b", "c", "d", "e")
ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


class ModelPatch(nn.Module):
    """``H_MP(E) = E + phi_up(act(phi_down(E)))`` (Eq. 10; module docstring): ``[..., C] -> [..., C]``."""

    def __init__(self, channels: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        if channels < 1 or bottleneck < 1:
            raise UserError(f"model patch: channels and bottleneck must be >= 1, got {channels}, {bottleneck}")
        if activation not in ACTIVATIONS:
            raise UserError(f"model patch: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.down = nn.Linear(channels, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, channels)
        init_truncated_normal(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``phi_up(act(phi_down(x)))``: ``[..., C] -> [..., K] -> [..., C]``."""
        return self.up(self.act(self.down(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class PatchedResidualBlock(nn.Module):
    """A pretrained block with model patches inserted per ``insertion`` (module docstring, Eq. 11-12).
    ``forward(x [B, L, C], mask [B, L, 1] | None) -> [B, L, C]``. Own parameters: the patches (``mp1``, ``mp2``;
    insertion (c) has the one ``mp``); ``self.block`` is the wrapped pretrained block, not a submodule."""

    def __init__(self, block: DilatedResidualBlock, insertion: str = "d", bottleneck: int | None = None,
                 activation: str = "gelu", parallel_shortcut: bool = True) -> None:
        super().__init__()
        if insertion not in INSERTIONS:
            raise UserError(f"model patch insertion must be one of {INSERTIONS} (PeterRec Fig. 3), got {insertion!r}")
        C = block.channels
        K = bottleneck if bottleneck is not None else max(1, C // 8)
        object.__setattr__(self, "block", block)  # outside the module tree: see the class docstring
        self.insertion, self.parallel_shortcut = insertion, parallel_shortcut
        if insertion == "c":
            self.mp = ModelPatch(C, K, activation)
        else:
            self.mp1 = ModelPatch(C, K, activation)
            self.mp2 = ModelPatch(C, K, activation)

    def _beside(self, mp: ModelPatch, x: torch.Tensor) -> torch.Tensor:
        """A parallel patch's term: ``H_MP(x)`` (Eq. 12) or, without the shortcut, its branch only."""
        return mp(x) if self.parallel_shortcut else mp.branch(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        blk, ins = self.block, self.insertion
        if ins == "b":
            h = _masked(torch.relu(blk.ln1(self.mp1(blk.psi1(x)))), mask)  # [B, L, C]
            f = torch.relu(blk.ln2(self.mp2(blk.psi2(h))))
        elif ins == "c":
            h = _masked(torch.relu(blk.ln1(blk.psi1(x))), mask)
            f = self.mp(torch.relu(blk.ln2(blk.psi2(h))))
        elif ins == "d":
            e = _masked(torch.relu(blk.ln1(self._beside(self.mp1, x) + blk.psi1(x))), mask)  # E~
            f = torch.relu(blk.ln2(self._beside(self.mp2, e) + blk.psi2(e)))
        else:  # e
            e = _masked(self._beside(self.mp1, x) + torch.relu(blk.ln1(blk.psi1(x))), mask)  # E~
            f = self._beside(self.mp2, e) + torch.relu(blk.ln2(blk.psi2(e)))
        return x + _masked(f, mask)  # Eq. 11
