"""Data loading for the loop: a sampler that resumes mid-epoch, and DataLoader workers that leave stopping to the
main process."""

from __future__ import annotations

import atexit
import signal
import weakref
from collections import Counter

from torch.utils.data import DataLoader, DistributedSampler

from ..data.buckets import BucketBatchSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (exact resume: no sample seen twice or skipped)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0  # index into this rank's shard for the current epoch

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


def leave_stop_signals_to_main(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT/SIGTERM; stopping is the main process's job (it saves, then
    shuts them down). Otherwise a signal that reaches them too killed them first (Ctrl-C and `timeout` signal the
    whole process group; the deepspeed launcher sends SIGTERM to every process under each rank), and the main process
    died on "DataLoader worker ... is killed by signal" without saving. A worker whose main process is gone exits by
    itself (the DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _shut_workers_down(loader_ref: "weakref.ref[DataLoader]") -> None:
    """atexit, registered after torch's and multiprocessing's handlers, so it runs before them: end the persistent
    workers the DataLoader way. Left to multiprocessing, they would get SIGTERM, which they ignore, and the exit would
    wait for them forever."""
    loader = loader_ref()
    iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator (torch DataLoader internals)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        for worker in getattr(iterator, "_workers", []):  # one stuck past the DataLoader's timeouts ignores SIGTERM
            if worker.is_alive():
                worker.kill()


def build_loader(dataset, geometry, *, rank: int, seed: int, num_workers: int,
                 buckets: bool = False) -> tuple[DataLoader, ResumableSampler | BucketBatchSampler]:
    """This rank's DataLoader over its shard, in micro-batches, with the sampler that positions it on resume.
    buckets: micro-batches of one aspect-ratio bucket each (the dataset's `bucket_of`)."""
    how = dict(num_workers=num_workers, persistent_workers=num_workers > 0, worker_init_fn=leave_stop_signals_to_main)
    if buckets:
        sampler = BucketBatchSampler(dataset.bucket_of, geometry.micro_batch, world_size=geometry.world_size,
                                     rank=rank, seed=seed)
        if len(sampler) == 0:
            raise ValueError(f"no aspect-ratio bucket holds one micro-batch ({geometry.micro_batch}) per rank over "
                             f"{geometry.world_size} rank(s); buckets: {dict(Counter(dataset.bucket_of))}")
        loader = DataLoader(dataset, batch_sampler=sampler, **how)
    else:
        sampler = ResumableSampler(dataset, num_replicas=geometry.world_size, rank=rank, shuffle=True, seed=seed,
                                   drop_last=True)
        if len(sampler) < geometry.micro_batch:
            raise ValueError(f"dataset has {len(dataset)} samples: fewer than one micro-batch "
                             f"({geometry.micro_batch}) per rank over {geometry.world_size} rank(s)")
        loader = DataLoader(dataset, batch_size=geometry.micro_batch, sampler=sampler, drop_last=True, **how)
    if num_workers > 0:
        atexit.register(_shut_workers_down, weakref.ref(loader))
    return loader, sampler
