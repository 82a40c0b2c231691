"""Moved to ``vlprune.distributed`` (torch.distributed helpers are not an objective); re-exported here."""

from ..distributed import all_reduce_mean, gather, gather_with_grad, is_dist, rank, world_size, wrap_ddp  # noqa: F401
