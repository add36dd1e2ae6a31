"""``recsys-transfer launch``: torchrun for recsys-transfer commands, with failures reported in one line per rank.

    recsys-transfer launch --standalone --nproc-per-node 2 -- train --config pipelines/movielens100k.yaml --output DIR
    recsys-transfer launch --nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        --nproc-per-node 8 -- train --config ...

Everything before ``--`` goes to torchrun unchanged (its own options: nodes, rendezvous, restarts); everything after
it is the recsys-transfer command each worker runs (``python -m recsys_transfer COMMAND``). Plain ``torchrun ... -m
recsys_transfer train ...`` works as well, but torchrun ends a failed job with its own traceback and failure report
under the workers' messages. Here, when every failed worker ended with a user error (exit status 2: each has
printed its one ``error: [rank N] ...`` line) the job ends with status 2 and nothing more; any other failure (a crash,
a signal) adds one line per failed rank and ends with status 1.
"""

from __future__ import annotations

import logging
import signal
import sys

from recsys_transfer.errors import UserError

#: torchrun's own log lines about a failed worker, already said by the worker itself or by :func:`launch`
_AGENT_NOISE = ("failed (exitcode", "Sending process", "Closing process")


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, recsys-transfer command) of ``launch``'s arguments, split at the first ``--``."""
    if "--" not in argv:
        raise UserError("launch: put the recsys-transfer command after '--', e.g. recsys-transfer launch "
                        "--nproc-per-node 2 -- train --config FILE --output DIR")
    k = argv.index("--")
    if not argv[k + 1:]:
        raise UserError("launch: no recsys-transfer command after '--'")
    return argv[:k], argv[k + 1:]


def _quiet_agent() -> None:
    from recsys_transfer.noise import DropMessages

    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(DropMessages(_AGENT_NOISE))


def launch(argv: list[str]) -> int:
    """Run the job (module docstring); returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    options, command = split_command(argv)
    try:
        args = get_args_parser().parse_args([*options, "-m", "recsys_transfer", *command])
    except SystemExit as exc:  # torchrun's parser already printed its usage line
        return 2 if exc.code else 0
    _quiet_agent()
    try:
        run(args)
    except ChildFailedError as exc:
        failures = exc.failures
        if failures and all(f.exitcode == 2 for f in failures.values()):
            return 2
        for rank, failure in sorted(failures.items()):
            code = failure.exitcode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            print(f"error: [rank {rank}] worker ended with {how} (pid {failure.pid})", file=sys.stderr)
        return 1
    return 0
