"""Model names -> classes, and :func:`build_model`, which rejects unknown names and unknown keyword arguments.

Example::

    model = build_model("deepfm", meta, embedding_dim=16, hidden=(100, 100))
    build_model("deepfm", meta, embeding_dim=16)  # UserError: ... unknown argument 'embeding_dim' ...
"""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.autoint import AutoInt
from recsys_transfer.models.deepfm import DeepFM
from recsys_transfer.models.esmm import ESMM
from recsys_transfer.models.fdn import FDN
from recsys_transfer.models.fm import FM
from recsys_transfer.models.grec import GRec
from recsys_transfer.models.lr import LR
from recsys_transfer.models.mmoe import MMoE
from recsys_transfer.models.nextitnet import NextItNet
from recsys_transfer.models.peterrec import PeterRec
from recsys_transfer.models.ple import CGC, PLE
from recsys_transfer.models.shared_bottom import SharedBottom
from recsys_transfer.models.single_task import SingleTask

#: CTR models (one network, per-task output units)
CTR_MODELS: dict[str, type[nn.Module]] = {"lr": LR, "fm": FM, "deepfm": DeepFM, "autoint": AutoInt}
#: multi-task models (models/multitask.py: one shared embedding collection, one output per task)
MULTITASK_MODELS: dict[str, type[nn.Module]] = {
    "single_task": SingleTask, "shared_bottom": SharedBottom, "mmoe": MMoE, "cgc": CGC, "ple": PLE, "esmm": ESMM,
    "fdn": FDN}
#: sequence models (models/sequence.py: an EmbeddingCollection over the ``items`` list field and a dilated CNN)
SEQUENCE_MODELS: dict[str, type[nn.Module]] = {"nextitnet": NextItNet, "grec": GRec, "peterrec": PeterRec}
MODELS: dict[str, type[nn.Module]] = {**CTR_MODELS, **MULTITASK_MODELS, **SEQUENCE_MODELS}


def model_arguments(name: str) -> list[str]:
    """The keyword arguments model ``name`` accepts in ``model.params`` (its constructor's parameters after
    ``meta``, without ``tasks``: those come from the run's task specs, nor private ``_`` ones)."""
    params = list(inspect.signature(MODELS[name].__init__).parameters.values())[2:]  # drop self, meta
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "tasks"
            and not p.name.startswith("_")]


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_model(name: str, meta: DatasetMeta, tasks=None, **kwargs) -> nn.Module:
    """``MODELS[name](meta, tasks=tasks, **kwargs)`` (``tasks``: default the dataset's); raises :class:`UserError`
    (one line) for an unknown name or argument."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}{_suggest(name, list(MODELS))}; choose one of {sorted(MODELS)}")
    allowed = model_arguments(name)
    for key in kwargs:
        if key not in allowed:
            raise UserError(f"model {name!r}: unknown argument {key!r}{_suggest(key, allowed)}; "
                            f"it accepts {allowed}")
    return MODELS[name](meta, tasks=tuple(tasks) if tasks else None, **kwargs)


def parameter_counts(model: nn.Module) -> dict:
    """``{"dense": n, "tables": n, "table_rows": n, "embedding_dims": [..], "trained": n}``: trainable parameters
    outside the embedding collections (what the dense optimizer updates), parameters of the embedding tables (rows x
    width, what the row pipeline updates), their rows, the distinct table widths, and how many parameters training
    updates (dense + tables, less the tables whose weight has ``requires_grad=False``: the row pipeline freezes
    them). A model with fixed parts also gets ``frozen_dense`` / ``frozen_tables``. Each parameter is counted once (shared
    storage or shared modules included). The FDN paper's Table 2 ``#params`` counts both."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    table_ids: set[int] = set()
    rows, dims = 0, set()
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            for p in module.parameters():
                if id(p) not in table_ids:
                    table_ids.add(id(p))
                    rows += p.shape[0]
                    dims.add(int(p.shape[1]))
    seen: set[int] = set()
    dense = tables = frozen_dense = frozen_tables = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in table_ids:
            tables += p.numel()
            frozen_tables += 0 if p.requires_grad else p.numel()
        elif p.requires_grad:
            dense += p.numel()
        else:
            frozen_dense += p.numel()
    out = {"dense": dense, "tables": tables, "table_rows": rows, "embedding_dims": sorted(dims)}
    if frozen_dense or frozen_tables:  # a model that keeps part of itself fixed (PeterRec's pretrained network)
        out.update(frozen_dense=frozen_dense, frozen_tables=frozen_tables)
    out["trained"] = dense + tables - frozen_tables
    return out


def parameter_line(name: str, counts: dict) -> str:
    """``model mmoe: 77,826 dense parameters, 113 embedding rows x 16 (1,808 table parameters)``."""
    dims = "/".join(str(d) for d in counts["embedding_dims"]) or "-"
    line = (f"model {name}: {counts['dense']:,} dense parameters, {counts['table_rows']:,} embedding rows x {dims} "
            f"({counts['tables']:,} table parameters)")
    if "frozen_dense" in counts:
        line += (f"; trains {counts['trained']:,} of {counts['dense'] + counts['frozen_dense'] + counts['tables']:,} "
                 f"(frozen: {counts['frozen_dense']:,} dense, {counts['frozen_tables']:,} table)")
    return line
