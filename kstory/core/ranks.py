"""Which process of a multi-process training this is, read from the launcher's environment (no torch).

Lightning's own launcher re-runs the command for each extra process with
``LOCAL_RANK`` (and ``NODE_RANK`` on other machines) set; torchrun sets
``RANK`` and ``LOCAL_RANK``; SLURM's ``srun`` sets ``SLURM_PROCID`` and
``SLURM_LOCALID``. A plain process has none of them and is rank 0. Knowing
this before Lightning starts lets ranks > 0 skip what only rank 0 may do:
move or clear outputs, take the run's lock, write the run's log, encode the
caption and latent cache.
"""

from __future__ import annotations

import os

_GLOBAL = ("RANK", "SLURM_PROCID")
_LOCAL = ("LOCAL_RANK", "SLURM_LOCALID")


def _first(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def local_rank() -> int:
    """This process's index on its machine (0 for a plain process)."""
    return _first(_LOCAL) or 0


def node_rank() -> int:
    return _first(("NODE_RANK", "GROUP_RANK", "SLURM_NODEID")) or 0


def secondary_rank() -> bool:
    """True in every process of a multi-process training but the global rank 0."""
    return bool(_first(_GLOBAL) or local_rank() or node_rank())


def rank_label() -> str | None:
    """``rank 1`` (``node 1 rank 0`` when only the machine's index is known) for a secondary rank, else None."""
    if not secondary_rank():
        return None
    known = _first(_GLOBAL)
    if known is not None:
        return f"rank {known}"
    return f"node {node_rank()} rank {local_rank()}" if node_rank() else f"rank {local_rank()}"
