"""Population checkpoints on disk: JSON metadata plus numpy arrays, no pickle.

:class:`raydyn.train.population.TrainState` turns a training state into a
:class:`PopulationCheckpoint` and back; this module only knows the file format.
Arrays are host (numpy) arrays whatever device trained the population, so a checkpoint
written on a GPU resumes on a CPU and vice versa.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Bumped when the layout changes; 2 added buffers (running statistics) and the RNG state.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
_META, _ARRAYS = "meta.json", "state.npz"


@dataclass
class PopulationCheckpoint:
    """A population's training state at a step boundary, as JSON metadata plus numpy arrays.

    On disk a checkpoint is a directory with ``state.npz`` (arrays, read back with
    ``allow_pickle=False``) and ``meta.json`` (written last: a directory with a
    ``meta.json`` holds a whole checkpoint). Nothing is pickled, so loading a
    checkpoint cannot run code.
    """

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def step(self) -> int:
        """The step that training resumes at."""
        return int(self.meta["step"])

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / _ARRAYS, **self.arrays)
        tmp = d / f".{_META}.tmp"
        tmp.write_text(json.dumps(self.meta, sort_keys=True))
        os.replace(tmp, d / _META)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "PopulationCheckpoint":
        d = Path(directory)
        if not (d / _META).is_file():
            raise ValueError(f"{d}: not a population checkpoint (no {_META})")
        meta = json.loads((d / _META).read_text())
        if meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{d}: checkpoint format {meta.get('format')!r}, this raydyn reads {CHECKPOINT_FORMAT}")
        with np.load(d / _ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(meta, arrays)


