"""FSDP2 as a Lightning strategy: ``ModelParallelStrategy`` with every rank in one data-parallel group.

Why a subclass: ``ModelParallelStrategy``'s ``"auto"`` sizes mean data parallel across nodes and *tensor*
parallel across a node's GPUs; these models have no tensor-parallel plan, so pure FSDP2 needs
``data_parallel_size`` = the world size, which a config cannot compute (devices × nodes). The module shards
itself in ``GeneratorModule.configure_model`` (every block, then the rest).
"""

from __future__ import annotations

import atexit
import functools

import torch
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel over all ranks (``tensor_parallel_size`` 1).

    Args:
        save_distributed_checkpoint: each rank writes its own shard into a checkpoint directory (resumes on
            any number of ranks; ``lina consolidate`` makes one file of it), or rank 0 gathers one file.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.world_size
        super().setup_environment()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the process group when the program ends, whatever its backend.

    Why: Lightning does this for NCCL only. A gloo group (CPU runs, the tests) left to the interpreter's
    teardown can abort a run that succeeded ("terminate called without an active exception", exit -6)
    when gloo's worker threads outlive Python.
    """
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
