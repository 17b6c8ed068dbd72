"""How samples reach the model: the seeded training batch sampler, the evaluation image set and the
``torch.utils.data.DataLoader`` every stage builds the same way.

Worker processes (``train.workers``, ``test.workers``, ``miner.workers``, ``extract.workers``) only
decode and prepare; every random draw is made by the sampler in the main process, from (seed, epoch,
index), and the loader hands batches back in sampler order. A result therefore does not depend on
the number of workers, and a resumed run replays the batches of an uninterrupted one.
"""

from __future__ import annotations

import torch

from ovd.data.images import load_image
from ovd.errors import OvdError


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of ``epoch``: a permutation of ``range(n)`` seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def flip_draw(seed: int, epoch: int, index: int) -> bool:
    """The horizontal flip of image ``index`` in ``epoch``: seeded by (seed, epoch, index)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 100_003 + index)
    return bool(torch.rand(1, generator=g) < 0.5)


def batch_keys(it: int, n: int, batch_size: int, iters_per_epoch: int, seed: int, hflip: bool,
               rank: int = 0, world: int = 1) -> list[tuple[int, bool]]:  # fmt: skip
    """This process's ``(image index, flip)`` keys of training iteration ``it``: a function of the
    seed and ``it`` only. The last batch of an epoch is filled up from the epoch's start: every batch
    is full, so every process always has its share (DDP) and the gradient scale never jumps."""
    epoch, k = divmod(it, iters_per_epoch)
    order = epoch_order(n, seed, epoch)
    idx = [int(order[j % n]) for j in range(k * batch_size, (k + 1) * batch_size)]
    return [(i, hflip and flip_draw(seed, epoch, i)) for i in idx[rank::world]]


class TrainBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, flip)`` keys for iterations ``start`` … ``stop - 1`` (see :func:`batch_keys`);
    a resumed run starts at its checkpoint's iteration."""

    def __init__(self, n: int, batch_size: int, iters_per_epoch: int, seed: int, hflip: bool, start: int, stop: int,
                 rank: int = 0, world: int = 1):  # fmt: skip
        self.args = (n, batch_size, iters_per_epoch, seed, hflip, rank, world)
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        n, bs, ipe, seed, hflip, rank, world = self.args
        for it in range(self.start, self.stop):
            yield batch_keys(it, n, bs, ipe, seed, hflip, rank, world)


class ImageSet(torch.utils.data.Dataset):
    """Map-style view of a :class:`~ovd.data.coco.DetectionDataset` for inference: ``(image, image_id)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rec = self.dataset.record(i)
        return load_image(rec["path"]), rec["image_id"]


class ImageFiles(torch.utils.data.Dataset):
    """Map-style list of image files for inference: ``(image, position in the list)``."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[i]), i


def as_list(batch: list) -> list:
    """Collate that keeps samples apart: detection images differ in size and targets are dicts."""
    return batch


class _WorkerError:
    """An :class:`OvdError` raised in a worker, carried back as data: torch would re-raise it with
    the worker's traceback pasted into its message; the main process raises it again as one line."""

    def __init__(self, message: str):
        self.message = message


class _Guarded(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except OvdError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            return _WorkerError(str(e))


class Loader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose workers' :class:`OvdError` reach the caller as the same one-line error."""

    def __iter__(self):
        for batch in super().__iter__():
            for sample in batch if isinstance(batch, list) else [batch]:
                if isinstance(sample, _WorkerError):
                    raise OvdError(sample.message)
            yield batch


def make_loader(dataset, *, workers: int = 0, batch_size: int | None = 1, batch_sampler=None,
                device: torch.device | str = "cpu", collate_fn=as_list) -> Loader:  # fmt: skip
    """A ``DataLoader`` in dataset (or sampler) order with ``workers`` processes (0: in the calling
    process, exactly as a plain loop), pinned memory when the batches go to a CUDA device.
    ``batch_size=None`` yields single samples."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    kwargs = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return Loader(
        _Guarded(dataset),
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.device(device).type == "cuda",
        # the loader draws its workers' base seed at every iter(); from the global RNG by default, which
        # would shift the RoI samplers' draws (and change a run's numbers): its own generator instead
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
