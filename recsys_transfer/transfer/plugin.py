"""The transfer plug-in: one switch (``mode``) turns any model built on TorchRec tables (EmbeddingBagCollection
or EmbeddingCollection, plain or sharded by DistributedModelParallel) into B / +T / +Ours / select / lexico
training, without touching the model's code.

    plugin = TransferPlugin(model, meta, TransferConfig(mode="+Ours", fields=("zip",)), domains=selection)
    dense_opt = torch.optim.Adam(plugin.dense_parameters(), lr=1e-3)
    for batch in loader:
        loss = bce(model(batch)[label], batch.labels[label])
        dense_opt.zero_grad()
        plugin.backward(loss)        # tables are updated inside this call, touched rows only
        dense_opt.step()             # theta: ordinary optimizer on l_main (Algorithm 1, first line)

Modes (paper Sec. 5 notation): ``B`` main loss only; ``+T`` ``l_main + lam * l_transfer`` with the frequency
domains (S = head, T = tail); ``select`` the same with the selective target domain T'_eta (Eq. 3); ``lexico`` the
item-wise barrier (Algorithm 1) on the frequency domains; ``+Ours`` barrier + selective domain. Every table of
the model, transferred or not, is updated by the same row optimizer inside backward, so modes differ only in the
update direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.optim.rowwise import RowOptimizer, make_row_optimizer
from recsys_transfer.transfer.barrier import MODES, BarrierContext, BarrierTBE, TableRule, attach_ebc, attach_ec
from recsys_transfer.transfer.losses import TransferLoss, make_transfer_loss

SELECTIVE_MODES = ("+Ours", "select")


@dataclass(frozen=True)
class TransferConfig:
    mode: str = "B"
    loss: str = "adversarial"
    fields: tuple[str, ...] = ()  # fields under transfer; empty = every field with > min_vocab rows
    min_vocab: int = 100  # the paper's Criteo rule: transfer on fields with more than 100 values
    lam: float = 1e-2
    alpha: float = 2.0
    optimizer: str = "adam"
    lr: float = 1e-3
    optimizer_kwargs: dict = field(default_factory=dict)
    loss_kwargs: dict = field(default_factory=dict)
    embedding_module: str = "embedding"  # attribute name of the model's EBC whose tables carry the transfer
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"transfer mode must be one of {MODES}, got {self.mode!r}")
        if self.lam < 0 or self.alpha <= 0:
            raise ValueError("lam must be >= 0 and alpha > 0")

    def transfer_fields(self, meta: DatasetMeta) -> list[str]:
        if self.fields:
            for f in self.fields:
                meta.field(f)  # raises a clear error for an unknown field
            return list(self.fields)
        return [f.name for f in meta.sparse if f.vocab_size > self.min_vocab]


def _is_transfer_ebc(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


class TransferPlugin:
    """Attach to ``model`` (plain or wrapped by DistributedModelParallel); see module docstring.

    ``domains``: per field, the selective target domain as a bool array over ids (required for ``+Ours`` and
    ``select``; see :mod:`recsys_transfer.transfer.domains`). Source = the field's head ids from ``meta.json``.
    """

    def __init__(self, model: nn.Module, meta: DatasetMeta, config: TransferConfig,
                 domains: dict[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.meta = meta
        self.config = config
        self.fields = config.transfer_fields(meta) if config.mode != "B" else []
        if config.mode in SELECTIVE_MODES:
            missing = [f for f in self.fields if not domains or f not in domains]
            if missing:
                raise UserError(f"mode {config.mode!r} needs the selective target domain of {missing}: "
                                "run `recsys-transfer select` (or pass domains=)")
        self.domains = domains or {}
        self.context = BarrierContext()
        self.rules: dict[str, TableRule] = {}
        self.losses: dict[int, TransferLoss] = {}  # one batched loss per embedding width
        self.table_weights: list[torch.Tensor] = []
        self._attach()
        self.optimizer: RowOptimizer = make_row_optimizer(config.optimizer, self.table_weights, lr=config.lr,
                                                          **config.optimizer_kwargs)
        for rule in self.rules.values():
            rule.optimizer = self.optimizer

    # -- building the rules ---------------------------------------------------------------------------------------
    def _loss_for(self, dim: int) -> TransferLoss:
        if dim not in self.losses:
            kwargs = dict(self.config.loss_kwargs)
            kwargs.setdefault("seed", self.config.seed)
            self.losses[dim] = make_transfer_loss(self.config.loss, len(self.meta.sparse_names), dim, **kwargs)
        return self.losses[dim]

    def _rule(self, key: str, field_name: str, dim: int, transfer: bool) -> TableRule:
        mode = self.config.mode if transfer else "B"
        if mode == "B":
            return TableRule(key, "B", self.context)
        f = self.meta.field(field_name)
        source = torch.from_numpy(f.head_mask())
        target = (torch.from_numpy(np.asarray(self.domains[field_name], dtype=bool)) if mode in SELECTIVE_MODES
                  else torch.from_numpy(f.tail_mask()))
        if len(target) != f.vocab_size:
            raise UserError(f"target domain of {field_name!r} has {len(target)} entries, the field has {f.vocab_size} ids")
        return TableRule(key, mode, self.context, loss=self._loss_for(dim),
                         loss_index=self.meta.sparse_names.index(field_name), source_mask=source,
                         target_mask=target & ~source, lam=self.config.lam, alpha=self.config.alpha)

    def _attach(self) -> None:
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        found = False
        for path, module in list(self.model.named_modules()):
            transfer_ebc = _is_transfer_ebc(path, self.config.embedding_module)
            if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
                found |= transfer_ebc
                self._attach_unsharded(path, module, transfer_ebc)
            elif isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)):
                found |= transfer_ebc
                self._attach_sharded(path, module, transfer_ebc)
        if self.fields and not found:
            raise UserError(f"the model has no EmbeddingBagCollection named {self.config.embedding_module!r}")

    def _field_of(self, config) -> str:
        names = list(config.feature_names)
        if len(names) != 1:
            raise UserError(f"table {config.name} serves {len(names)} features; the barrier needs one field per table")
        return names[0]

    def _attach_unsharded(self, path: str, ebc: nn.Module, transfer_ebc: bool) -> None:
        pooled = isinstance(ebc, EmbeddingBagCollection)
        rules = {}
        for cfg in (ebc.embedding_bag_configs() if pooled else ebc.embedding_configs()):
            fname = self._field_of(cfg)
            key = f"{path}.{cfg.name}"
            rules[cfg.name] = self.rules[key] = self._rule(key, fname, cfg.embedding_dim,
                                                           transfer_ebc and fname in self.fields)
        self.table_weights.extend((attach_ebc if pooled else attach_ec)(ebc, rules))

    def _attach_sharded(self, path: str, sebc: nn.Module, transfer_ebc: bool) -> None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

        for lookup in sebc._lookups:
            inner = getattr(lookup, "module", lookup)  # DDP-wrapped lookups (data parallel) are not supported
            if not hasattr(inner, "_emb_modules"):
                raise UserError(f"{path}: unsupported sharded lookup {type(inner).__name__} (use table-wise or row-wise sharding)")
            for emb in inner._emb_modules:
                rules, offsets, groups = [], [], []
                for t in emb._config.embedding_tables:
                    if t.local_cols != t.embedding_dim:
                        raise UserError(f"table {t.name}: column-wise sharding splits rows' dimensions; the barrier "
                                        "needs whole rows (use table-wise or row-wise sharding)")
                    fname = self._field_of(t)
                    key = f"{path}.{t.name}"
                    rule = self.rules[key] = self._rule(key, fname, t.embedding_dim, transfer_ebc and fname in self.fields)
                    rules.append(rule)
                    offsets.append(int(t.local_metadata.shard_offsets[0]) if t.local_metadata is not None else 0)
                    groups.append(emb._pg if t.local_rows != t.num_embeddings else None)
                pooling = getattr(emb, "_pooling", PoolingMode.NONE)  # sequence (EC) lookups have no pooling
                mode = {PoolingMode.SUM: "sum", PoolingMode.MEAN: "mean"}.get(pooling, "none")
                tbe = BarrierTBE(emb._emb_module, rules, offsets, emb._feature_table_map,
                                 [mode] * len(emb._feature_table_map), groups)
                emb._emb_module = tbe
                self.table_weights.extend(tbe.weights)

    # -- training API ---------------------------------------------------------------------------------------------
    def dense_parameters(self) -> list[nn.Parameter]:
        """Model parameters outside the embedding collections (theta): give these to the dense optimizer."""
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        from torchrec.distributed.embedding import ShardedEmbeddingCollection

        table_ids = {id(w) for w in self.table_weights}
        for module in self.model.modules():
            if isinstance(module, (EmbeddingBagCollection, ShardedEmbeddingBagCollection, EmbeddingCollection,
                                   ShardedEmbeddingCollection)):
                table_ids |= {id(p) for p in module.parameters()}
        return [p for p in self.model.parameters() if id(p) not in table_ids and p.requires_grad]

    def set_main_loss(self, loss: torch.Tensor) -> None:
        """l_main for the barrier phi_i; averaged over ranks so every shard uses the global-batch loss."""
        value = loss.detach().to(torch.float64).reshape(1).clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        self.context.main_loss = value[0]

    def backward(self, loss: torch.Tensor) -> None:
        self.set_main_loss(loss)
        loss.backward()

    def stats(self) -> dict[str, dict]:
        return {k: vars(r.stats) for k, r in self.rules.items() if r.mode != "B"}
