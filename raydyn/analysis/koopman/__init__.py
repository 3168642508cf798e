"""Koopman spectra of trajectories and distances between them (topological conjugacy).

After Redman et al., "Identifying Equivalent Training Dynamics" (NeurIPS 2024): two
dynamical systems that are topologically conjugate share their Koopman eigenvalues,
so the distance between the DMD spectra of two training runs measures how far
they are from being equivalent.

Pipeline (all pure numpy/scipy, arrays in, arrays/dataclasses out):

1. :func:`spectrum` (:mod:`.dmd`) -- time-delay (Hankel) embedding of one or several
   trajectories, snapshot pairs formed inside each trajectory, exact DMD, eigenvalues.
2. :func:`wasserstein` (:mod:`.distances`) -- optimal-transport distance between two
   eigenvalue sets (uniform point masses in the complex plane, Euclidean ground cost).
3. :func:`pairwise_wasserstein` / :func:`wasserstein_block` (:mod:`.distances`) -- fast
   vectorised kernels for many spectra (the Ray fan-out in :mod:`raydyn.fanout` calls these).
4. :func:`conjugacy_test` (:mod:`.conjugacy`) -- permutation test over seed labels.
5. :func:`conjugacy_classes` (:mod:`.conjugacy`) -- hierarchical clustering of a distance matrix.

Units: eigenvalues are per recorded step (discrete-time, dimensionless) unless
``continuous=True``, in which case they are rates per unit of ``dt``.
"""
from __future__ import annotations

from raydyn.analysis.koopman.conjugacy import (
    ConjugacyTestResult,
    conjugacy_classes,
    conjugacy_test,
    seed_threshold,
)
from raydyn.analysis.koopman.distances import pairwise_wasserstein, wasserstein, wasserstein_block
from raydyn.analysis.koopman.dmd import DMDResult, fit_dmd, gavish_donoho_omega, hankel_snapshots, spectrum

__all__ = [
    "DMDResult",
    "ConjugacyTestResult",
    "hankel_snapshots",
    "fit_dmd",
    "spectrum",
    "wasserstein",
    "wasserstein_block",
    "pairwise_wasserstein",
    "conjugacy_test",
    "conjugacy_classes",
    "seed_threshold",
    "gavish_donoho_omega",
]
