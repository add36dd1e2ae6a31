"""The full training state of a run as ONE torch.distributed.checkpoint (DCP) state dict, so a run killed at any
step resumes bitwise where it was (:mod:`recsys_transfer.train.checkpoint` writes and picks the directories).

What it holds (flat keys; every rank saves its part, DCP writes each once):

* ``model.<key>``: ``model.state_dict()`` — sharded tables shard by shard (TorchRec's ShardedTensors);
* ``dense.<param>.<state>`` and ``dense.groups``: the dense optimizer's state keyed by parameter name (not by
  position) and its param groups;
* ``rows.<table key>.<state>`` and ``rows.<table key>.hyper``: the row optimizer's state of every table (Adam's
  moments and per-row steps, momentum, row-wise Adagrad sums, and the applied barrier's ``transfer_*`` copies),
  saved as ShardedTensors laid out like the table's own shards, so they reshard with the table;
* ``transfer.<table key>.<state>``: the transfer loss's learned state of each table under transfer (the adversarial
  discriminator and its lazy-Adam state), by table, so it follows the table to whichever rank holds it;
* ``ema.<key>``: the EMA shadow of every parameter (tables sharded like the tables);
* ``multitask.<name>``: a loss weighting's learned parameters (uncertainty weighting's log-variances; their dense
  optimizer state is under ``dense.multitask.<name>.<state>`` like any dense parameter's);
* ``rank<r>``: what differs per rank, under a rank-unique key (DCP keeps ONE copy of same-key values, pytorch
  issue 120356): the loop (epoch, global step, history, best value and epoch, early-stopping count: the same on
  every rank except the per-task train losses, which are each rank's own), the sums of the epoch in progress, the
  RNG states (torch CPU/CUDA, numpy, random), the transfer stage's subsample generators, the discriminators'
  call counters and last-step statistics, gradient surgery's state (GradVac's EMA targets per task pair and
  group, the generator of the task orders: :class:`recsys_transfer.multitask.surgery.Surgery`; the same on every
  rank -- every rank computes every group's targets from the all-reduced Gram entries -- so it follows any
  resharding exactly);
* ``meta``: format, run id, config, world size, library versions and the sharding plan.

The data position is the epoch and the number of batches trained in it (never an iterator position: the loader's
order depends on ``(seed, epoch, rank)`` only, :meth:`recsys_transfer.data.loader.BatchLoader.set_epoch`).

Resharding (a checkpoint loaded by another world size or sharding plan): the model, the row-optimizer state, the
EMA and the transfer state are resharded by DCP (table-wise <-> row-wise, 1 <-> N ranks); the dense optimizer and
the loop are replicated. What cannot follow exactly is per-rank: a new rank takes its own saved rank's RNG and
epoch sums when that rank existed, else rank 0's, and a checkpoint taken mid-epoch continues from the same share
of the epoch's rows (the rest of the epoch in the new world's order). Such a run continues the saved one; it is
not bitwise equal to an uninterrupted run of either world size.
"""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recsys_transfer.errors import UserError
from recsys_transfer.multitask.surgery import RowSurgery, Surgery
from recsys_transfer.train.loop import EMA, FitResult
from recsys_transfer.train.step import TrainStep
from recsys_transfer.transfer.barrier import TransferTransform

FORMAT = 1


def _pack(value) -> bytes:
    """Non-tensor values travel as pickled bytes (DCP would otherwise flatten nested mappings into many keys)."""
    return pickle.dumps(value)


def _unpack(value: bytes):
    return pickle.loads(value)


def _sharded_tensor_cls():
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return ShardedTensor


class _ModelTensors:
    """The model's state-dict keys of its local tensors (found by storage), and the ShardedTensor of each sharded
    key, so per-row state of a table can be saved laid out like the table."""

    def __init__(self, model: nn.Module) -> None:
        sharded_cls = _sharded_tensor_cls()
        self.state = model.state_dict()
        self.sharded: dict[str, object] = {}
        self.key_of: dict[tuple[int, tuple[int, ...]], str] = {}
        for key, value in self.state.items():
            if isinstance(value, sharded_cls):
                self.sharded[key] = value
                for shard in value.local_shards():
                    self.key_of[(shard.tensor.data_ptr(), tuple(shard.tensor.shape))] = key
            elif isinstance(value, torch.Tensor):
                self.key_of.setdefault((value.data_ptr(), tuple(value.shape)), key)

    def key(self, tensor: torch.Tensor) -> str:
        found = self.key_of.get((tensor.data_ptr(), tuple(tensor.shape)))
        if found is None:
            raise RuntimeError(f"a tensor of shape {tuple(tensor.shape)} is not in the model's state dict")
        return found

    def like(self, key: str, local: torch.Tensor):
        """A tensor for per-row state of the table ``key`` (``local``: this rank's rows, ``[rows, *rest]``): a
        ShardedTensor with the table's row layout when the table is sharded, else ``local`` itself."""
        weight = self.sharded.get(key)
        if weight is None:
            return local
        rest, dtype = tuple(local.shape[1:]), local.dtype
        from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata
        from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

        meta = weight.metadata()
        pad = [0] * len(rest)
        shards_meta = [ShardMetadata([m.shard_offsets[0], *pad], [m.shard_sizes[0], *rest], m.placement)
                       for m in meta.shards_metadata]
        local_shards = []
        for shard in weight.local_shards():
            if local.shape[0] != shard.metadata.shard_sizes[0]:
                raise RuntimeError(f"{key}: local state of {tuple(local.shape)} rows does not match the shard "
                                   f"{shard.metadata.shard_sizes}")
            local_shards.append(Shard(local, ShardMetadata([shard.metadata.shard_offsets[0], *pad], list(local.shape),
                                                           shard.metadata.placement)))
        global_meta = ShardedTensorMetadata(shards_meta, torch.Size([meta.size[0], *rest]),
                                            TensorProperties(dtype=dtype))
        group = dist.group.WORLD if dist.is_initialized() else None
        return _sharded_tensor_cls()._init_from_local_shards_and_global_metadata(local_shards, global_meta,
                                                                                  process_group=group)


def _local(value) -> torch.Tensor | None:
    """This rank's tensor of a state-dict value (its one local shard of a ShardedTensor; None if it holds none)."""
    if isinstance(value, _sharded_tensor_cls()):
        shards = value.local_shards()
        return shards[0].tensor if shards else None
    return value


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainState:
    """The state of one run (module docstring) over the live objects it saves from and loads into.

    ``model`` (plain or DistributedModelParallel), ``step`` (its dense optimizer and row pipeline, with the
    transfer stage), ``ema`` (or None), ``loop`` (the :class:`~recsys_transfer.train.loop.FitResult` that
    :func:`~recsys_transfer.train.loop.fit` advances), ``meta``: run id, config, versions, plan (saved as given).
    """

    def __init__(self, model: nn.Module, step: TrainStep, ema: EMA | None, loop: FitResult, *, meta: dict,
                 rank: int = 0, world_size: int = 1) -> None:
        self.model, self.step, self.ema, self.loop = model, step, ema, loop
        self.meta = {**meta, "format": FORMAT, "world_size": world_size}
        self.rank, self.world_size = rank, world_size

    # -- the pieces ------------------------------------------------------------------------------------------------
    def _param_names(self) -> dict[int, str]:
        names = {id(p): name for name, p in self.model.named_parameters()}
        names.update({id(p): name for name, p in self._weighting_params().items()})
        return names

    def _weighting_params(self) -> dict[str, nn.Parameter]:
        weighting = getattr(self.step, "weighting", None)
        return weighting.parameters() if weighting is not None else {}

    def _surgery(self) -> Surgery | None:
        if getattr(self.step, "surgery", None) is not None:
            return self.step.surgery.surgery
        rows = self.step.rows
        found = [t.surgery for t in rows.transforms if isinstance(t, RowSurgery)] if rows else []
        return found[0] if found else None

    def _transfer_stages(self) -> list[TransferTransform]:
        rows = self.step.rows
        return [t for t in rows.transforms if isinstance(t, TransferTransform)] if rows else []

    def _rank_blob(self) -> dict:
        surgery = self._surgery()
        return {"rng": rng_state(), "loop": self.loop,
                "transfer": [stage.local_state() for stage in self._transfer_stages()],
                "surgery": surgery.state_dict() if surgery is not None else None}

    def _restore_rank_blob(self, blob: dict) -> None:
        set_rng_state(blob["rng"])
        vars(self.loop).update(vars(blob["loop"]))  # the live FitResult that fit() advances
        for stage, saved in zip(self._transfer_stages(), blob["transfer"]):
            stage.load_local_state(saved)
        surgery, saved = self._surgery(), blob.get("surgery")
        if (surgery is None) != (saved is None):
            raise UserError("the checkpoint was saved " + ("without" if saved is None else "with") + " gradient "
                            "surgery, this run is configured " + ("with" if saved is None else "without") + " it")
        if surgery is not None:
            try:
                surgery.load_state_dict(saved)
            except ValueError as exc:
                raise UserError(f"gradient surgery: {exc}") from None

    # -- saving ----------------------------------------------------------------------------------------------------
    def position(self) -> dict:
        """``meta`` (run id, config, versions, plan, format, world size) with where the run is: global step,
        epoch and batch of the epoch (also the checkpoint's ``manifest.json``, read without loading it)."""
        return {**self.meta, "global_step": self.loop.global_step, "epoch": self.loop.epoch,
                "batch": self.loop.progress.batches}

    def state_dict(self) -> dict:
        """The flat DCP state dict of this rank (a collective-free build: every rank calls it at the same step)."""
        tensors = _ModelTensors(self.model)
        out: dict = {f"model.{k}": v for k, v in tensors.state.items()}
        names = self._param_names()
        dense = self.step.dense
        sd = dense.state_dict()
        ordered = [p for g in dense.param_groups for p in g["params"]]
        for index, entry in sd["state"].items():
            name = names[id(ordered[index])]
            for key, value in entry.items():
                out[f"dense.{name}.{key}"] = value
        groups = []
        for g in sd["param_groups"]:
            groups.append({**g, "params": [names[id(ordered[i])] for i in g["params"]]})
        out["dense.groups"] = _pack(groups)
        rows = self.step.rows
        optimizer = rows.optimizer if rows is not None else None
        if optimizer is not None:
            by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            for slot in rows.slots:
                if id(slot.weight) not in by_param:
                    continue  # frozen: no optimizer state
                key = tensors.key(slot.weight)
                hyper = {k: v for k, v in by_param[id(slot.weight)].items() if k != "params"}
                out[f"rows.{key}.hyper"] = _pack(hyper)
                for name, value in optimizer.state.get(slot.weight, {}).items():
                    out[f"rows.{key}.{name}"] = tensors.like(key, value)
        for stage in self._transfer_stages():
            for name, rule in stage.rules.items():
                key = tensors.key(rows.by_name[name].weight)
                for part, value in rule.loss.table_state(rule.loss_index).items():
                    out[f"transfer.{key}.{part}"] = value
        if self.ema is not None:
            for shadow, tensor in zip(self.ema.shadow, self.ema.tensors):
                key = tensors.key(tensor)
                out[f"ema.{key}"] = tensors.like(key, shadow)
        for name, param in self._weighting_params().items():
            out[name] = param.detach()
        out[f"rank{self.rank}"] = _pack(self._rank_blob())
        out["meta"] = _pack(self.position())
        return out

    # -- loading ---------------------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> dict:
        """Load the checkpoint directory ``path`` into the live objects (every rank; a collective). Returns the
        saved ``meta``. A checkpoint whose tables, parameters or state do not match this run is a
        :class:`UserError` naming what differs."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        meta_only = {"meta": b""}
        self._dcp_load(meta_only, path)
        saved_meta = _unpack(meta_only["meta"])
        saved_world = int(saved_meta["world_size"])
        tensors = _ModelTensors(self.model)
        target: dict = {f"model.{k}": v for k, v in tensors.state.items()}
        missing = sorted(k for k in target if k not in saved)
        if missing:
            raise UserError(f"{path}: the checkpoint lacks model tensors {missing[:5]} (another model or dataset)")
        # the dense optimizer: targets shaped as saved, then torch.optim's own load_state_dict
        names = self._param_names()
        dense = self.step.dense
        ordered = [p for g in dense.param_groups for p in g["params"]]
        index_of = {names[id(p)]: i for i, p in enumerate(ordered)}
        dense_keys = {}
        for key, md in saved.items():
            if key.startswith("dense.") and key != "dense.groups":
                param, state_key = key[len("dense."):].rsplit(".", 1)
                if param not in index_of:
                    raise UserError(f"{path}: dense optimizer state for {param!r}, which this model does not have")
                dense_keys[key] = (param, state_key)
                target[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        target["dense.groups"] = b""
        # the row optimizer: per table, targets laid out like this run's shards
        rows = self.step.rows
        optimizer = rows.optimizer if rows is not None else None
        row_targets: dict[str, dict[str, object]] = {}
        if optimizer is not None:
            trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
            for slot in rows.slots:
                if id(slot.weight) not in trained:
                    continue
                key = tensors.key(slot.weight)
                prefix = f"rows.{key}."
                if prefix + "hyper" not in saved:
                    raise UserError(f"{path}: no row-optimizer state for table {key} (saved with it frozen, or "
                                    "another model)")
                target[prefix + "hyper"] = b""
                entry = row_targets.setdefault(slot.name, {})
                for k, md in saved.items():
                    if k.startswith(prefix) and k != prefix + "hyper" and "." not in k[len(prefix):]:
                        rest = tuple(md.size[1:])
                        local = torch.zeros((slot.weight.shape[0], *rest), dtype=md.properties.dtype,
                                            device=slot.weight.device)
                        entry[k[len(prefix):]] = local
                        target[k] = tensors.like(key, local)
        transfer_targets = []
        for stage in self._transfer_stages():
            for name, rule in stage.rules.items():
                key = tensors.key(rows.by_name[name].weight)
                parts = {part: torch.zeros_like(v) for part, v in rule.loss.table_state(rule.loss_index).items()}
                for part, value in parts.items():
                    if f"transfer.{key}.{part}" not in saved:
                        raise UserError(f"{path}: no transfer state {part!r} for table {key} (saved with another "
                                        "transfer config)")
                    target[f"transfer.{key}.{part}"] = value
                transfer_targets.append((rule, parts))
        ema_targets = []
        if self.ema is not None:
            for shadow, tensor in zip(self.ema.shadow, self.ema.tensors):
                key = tensors.key(tensor)
                if f"ema.{key}" not in saved:
                    raise UserError(f"{path}: no EMA state for {key} (saved without train.ema_decay)")
                target[f"ema.{key}"] = tensors.like(key, shadow)
                ema_targets.append(shadow)
        weighting = self._weighting_params()
        for name, param in weighting.items():
            if name not in saved:
                raise UserError(f"{path}: no {name} (saved with another multitask.weighting)")
            target[name] = torch.empty_like(param.detach())
        own = f"rank{self.rank}" if self.rank < saved_world else "rank0"
        target[own] = b""
        self._dcp_load(target, path)
        with torch.no_grad():
            for name, param in weighting.items():
                param.copy_(target[name])

        # install
        self.model.load_state_dict({k[len("model."):]: v for k, v in target.items() if k.startswith("model.")})
        groups = _unpack(target["dense.groups"])
        state: dict[int, dict] = {}
        for key, (param, state_key) in dense_keys.items():
            state.setdefault(index_of[param], {})[state_key] = target[key]
        dense.load_state_dict({"state": state, "param_groups": [
            {**g, "params": [index_of[n] for n in g["params"]]} for g in groups]})
        if optimizer is not None:
            hyper_of = {slot.name: _unpack(target[f"rows.{tensors.key(slot.weight)}.hyper"])
                        for slot in rows.slots if slot.name in row_targets}
            name_of = dict(zip((id(p) for g in optimizer.param_groups for p in g["params"]), optimizer.names or []))
            optimizer.load_state_dict({
                "state": {name: entry for name, entry in row_targets.items() if entry},
                "param_groups": [{**hyper_of[name_of[id(g["params"][0])]],
                                  "params": [name_of[id(p)] for p in g["params"]]} for g in optimizer.param_groups]})
        for rule, parts in transfer_targets:
            rule.loss.load_table_state(rule.loss_index, parts)
        self._restore_rank_blob(_unpack(target[own]))
        if saved_world != self.world_size:
            self._reshard_position(saved_world)
        return saved_meta

    def _reshard_position(self, saved_world: int) -> None:
        """A mid-epoch position saved by ``saved_world`` ranks, in this world's batches (the same share of the
        epoch's rows, module docstring)."""
        progress = self.loop.progress
        progress.batches = progress.batches * saved_world // self.world_size

    @staticmethod
    def _dcp_load(target: dict, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # single-process runs: DCP notes it loads without a process group
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(target, checkpoint_id=str(path))

