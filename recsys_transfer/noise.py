"""Known library log messages that are noise for our users, filtered at the CLI's start (no torch import here).

Each entry is ``(logger name, text the message starts with)``; only those messages are dropped, everything else a
library logs still reaches the user.

* torch's fx tracer warns once per process that ``is_fx_tracing`` also covers ``torch.export`` -- TorchRec calls it
  on import; nothing we can act on;
* TorchRec's planner warns, on CPU and gloo runs, that it found no explicit hardware description (topology) and
  uses its defaults -- which is what a CPU run wants;
* deprecations raised inside TorchRec and torch.distributed by their own calls (DDP's ``broadcast_buffers``,
  ``reduce_scatter_tensor``, ``all_gather_into_tensor``, ShardedTensor in checkpoints): ``FutureWarning``s about
  library internals a user cannot change (:data:`NOISY_WARNINGS`, matched by message).
"""

from __future__ import annotations

import logging
import re
import warnings

NOISE = (
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
    ("torchrec.distributed.planner.types", "HardwareConfig validation"),
    ("torchrec.distributed.planner.types", "Topology"),
)


NOISY_WARNINGS = (
    "`broadcast_buffers` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "Please use DTensor instead and we are deprecating ShardedTensor",
)


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to drop
            return True
        return not text.startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Install the filters (idempotent)."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(tuple(prefixes)))
    for text in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text), category=FutureWarning)
