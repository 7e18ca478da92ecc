"""Data sources: LLaVA files and generated data sets with ground truth."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in datasets."""
    from mmbridge.plugins.datasets.llava import LlavaDataset
    from mmbridge.plugins.datasets.shapes import ShapesDataset

    registry.add_dataset("llava", LlavaDataset)
    registry.add_dataset("shapes", ShapesDataset)
    from mmbridge.plugins.datasets.librivox import LibrivoxDataset
    from mmbridge.plugins.datasets.spoken import SpokenDataset

    registry.add_dataset("spoken", SpokenDataset)
    registry.add_dataset("librivox", LibrivoxDataset)
    from mmbridge.plugins.datasets.textimages import TextImagesDataset

    registry.add_dataset("textimages", TextImagesDataset)
