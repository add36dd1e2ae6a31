"""TorchRec embedding tables built from a prepared dataset's schema.

One table per sparse field, named ``t_<field>`` (the name the transfer plug-in and sharders use to reach it),
``num_embeddings = vocab_size`` from ``meta.json`` and sum pooling (fields are single-valued, so the pooled
value is the row itself; multi-valued fields would pool by sum).
"""

from __future__ import annotations

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_transfer.data.prepared import DatasetMeta


def table_name(field: str) -> str:
    return f"t_{field}"


def table_configs(meta: DatasetMeta, dim: int, fields: list[str] | None = None) -> list[EmbeddingBagConfig]:
    names = fields or meta.sparse_names
    return [
        EmbeddingBagConfig(
            name=table_name(f),
            embedding_dim=dim,
            num_embeddings=meta.field(f).vocab_size,
            feature_names=[f],
            pooling=PoolingType.SUM,
        )
        for f in names
    ]


def make_ebc(meta: DatasetMeta, dim: int, device: str = "cpu") -> EmbeddingBagCollection:
    """An EmbeddingBagCollection with one ``dim``-wide table per sparse field (``device='meta'`` for DMP)."""
    import torch

    return EmbeddingBagCollection(tables=table_configs(meta, dim), device=torch.device(device))
