"""Tensor and expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

gpt-fast style: the model stays plain; ``tp.parallelize`` transforms a freshly built (meta) model into one rank's
shard (local shapes, all-reduce hooks, vocab-parallel embedding and head), ``loading`` reads only that rank's
slices from the checkpoint, ``runner`` has rank 0 drive every step and the other ranks follow it, ``channel``
carries the step inputs (tensors through collectives, control as JSON bytes: never pickle), ``launch`` starts the
worker processes, ``memory`` answers ``small4 plan``.
"""

from __future__ import annotations

from small4._face import lazy_face

# name -> the module that defines it (resolved on first use: torch.distributed is not imported before)
_FACE = {
    "ParallelConfig": "config",
    "Nodes": "launch",
    "end_serving_process": "serving",
    "follow_node": "serving",
    "parallel_async_engine": "serving",
}

__all__ = sorted(_FACE)
__getattr__ = lazy_face(__name__, _FACE)
