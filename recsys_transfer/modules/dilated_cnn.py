"""The dilated residual block of NextItNet / GRec (PeterRec Eq. 3-4, Fig. 3 (a)) and a stack of them.

Shape symbols: B = batch size, L = padded sequence length, C = channels (= the item embedding width, PeterRec's k).

One block with dilation ``d`` (the official TF code's ``nextitnet_residual_block``)::

    F(E) = relu(LN_2(psi_2(relu(LN_1(psi_1(E))))))      (Eq. 4)
    H_DC(E) = E + F(E)                                  (Eq. 3)

``psi_1`` / ``psi_2``: dilated 1-D convolutions of kernel ``kernel`` (3) at rates ``d`` then ``2d`` (FACTS.md: the
official code doubles the rate for the second conv, so block dilations ``(1, 4)`` give conv rates 1, 2, 4, 8), with
bias. ``causal=True`` (NextItNet, Eq. 1; ``psi``): zero padding of ``(kernel - 1) * rate`` on the left only, so
the output at position t reads inputs at positions <= t. ``causal=False`` (GRec, Eq. 2; ``phi``): symmetric zero
padding of ``(kernel - 1) * rate / 2`` on each side (TF's ``SAME``; the kernel must be odd). LayerNorm over the
channels with ``eps = 1e-8`` as the official ``layer_norm``. Init (:func:`init_truncated_normal`): conv weights
truncated normal std 0.02 cut at 2 std (TF's ``truncated_normal_initializer(stddev=0.02)``), biases 0, LayerNorm
gamma 1 / beta 0.

Padding (a departure, needed because our sequences are jagged and batched): sequences are LEFT-padded with zero
vectors (:func:`left_padded`; the paper pads "with zero in the beginning of the sequence"), and ``mask [B, L, 1]``
(1 = a real position) zeroes every padded position of each conv's input and of the block's output. Then the
output at a real position is exactly that of the unpadded sequence (the convs' own zero padding stands where the
padding was) whatever the padding length: padding does not leak (tested). The official code instead feeds a
learned embedding of the padding id 0 through the network unmasked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys_transfer.errors import UserError

#: LayerNorm epsilon of the official code's ``layer_norm``
LN_EPS = 1e-8
#: std of the official code's truncated normal initializers (conv weights, item embeddings)
INIT_STD = 0.02


def init_truncated_normal(weight: torch.Tensor, std: float = INIT_STD) -> None:
    """TF's ``truncated_normal_initializer(stddev=std)``: normal, values beyond 2 std redrawn."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def left_padded(values: torch.Tensor, lengths: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Jagged rows -> left-padded dense rows: ``values [N, ...]`` (row b's ``lengths[b]`` entries in order, rows
    concatenated) -> ``[B, L, ...]`` with row b's entries at positions ``L - lengths[b] .. L - 1`` and zeros before
    them; ``L = length`` or ``max(lengths)`` (a device sync)."""
    B = len(lengths)
    lengths = lengths.long()
    L = int(lengths.max()) if length is None and B else (length or 0)
    out = values.new_zeros((B, L) + tuple(values.shape[1:]))
    if len(values) == 0:
        return out
    row = torch.repeat_interleave(torch.arange(B, device=values.device), lengths, output_size=len(values))  # [N]
    starts = torch.cumsum(lengths, 0) - lengths  # [B]: each row's first index in values
    col = torch.arange(len(values), device=values.device) - starts[row] + (L - lengths)[row]  # [N]
    out[row, col] = values
    return out


def padding_mask(lengths: torch.Tensor, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, L, 1]``: 1 at the real positions of left-padded rows (the last ``lengths[b]``), 0 at padding."""
    pos = torch.arange(length, device=lengths.device)  # [L]
    return (pos.unsqueeze(0) >= (length - lengths.long()).unsqueeze(1)).to(dtype).unsqueeze(2)  # [B, L, 1]


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class DilatedResidualBlock(nn.Module):
    """``H_DC(E) = E + F(E)`` (module docstring). ``forward(x [B, L, C], mask [B, L, 1] | None) -> [B, L, C]``;
    ``x`` must be zero at padded positions (the stack's input is masked), the output is too."""

    def __init__(self, channels: int, dilation: int, kernel: int = 3, causal: bool = True) -> None:
        super().__init__()
        if channels < 1 or dilation < 1 or kernel < 1:
            raise UserError(f"dilated block: channels, dilation and kernel must be >= 1, got {channels}, {dilation}, "
                            f"{kernel}")
        if not causal and kernel % 2 == 0:
            raise UserError(f"a non-causal dilated block needs an odd kernel (symmetric padding), got {kernel}")
        self.channels, self.dilation, self.kernel, self.causal = channels, dilation, kernel, causal
        self.conv1 = nn.Conv1d(channels, channels, kernel, dilation=dilation)
        self.ln1 = nn.LayerNorm(channels, eps=LN_EPS)
        self.conv2 = nn.Conv1d(channels, channels, kernel, dilation=2 * dilation)
        self.ln2 = nn.LayerNorm(channels, eps=LN_EPS)
        for conv in (self.conv1, self.conv2):
            init_truncated_normal(conv.weight)
            nn.init.zeros_(conv.bias)

    def dilated(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """``psi(x)`` (causal) or ``phi(x)`` (non-causal) of ``conv``: ``[B, L, C] -> [B, L, C]``.

        Computed as the 2-D convolution of ``[B, C, 1, L]`` by the ``[C, C, 1, kernel]`` kernel (the same weights,
        the same sums: RecBole's NextItNet does the same), not ``conv1d``: measured on CPU (one thread, B 256,
        L 50, C 64, 10 blocks, forward + backward), oneDNN's 1-D path goes through strided layout copies that the
        2-D one avoids, and the whole stack ran 1.4-1.5x faster (tests/test_sequence_models.py holds it to a
        hand-written float64 convolution)."""
        span = (self.kernel - 1) * conv.dilation[0]
        left = span if self.causal else span // 2
        h = F.pad(x.transpose(1, 2).unsqueeze(2), (left, span - left))  # [B, C, 1, left + L + right]
        y = F.conv2d(h, conv.weight.unsqueeze(2), conv.bias, dilation=(1, conv.dilation[0]))  # [B, C, 1, L]
        return y.squeeze(2).transpose(1, 2)  # [B, L, C]

    def psi1(self, x: torch.Tensor) -> torch.Tensor:
        return self.dilated(self.conv1, x)

    def psi2(self, x: torch.Tensor) -> torch.Tensor:
        return self.dilated(self.conv2, x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = _masked(torch.relu(self.ln1(self.psi1(x))), mask)  # [B, L, C]
        h = _masked(torch.relu(self.ln2(self.psi2(h))), mask)  # F(E), Eq. 4
        return x + h  # Eq. 3


class DilatedCNN(nn.Module):
    """A stack of :class:`DilatedResidualBlock`, one per entry of ``dilations`` (each block's rate ``d``; its convs
    run at ``d`` and ``2d``). Default ``(1, 4) * 4``: the official code's 8 blocks, conv rates 1, 2, 4, 8 repeated
    4 times. ``forward(x [B, L, C], mask [B, L, 1] | None) -> [B, L, C]`` (padded positions zero)."""

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 4) * 4, kernel: int = 3,
                 causal: bool = True) -> None:
        super().__init__()
        if not dilations:
            raise UserError("dilated CNN: dilations must name at least one block")
        self.causal = causal
        self.blocks = nn.ModuleList(DilatedResidualBlock(channels, d, kernel, causal) for d in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return run_blocks(self.blocks, x, mask)


def run_blocks(blocks, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x [B, L, C]`` masked, then through each of ``blocks`` in turn (each ``block(x, mask)``): the stack's
    forward, shared with PeterRec's patched blocks (models/peterrec.py)."""
    x = _masked(x, mask)
    for block in blocks:
        x = block(x, mask)
    return x
