"""Load flat weight vectors back into a run's model and evaluate them on its test data.

A flat vector is the recorder's ``full`` snapshot layout: every parameter tensor of
the model, flattened and concatenated in ``model.named_parameters()`` order (the
order of ``param_names`` in ``runs.weights_layout``; that is also the order of
``torch.nn.utils.parameters_to_vector(model.parameters())``). Used by analyses that
evaluate modified weights, e.g. CMD reconstructions (:mod:`raydyn.jobs.cmd`).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.nn.utils import vector_to_parameters

from raydyn.tasks.build import init_model, load_data, load_snapshot
from raydyn.tasks.data import Dataset
from raydyn.train.objectives import accuracy, loss_fn


def run_model(cfg: dict[str, Any], data: Dataset | None = None, base_dir: str | None = None
              ) -> tuple[torch.nn.Module, Dataset]:
    """The run's model (its initial weights) and data set, built from its config (relative data paths
    resolved against ``base_dir``, the directory the sweep was launched from)."""
    from raydyn.tasks.plugins import add_search_path

    add_search_path(base_dir)  # plug-in modules that lived in the launch directory
    data = data if data is not None else load_data(cfg, base_dir)
    return init_model(cfg, data), data


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> bool:
    """Recompute every batch norm's running statistics for the model's current weights: reset them and
    average the batch statistics of ``x`` in chunks of ``batch_size`` (``torch.optim.swa_utils.update_bn``'s
    recipe). Weights that were never trained as such (e.g. a CMD reconstruction) have no statistics of
    their own. Returns False (and does nothing) when the model has no running statistics."""
    from torch.nn.modules.batchnorm import _BatchNorm

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the chunks
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return True


@torch.no_grad()
def evaluate_vectors(model: torch.nn.Module, data: Dataset, loss_name: str | None,
                     vectors: Iterable[np.ndarray | torch.Tensor], buffers: Any = None,
                     layout: dict[str, Any] | None = None, recalibrate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Test loss and accuracy of ``model`` with each flat weight vector loaded in turn.

    ``vectors``: (D,) arrays, D = number of model parameters, in ``model.parameters()`` order.
    Returns ``(loss (S,), accuracy (S,))`` on ``data.x_test``/``data.y_test`` with the loss and
    accuracy the trainer uses (accuracy in [0, 1]; NaN for regression), in ``eval()`` mode. ``buffers``:
    one flat buffer vector per weight vector (the snapshots' ``buffers`` column, order of
    ``layout['buffer_names']``), for models with running statistics. The model is left holding the
    last vector. ``recalibrate``: recompute batch norm statistics on the training set for each vector
    (:func:`recalibrate_bn`) instead of loading ``buffers``.
    """
    model.eval()
    x_train = data.head("train")[0] if recalibrate else None
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    dtype, name = params[0].dtype, loss_name or data.default_loss
    losses, accs = [], []
    for k, vec in enumerate(vectors):
        v = torch.as_tensor(np.asarray(vec) if not isinstance(vec, torch.Tensor) else vec).to(dtype)
        if v.shape != (n,):
            raise ValueError(f"weight vector {k} has shape {tuple(v.shape)}, the model has {n} parameters")
        vector_to_parameters(v, params)
        if recalibrate:
            recalibrate_bn(model, x_train)
            model.eval()
        elif buffers is not None and layout is not None:
            load_snapshot(model, layout, v, buffers[k])
        x_test, y_test = data.head("test")
        out = model(x_test)
        losses.append(float(loss_fn(name, out, y_test)))
        accs.append(float(accuracy(data.kind, out, y_test)))
    return np.array(losses, dtype=np.float64), np.array(accs, dtype=np.float64)
