"""Build a run's model and data from its config (the one place that turns a config into tensors).

Used by the population trainer, the reference loop, the analyses that load weights back
(CMD, neurons) and :meth:`raydyn.store.Store.model`, so all of them build the same thing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from raydyn.tasks import registry
from raydyn.tasks.data import Dataset

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype (models are built in the run's ``dtype``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_data(cfg: dict[str, Any], base_dir: str | None = None) -> Dataset:
    """The run's data set in the run's ``dtype`` (on the CPU). Relative paths in ``cfg['data']`` are
    resolved against ``base_dir`` (the directory the sweep was launched from; default: here)."""
    data = registry.dataset(cfg["dataset"]).load(cfg["data"], base_dir)
    return data.to(DTYPES[cfg["dtype"]])


def init_model(cfg: dict[str, Any], data: Dataset) -> torch.nn.Module:
    """The run's initial model on the CPU: built under ``torch.manual_seed(seed)`` in the run's dtype
    (the registry entry's build, then raydyn's init options), exactly as a bare PyTorch loop would."""
    dtype = DTYPES[cfg["dtype"]]
    with default_dtype(dtype):
        torch.manual_seed(cfg["seed"])
        model = registry.model(cfg["model"]).build(cfg, data.input_shape, data.out_dim, data.vocab)
    # a plug-in may create tensors in a fixed dtype; the run's dtype is what is trained
    return model.to(dtype)
