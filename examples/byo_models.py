"""Two plug-in model factories for raydyn: a VGG-style CNN and a small ResNet, with ordinary batch norm.

They are the models of the ``byo_cnn`` / ``byo_resnet`` ("bring your own") sweeps, which train
them on an image folder from disk (e.g. the one ``examples/make_digits_images.py`` writes); they
show how to plug your own architecture into a sweep::

    task:
      model: "byo_models:vgg"          # this file's folder on PYTHONPATH (driver and Ray workers)
      dataset: image_folder
      data: {root: examples/data/digits_png, size: 16}
      depth: 2
      width: 16
      model_options: {bn_eps: 1.0e-5}

**The plug-in model contract.** raydyn calls ``factory(input_shape=(C, H, W), out_dim=int,
**options)`` under ``torch.manual_seed(<run seed>)`` (so two runs with one seed get the same
initial weights) and gets an ``nn.Module`` mapping a batch (B, C, H, W) to logits (B, out_dim).
``options`` are ``depth``, ``width``, ``activation`` when the sweep sets them, and every key of
``task.model_options``. A population of such models is trained at once with ``torch.func``:
parameters and buffers are stacked (``stack_module_state``) and every step is
``vmap(grad(functional_call(model, (params, buffers), x)))`` with one slice of parameters and
buffers per member. So the forward must be a pure tensor program: no ``.item()``, no Python
control flow that depends on tensor values, no in-place ops on parameters. Batch norm's running
statistics are buffers, updated in place per member (``vmap`` keeps each member's own).

Conv layers are followed directly by their ``BatchNorm2d`` (registration order = execution
order), so raydyn's symmetry analysis finds the scale symmetry of every conv channel. In the
ResNet, :class:`Fork` and :class:`AddReLU` mark where the skip connection leaves and rejoins:
they are opaque to that analysis, which must not claim a rescale symmetry across a skip.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def _image_shape(input_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"{what} needs image inputs (C, H, W), got input_shape={shape}")
    return shape  # type: ignore[return-value]


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def vgg(input_shape: Sequence[int], out_dim: int, depth: int = 2, width: int = 16, activation: str = "relu",
        bn_eps: float = 1e-5) -> nn.Module:
    """VGG-style CNN: ``depth`` x [Conv3x3(width, pad 1) -> BatchNorm2d -> activation -> MaxPool2d(2)
    while the spatial size is > 1] -> global average pool -> flatten -> Linear(out_dim).

    input_shape: (C, H, W); output: (B, out_dim) logits. ``width`` channels in every block.
    BatchNorm2d has PyTorch's defaults (affine, running statistics, momentum 0.1) and ``eps=bn_eps``.
    ``activation``: relu | leaky_relu | gelu | silu | tanh | elu.
    """
    c, h, w = _image_shape(input_shape, "vgg")
    depth, width, out_dim = _positive("depth", depth), _positive("width", width), _positive("out_dim", out_dim)
    if activation not in ACTIVATIONS:
        raise ValueError(f"vgg: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width, eps=bn_eps), ACTIVATIONS[activation]()]
        if h > 1 and w > 1:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, out_dim)]
    return nn.Sequential(*layers)


class Fork(nn.Module):
    """Identity that marks where a skip connection branches off (opaque to the symmetry analysis)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AddReLU(nn.Module):
    """``relu(h + skip)``: where a residual branch rejoins its skip connection."""

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.relu(h + skip)


class BasicBlock(nn.Module):
    """Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN, plus the identity, then ReLU (He et al. 2016)."""

    def __init__(self, width: int, bn_eps: float):
        super().__init__()
        self.fork = Fork()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.join = AddReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.fork(x)
        h = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(skip)))))
        return self.join(h, skip)


class ResNet(nn.Module):
    """stem [Conv3x3 -> BN -> ReLU] -> blocks -> global average pool -> flatten -> Linear."""

    def __init__(self, in_channels: int, out_dim: int, depth: int, width: int, bn_eps: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width, eps=bn_eps), nn.ReLU())
        self.blocks = nn.Sequential(*(BasicBlock(width, bn_eps) for _ in range(depth)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def resnet(input_shape: Sequence[int], out_dim: int, depth: int = 2, width: int = 16,
           bn_eps: float = 1e-5) -> nn.Module:
    """Small ResNet: stem Conv3x3(width) -> BN -> ReLU, ``depth`` basic residual blocks at ``width``
    channels and full resolution (identity skips), global average pool, Linear(out_dim).

    input_shape: (C, H, W); output: (B, out_dim) logits. Convs have no bias (BN follows each);
    BatchNorm2d has PyTorch's defaults and ``eps=bn_eps``.
    """
    c, _, _ = _image_shape(input_shape, "resnet")
    depth, width, out_dim = _positive("depth", depth), _positive("width", width), _positive("out_dim", out_dim)
    return ResNet(c, out_dim, depth, width, bn_eps)
