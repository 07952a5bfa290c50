"""Batched access to image collections.

The metrics take ``images`` as anything indexable with a length whose items are (3, H, W) tensors
in [0, 1]: an (N, 3, H, W) tensor, a list of tensors, or a lazy view of a large data set
(e.g. `TransformedImages`), so an ImageNet-sized test set never has to sit in memory at once.
"""

from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm


def gather_images(images, indices: Sequence[int]) -> torch.Tensor:
    """The images at ``indices`` as one (len(indices), 3, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(list(indices), dtype=torch.long, device=images.device)]
    return torch.stack([torch.as_tensor(images[i]) for i in indices])


def iterate_batches(images, batch_size: int, progress: bool = False, description: str = "") -> Iterator[tuple]:
    """Yield ``(indices, batch)`` over ``images`` in order, ``batch_size`` images at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        indices = list(range(start, min(start + batch_size, len(images))))
        yield indices, gather_images(images, indices)


class TransformedImages:
    """A lazy, indexable view ``transform(dataset[i][column])`` of a data set (e.g. a `datasets.Dataset`).

    ``transform`` maps one stored image (a PIL image) to a (3, H, W) tensor in [0, 1].
    """

    def __init__(self, dataset, transform: Callable, column: str = "image"):
        self.dataset, self.transform, self.column = dataset, transform, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.dataset[int(index)][self.column])
