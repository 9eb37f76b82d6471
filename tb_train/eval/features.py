"""Feature extractors and distributed feature extraction.

An extractor is a callable `uint8 images [N, 3, H, W] -> {"pool": [N, D], optional "logits": [N, K],
"spatial": [N, S]}` with a `name`. `build_extractor(name, weights, device)` finds one by name: the
built-in "inception" (torch-fidelity's network from a LOCAL weights file), one registered in-process with
`register_extractor`, or one a package declares under the entry-point group `tokenbridge.extractors`
(the demo declares "digits" that way: tb_train never imports the demo).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from tb_core.errors import ConfigError
from tb_core.fileio import sha256_file
from tb_core.plugins import Registry

ENTRY_POINT_GROUP = "tokenbridge.extractors"


class FeatureExtractor(Protocol):
    """uint8 images [N, 3, H, W] -> {"pool": [N, D], optional "logits": [N, K], "spatial": [N, S]}."""

    name: str

    def __call__(self, images: Tensor) -> dict[str, Tensor]: ...


def _gather_rows(t: Tensor, counts: list[int]) -> Tensor | None:
    """Rows of every rank's `t` ([counts[r], D] on rank r) concatenated in rank order on rank 0."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return t
    pad = torch.zeros(max(counts), *t.shape[1:], dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    rank = tdist.get_rank()
    bucket = [torch.empty_like(pad) for _ in counts] if rank == 0 else None
    tdist.gather(pad, bucket, dst=0)
    return torch.cat([b[:c] for b, c in zip(bucket, counts)]).cpu() if rank == 0 else None


def extract_features(read: Callable[[int, int], Tensor], count: int, extractor: FeatureExtractor, rank: int = 0,
                     world: int = 1, batch_size: int = 64, desc: str = "features") -> dict[str, Tensor] | None:
    """Features of images 0..count-1 (`read(a, b)` -> uint8 [b - a, 3, H, W]), each rank computing the
    contiguous slice [r N / W, (r+1) N / W), so rows come out in image order for any world size.

    Collective when world > 1: returns the full dict on rank 0, None elsewhere.
    """
    from tqdm import tqdm

    bounds = [count * r // world for r in range(world + 1)]
    start, stop = bounds[rank], bounds[rank + 1]
    parts: dict[str, list[Tensor]] = {}
    bar = tqdm(total=count, desc=desc, unit="img", disable=rank != 0, dynamic_ncols=True)
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        for k, v in extractor(read(a, b)).items():
            parts.setdefault(k, []).append(v.float())
        bar.update((b - a) * world)
    bar.close()
    if not parts:  # an empty slice (more ranks than images): one probe image gives the keys and widths
        parts = {k: [v.float()[:0]] for k, v in extractor(read(0, 1)).items()}
    counts = [bounds[r + 1] - bounds[r] for r in range(world)]
    out = {k: _gather_rows(torch.cat(v), counts) for k, v in sorted(parts.items())}
    return out if rank == 0 else None


# A factory: (weights path or None, device) -> (extractor, identity of its weights for cache keys).
ExtractorFactory = Callable[[str | None, torch.device], tuple["FeatureExtractor", str]]
_EXTRACTORS = Registry(ENTRY_POINT_GROUP)


def _inception(weights: str | None, device: torch.device) -> tuple[FeatureExtractor, str]:
    from tb_train.eval.inception import InceptionExtractor

    if not weights:
        raise ConfigError("extractor 'inception' needs a local weights file (inception_weights / "
                          "eval.extractor_weights); nothing is downloaded")
    return InceptionExtractor(weights, device), sha256_file(weights)


def register_extractor(name: str, factory: ExtractorFactory) -> None:
    """Make `name` usable as `eval.extractor` in this process (packages: use the entry-point group)."""
    _EXTRACTORS.register(name, factory)


def extractor_names() -> list[str]:
    return sorted({"inception", *_EXTRACTORS.names()})


def _factory(name: str) -> ExtractorFactory:
    found = _inception if name == "inception" else _EXTRACTORS.get(name)
    if found is not None:
        return found
    raise ConfigError(f"unknown feature extractor {name!r} (known: {', '.join(extractor_names())})")


def build_extractor(name: str, weights: str | None, device: torch.device) -> tuple[FeatureExtractor, str]:
    """(extractor, identity of its weights) for `name`; each factory reports a missing or wrong weights
    file as one InputError line naming it."""
    return _factory(name)(weights, device)


def check_extractor(name: str) -> None:
    """Fail early (before any work) on an extractor name nobody provides."""
    _factory(name)
