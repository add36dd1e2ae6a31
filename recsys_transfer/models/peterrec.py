"""PeterRec (Yuan et al., SIGIR 2020): fine-tuning a pretrained NextItNet / GRec network on a target task with
model patches (Sec. 3.3, Eq. 5-12).

The network is the pretraining one (same parameter names, so :class:`~recsys_transfer.models.nextitnet.NextItNet`
or :class:`~recsys_transfer.models.grec.GRec` weights load by name; their output layer is the tied item table, so
nothing of theirs is skipped but the task) with model patches in every residual block
(:class:`recsys_transfer.modules.patches.PatchedResidualBlock`, Eq. 10-12, ``insertion`` b / c / d / e,
``bottleneck`` default C / 8 = the paper's k = 8d) and a new head per task on one user vector ``u [B, C]``:

* ``head="tcl"``: ``u = h_n``, the last position (Eq. 5; the data appends [TCL] = id 1, ``sequence.token: end``);
* ``head="first_last"``: ``u = h_0 + h_n``, the first real and the last position (Eq. 6, non-causal only; the data
  adds [TCS] at both ends, ``token: both``; refused for the causal backbone, Fig. 2 (b): h_0 sees nothing);
* ``head="mean"``: ``u = mean_i h_i`` over the real positions (Eq. 7 sums them; the mean differs by the
  per-row factor 1 / length, which keeps the head's input scale independent of the sequence length -- a departure).

Then ``o = u W + b`` (Eq. 5): a multiclass task gets ``[B, num_classes]``; a retrieval task over a target-label
vocabulary Y (``candidates: full``) gets full scores ``[B, |Y|]`` (|Y| from ``label_vocab[task name]`` or the
cold dataset's ``meta.source["num_target_classes"]``); a binary / regression task ``[B]``. The losses (BPR or CE,
Eq. 8) are the objective's.

Variants (what is trained; every other parameter has ``requires_grad=False``; the item table ``t_items`` stays in
the EmbeddingCollection, and a frozen one also gets ``requires_grad=False`` on its weight and its looked-up rows
are detached, so no row gradient is recorded for it; ``parameter_summary()["frozen_tables"]`` names it for
``rows.freeze``):

=============  =========================================================================  ==========
variant        trained                                                                    pretrained
=============  =========================================================================  ==========
peterrec       patches + heads (+ every LayerNorm when ``tune_layernorm``, FACTS.md)      yes
fine_all       everything: item table, convs, LayerNorms, heads (no patches)              yes
fine_cls       heads                                                                      yes
fine_last1     heads + the last conv layer (last block's conv2 and ln2; Fig. 5)           yes
fine_last2     heads + the last two conv layers (the last block)                          yes
peter_zero     as peterrec                                                                no
fine_zero      as fine_all                                                                no
=============  =========================================================================  ==========

"pretrained" is :attr:`pretrained`: whether the run must load a pretraining run's weights (``model.init_from``);
the model itself never loads anything. :meth:`trainable_parameters` and :meth:`parameter_summary` give the
trained names and counts and their share of FineAll's (every parameter of the same network without patches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.sequence import ITEMS, SequenceBackbone
from recsys_transfer.modules.dilated_cnn import init_truncated_normal, run_blocks
from recsys_transfer.modules.embedding import table_name
from recsys_transfer.modules.heads import full_candidates
from recsys_transfer.modules.patches import INSERTIONS, PatchedResidualBlock
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch

BACKBONES = {"nextitnet": True, "grec": False}  # name -> causal
VARIANTS = ("peterrec", "fine_all", "fine_cls", "fine_last1", "fine_last2", "peter_zero", "fine_zero")
HEADS = ("tcl", "first_last", "mean")
PATCHED = ("peterrec", "peter_zero")


class PeterRec(SequenceBackbone):
    def __init__(self, meta: DatasetMeta, backbone: str = "nextitnet", variant: str = "peterrec",
                 insertion: str = "d", bottleneck: int | None = None, head: str = "tcl", embedding_dim: int = 64,
                 dilations: Sequence[int] = (1, 4) * 4, kernel: int = 3, activation: str = "gelu",
                 tune_layernorm: bool = True, parallel_shortcut: bool = True,
                 label_vocab: dict[str, int] | None = None, tasks: tuple[TaskSpec, ...] | None = None) -> None:
        if backbone not in BACKBONES:
            raise UserError(f"peterrec: backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if variant not in VARIANTS:
            raise UserError(f"peterrec: variant must be one of {VARIANTS}, got {variant!r}")
        if head not in HEADS:
            raise UserError(f"peterrec: head must be one of {HEADS}, got {head!r}")
        if head == "first_last" and BACKBONES[backbone]:
            raise UserError("peterrec: head 'first_last' needs the non-causal backbone (grec): with causal "
                            "convolutions the first position sees only the [TCS] token (PeterRec Fig. 2 (b))")
        if insertion not in INSERTIONS:
            raise UserError(f"peterrec: insertion must be one of {INSERTIONS}, got {insertion!r}")
        super().__init__(meta, "peterrec", embedding_dim, dilations, kernel, BACKBONES[backbone], [ITEMS])
        self.backbone, self.variant, self.head, self.insertion = backbone, variant, head, insertion
        self.pretrained = variant not in ("peter_zero", "fine_zero")
        self.tasks = tuple(tasks or meta.tasks)
        if not self.tasks:
            raise UserError("peterrec: at least one task is required")
        self.patches = None
        if variant in PATCHED:
            self.patches = nn.ModuleList(
                PatchedResidualBlock(block, insertion, bottleneck, activation, parallel_shortcut)
                for block in self.cnn.blocks)
        self.heads = nn.ModuleDict({t.name: nn.Linear(embedding_dim, self._width(t, meta, label_vocab))
                                    for t in self.tasks})
        for layer in self.heads.values():
            init_truncated_normal(layer.weight)
            nn.init.zeros_(layer.bias)
        self._set_trainable(tune_layernorm)

    @staticmethod
    def _width(task: TaskSpec, meta: DatasetMeta, label_vocab: dict[str, int] | None) -> int:
        if task.kind == "multiclass":
            return task.num_classes
        if task.kind in ("binary", "regression"):
            return 1
        return full_candidates(task, meta, label_vocab, "peterrec")

    def _set_trainable(self, tune_layernorm: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        train: list[nn.Module] = [self.heads]
        last = self.cnn.blocks[-1]
        if self.variant in ("fine_all", "fine_zero"):
            train = [self]
        elif self.variant in PATCHED:
            train.append(self.patches)
            if tune_layernorm:
                train += [m for m in self.cnn.modules() if isinstance(m, nn.LayerNorm)]
        elif self.variant == "fine_last1":
            train += [last.conv2, last.ln2]
        elif self.variant == "fine_last2":
            train.append(last)
        for module in train:
            for p in module.parameters():
                p.requires_grad_(True)
        self.table_frozen = not self.table.weight.requires_grad

    # -- parameter accounting ------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, int]:
        """``{parameter name: numel}`` of every trained parameter (the item table's name included when trained)."""
        return {n: p.numel() for n, p in self.named_parameters() if p.requires_grad}

    def parameter_summary(self) -> dict:
        """``{"variant", "trained", "total", "fine_all", "share_of_fine_all", "frozen_tables"}``: trained
        parameters, all parameters, FineAll's trained parameters on the same network (every parameter but the
        patches) and the share (the paper's Table 3 caption)."""
        patches = sum(p.numel() for p in self.patches.parameters()) if self.patches is not None else 0
        total = sum(p.numel() for p in self.parameters())
        trained = sum(self.trainable_parameters().values())
        return {"variant": self.variant, "trained": trained, "total": total, "fine_all": total - patches,
                "share_of_fine_all": trained / (total - patches),
                "frozen_tables": [] if self.table.weight.requires_grad else [table_name(ITEMS)]}

    # -- forward -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, C] -> [B, L, C]``: the pretrained blocks, patched when the variant has patches."""
        return run_blocks(self.cnn.blocks if self.patches is None else self.patches, x, mask)

    def user_vector(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h [B, L, C]``, ``mask [B, L, 1]`` -> ``u [B, C]`` (Eq. 5-7, module docstring)."""
        if self.head == "tcl":
            return h[:, -1]  # left padding: the last position is every row's [TCL]
        if self.head == "first_last":
            first = (mask[:, :, 0] == 0).sum(dim=1)  # [B]: the first real position (= the number of pads)
            return h[torch.arange(len(h), device=h.device), first] + h[:, -1]
        return (h * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # [B, C]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        kjt, rows = self.lookup(batch.sparse)  # the collection's one call
        x, _, mask = self.embed_items(kjt, rows)  # [B, L, C], [B, L, 1]
        u = self.user_vector(self.encode(x, mask), mask)  # [B, C]
        out = {}
        for task in self.tasks:
            o = self.heads[task.name](u)  # [B, width]: o = u W + b (Eq. 5)
            out[task.name] = o.squeeze(1) if task.kind in ("binary", "regression") else o
        return out
