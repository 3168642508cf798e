"""Sweep files: YAML text -> validated, frozen config objects.

This is the one module that knows the sweep-file format. Everything downstream
sees :class:`SweepSpec` (the whole file), :class:`RunConfig` (one training run,
flat and JSON-able) and :class:`PopulationSpec` (runs trained together in one
Ray Tune trial).

Format (see ``sweeps/quickstart.yaml`` and the README for a tour)::

    name: quickstart              # sweep name; results live under it in the store
    task:                         # what is trained: data set, model, fixed options
      dataset: digits             # teacher | digits | modular | parity
      data: {}                    # data-set options (see raydyn.tasks.registry)
      model: mlp                  # mlp | cnn | transformer
      depth: 2
      width: 64
    train:                        # how it is trained and what is recorded
      steps: 300
      batch_size: 64
      optimizer: sgd              # sgd | adam | adamw
      lr: 0.1
      record_every: 10
      record: [weights]
    method: grid                  # grid | random | optuna
    parameters:                   # swept values, W&B style
      lr: {values: [0.01, 0.1, 1.0]}
      width: {values: [16, 64]}
      seed: {values: [0, 1]}
    resources: {cpu: 1, max_concurrent: 2}

Every swept parameter name is a key of ``task`` or ``train`` (or ``data.<option>``).
Errors name the key path (``train.lr``, ``parameters.width.values[2]``), the bad
value and what is allowed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydyn.errors import SpecError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# optimisers as dynamical systems (no network: model 'none', raydyn.train.dynamics)
DYNAMICS_OPTIMIZERS = ("omd", "ogd", "bisection")

# Parameters that may differ between members of one population (one Tune trial):
# they are per-member tensors in the vectorised optimiser. Everything else is
# shared by a population.
PER_MEMBER = ("seed", "perturb", "init_perturb", "init_scale", "lr", "momentum", "weight_decay", "dampening", "beta1",
              "beta2", "eps", "embed_lr", "embed_weight_decay", "fixed_norm", "schedule", "warmup_steps",
              "final_lr_factor", "decay_every", "decay_gamma", "clip_grad_norm")

# Train settings that say how a run is executed, not what is trained: they change no result,
# so they are kept out of run configs (and run ids) and cannot be swept.
EXECUTION_ONLY = ("checkpoint_every", "checkpoint_minutes", "device")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Model):
    """What is trained: data set, model and fixed model options.

    ``model`` and ``dataset`` are names in :mod:`raydyn.tasks.registry`: built-ins, data-from-disk
    kinds, ``module:callable`` import paths of the user's own code, or names registered by an
    installed package. Model fields left unset (``None``) take the built-in models' defaults;
    a plug-in model gets only the fields the sweep sets, plus ``model_options``.
    """

    dataset: str
    data: dict[str, Any] = Field(default_factory=dict)
    model: str = "mlp"
    model_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options of a plug-in model's factory; each key is sweepable "
        "as model_options.<key>")
    depth: int | None = Field(None, ge=1, le=1024, description="hidden layers (mlp), conv layers (cnn), blocks "
                              "(transformer, 1-2); default 2")
    width: int | None = Field(None, ge=1, le=65536, description="hidden units (mlp), channels (cnn), d_model "
                              "(transformer); default 64")
    activation: str | None = Field(None, description="relu | tanh | gelu | linear | leaky_relu | sigmoid for the "
                                   "built-in models (default relu); passed as given to a plug-in")
    batch_norm: bool | None = Field(None, description="built-in mlp/cnn: batch norm after each hidden layer")
    bn_eps: float | None = Field(None, gt=0, description="batch norm epsilon (PyTorch's default 1e-5); a tiny value "
                                 "(e.g. 1e-300 with dtype float64) makes the scale symmetry exact")
    bias: bool | None = Field(None, description="built-in models: layers have biases (default true)")
    heads: int | None = Field(None, ge=1, le=64, description="transformer attention heads (default 4)")
    init_scale: float = Field(1.0, gt=0, description="multiplies every initial parameter tensor")
    init_perturb: float = Field(0.0, ge=0, description="nearby initialisations: each initial parameter times "
                                "(1 + init_perturb * U(-1, 1)), drawn from (seed, perturb)")
    perturb: int = Field(0, ge=0, description="index of the perturbation draw (sweep it for several nearby inits)")
    init: Literal["torch", "nanda"] = Field(
        "torch", description="initialisation: PyTorch's defaults, or (transformer only) Nanda et al. 2023's: every "
        "matrix N(0, 1/d_model), the unembedding N(0, 1/vocab), biases 0")

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        from raydyn.tasks import registry

        try:
            registry.model(v)
        except ValueError as e:  # PluginError: reported at the key path task.model
            raise ValueError(str(e).removeprefix("task.model: ")) from None
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, v: str) -> str:
        from raydyn.tasks import registry

        try:
            registry.dataset(v)
        except ValueError as e:
            raise ValueError(str(e).removeprefix("task.dataset: ")) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        from raydyn.tasks import registry

        registry.check_task(self.model_dump())
        return self

    def data_options(self) -> dict[str, Any]:
        """Every option of the data set, defaults filled in and values coerced to their types."""
        from raydyn.tasks import registry

        return registry.dataset(self.dataset).resolved(self.data)


class WeightsSpec(_Model):
    """How weight snapshots are stored."""

    max_size: int = Field(200_000, ge=1, description="store all parameters as float32 up to this many")
    projection_dim: int = Field(4096, ge=8, description="above max_size: seeded CountSketch to this many dims")
    layers: list[str] | None = Field(None, description="store only these parameter names (prefix match) instead")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="snapshot precision; float64 for full-rank spectral analyses of small systems")


class CMDOnlineSpec(_Model):
    """Online correlation mode decomposition in the recorder (``train.record: [cmd_online]``)."""

    warmup: int = Field(20, ge=3, description="recorded steps buffered to find the modes, then O(N) updates")
    modes: int | None = Field(None, ge=1, description="number of modes; null: the fewest reaching `tolerance`")
    tolerance: float = Field(0.01, gt=0, le=1, description="relative reconstruction error for the automatic choice")
    samples: int = Field(1000, ge=2, description="parameters sampled (layer-balanced) to cluster into modes")


EARLY_STOP_METRICS = ("train_loss", "test_loss", "train_acc", "test_acc")


class EarlyStopSpec(_Model):
    """Successive halving inside a population (``train.early_stop``): at each rung step the members still
    training are ranked by configuration (members that differ only in ``seed`` form one configuration,
    scored by their mean ``metric`` over seeds) and all but the best ``ceil(n / eta)`` configurations stop
    (status ``stopped``). Rungs are ``min_step, min_step * eta, min_step * eta^2, ...`` below ``steps``, or
    the explicit list ``rungs``; every rung must be an evaluation step (a multiple of ``eval_every``)."""

    metric: Literal["train_loss", "test_loss", "train_acc", "test_acc"] = Field(
        description="the evaluated metric runs are ranked by at each rung")
    mode: Literal["min", "max"] | None = Field(None, description="min or max is better; default: max for *_acc, "
                                               "else min")
    min_step: int | None = Field(None, ge=1, description="the first rung; later ones at min_step * eta^k < steps")
    eta: int = Field(2, ge=2, description="keep the best ceil(n / eta) of the n configurations at each rung")
    rungs: list[int] | None = Field(None, description="explicit rung steps instead of min_step (increasing)")

    @model_validator(mode="after")
    def _check(self) -> "EarlyStopSpec":
        if (self.min_step is None) == (self.rungs is None):
            raise ValueError("give exactly one of min_step (rungs at min_step * eta^k) or rungs (a list of steps)")
        if self.rungs is not None:
            if not self.rungs:
                raise ValueError("train.early_stop.rungs: the list is empty; give at least one step")
            for i, r in enumerate(self.rungs):
                if r < 1 or (i and r <= self.rungs[i - 1]):
                    raise ValueError(f"train.early_stop.rungs[{i}]: {r} must be >= 1 and greater than the rung before it; rungs are "
                                     "increasing steps")
        if self.mode is None:
            object.__setattr__(self, "mode", "max" if self.metric.endswith("_acc") else "min")
        return self


def early_stop_rungs(es: dict[str, Any] | None, steps: int) -> list[int]:
    """The rung steps of a resolved ``train.early_stop`` setting (a run config's ``early_stop``): the explicit
    ``rungs``, or ``min_step * eta^k`` below ``steps``; [] without early stopping."""
    if not es:
        return []
    if es.get("rungs"):
        return [int(r) for r in es["rungs"]]
    out, r = [], int(es["min_step"])
    while r < steps:
        out.append(r)
        r *= int(es["eta"])
    return out


class TrainSpec(_Model):
    """How runs are trained and what is recorded."""

    steps: int = Field(ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1, description="minibatch size; >= data size means full batch")
    optimizer: Literal["sgd", "adam", "adamw", "omd", "ogd", "bisection"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    dampening: float = Field(0.0, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    loss: Literal["cross_entropy", "mse", "hinge"] | None = None
    seed: int = Field(0, ge=0, lt=2**31)
    record_every: int = Field(10, ge=1)
    record: list[Literal["weights", "weight_stats", "ntk", "sharpness", "cmd_online", "symmetry", "neurons"]] = Field(
        default_factory=lambda: ["weights"]
    )
    curvature_every: int | None = Field(
        None, ge=1,
        description="record probes ntk/sharpness every this many steps (a multiple of record_every; default "
        "eval_every); NaN on other record rows",
    )
    curvature_batch: int = Field(256, ge=1, description="training samples (the first n) used for the NTK, "
                                 "the sharpness and lambda0")
    lr_units: Literal["absolute", "ntk"] = Field(
        "absolute", description="ntk: lr is eta*lambda0; each run trains at lr/lambda0, lambda0 = its NTK top "
        "eigenvalue at init on the curvature batch")
    embed_lr: float | None = Field(None, gt=0, description="learning rate of embedding parameters (names "
                                   "starting with 'embed'); default: lr")
    embed_weight_decay: float | None = Field(None, ge=0, description="weight decay of embedding parameters; "
                                             "default: weight_decay")
    fixed_norm: float | None = Field(
        None, gt=0,
        description="constrained training (Liu et al. 2022, Omnigrok; Redman et al. 2024): the initial parameters "
        "are multiplied by this factor, and after every optimiser step all parameters are rescaled together so "
        "their total L2 norm stays at that initial value; null: unconstrained")
    weights: WeightsSpec = Field(default_factory=WeightsSpec)
    cmd: CMDOnlineSpec = Field(default_factory=CMDOnlineSpec, description="settings of `record: [cmd_online]`")
    eval_every: int | None = Field(
        None, ge=1,
        description="full train/test evaluation every this many steps (and at the first and last step); "
        "default: record_every when it is >= 100, else 100. Between evaluations train/test columns are NaN, "
        "batch_loss is always recorded",
    )
    eval_size: int = Field(2048, ge=1, description="train-set samples used to evaluate train loss/accuracy")
    divergence_factor: float = Field(1e4, gt=1, description="diverged when loss > factor x initial loss (or NaN/inf)")
    dtype: Literal["float32", "float64"] = "float32"
    schedule: Literal["constant", "cosine", "linear", "step"] = Field(
        "constant", description="learning-rate schedule after the warm-up, over the remaining steps: constant; "
        "cosine (torch CosineAnnealingLR to final_lr_factor x lr); linear (torch LinearLR to final_lr_factor x lr); "
        "step (torch StepLR: x decay_gamma every decay_every steps)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up: step t < warmup_steps trains at "
                              "lr (t + 1) / (warmup_steps + 1) (torch LinearLR, start_factor 1/(warmup_steps + 1))")
    final_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine/linear schedules end at this x lr")
    decay_every: int | None = Field(None, ge=1, description="step schedule: steps between decays")
    decay_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: factor of each decay")
    clip_grad_norm: float | None = Field(
        None, gt=0, description="clip each run's gradient to this total L2 norm before the update "
        "(torch.nn.utils.clip_grad_norm_); grad_norm records the norm before clipping; null: no clipping")
    precision: Literal["full", "bf16"] = Field(
        "full", description="full: compute in `dtype`; bf16: forward passes under torch.autocast(bfloat16) "
        "(parameters, gradients and optimiser state stay in `dtype`)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where a trial trains: auto = cuda when Ray gave the trial a GPU (resources.gpu), "
        "else cpu. An execution setting: not part of a run's config or id, not sweepable")
    checkpoint_every: int | None = Field(
        None, ge=0,
        description="save a population's full training state every this many steps (0: never; null: every "
        "checkpoint_minutes of training), so a trial that Ray Tune retries (node lost, worker crash) resumes there "
        "instead of at step 0. An execution setting: not part of a run's config or id, not sweepable",
    )
    early_stop: EarlyStopSpec | None = Field(
        None, description="successive halving inside each population: at rung steps the worst configurations "
        "stop (status stopped); null: every run trains all steps")
    checkpoint_minutes: float = Field(
        5.0, gt=0, description="with checkpoint_every: null, a checkpoint after every this many minutes of "
        "training (a short trial writes none: retrying it costs less than checkpointing it)")

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.eval_every is None:
            object.__setattr__(self, "eval_every", max(self.record_every, 100))
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0")
        if self.curvature_every is None:  # the record step at or before each evaluation
            object.__setattr__(self, "curvature_every", self.record_every * max(1, self.eval_every // self.record_every))
        if self.curvature_every % self.record_every:
            raise ValueError(f"curvature_every ({self.curvature_every}) must be a multiple of record_every "
                             f"({self.record_every}): curvature is measured on record steps")
        if self.schedule == "step" and self.decay_every is None:
            raise ValueError("schedule: 'step' needs decay_every (steps between learning-rate decays)")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be less than steps ({self.steps})")
        if self.precision == "bf16" and self.dtype == "float64":
            raise ValueError("precision: bf16 autocasts float32 computation; it does not go with dtype: float64")
        if self.early_stop is not None:
            es, where = self.early_stop, "train.early_stop"
            if self.optimizer in DYNAMICS_OPTIMIZERS:
                raise ValueError(f"{where}: optimizer {self.optimizer!r} (an optimiser as a dynamical system) has no "
                                 "evaluation steps to stop at; remove early_stop")
            rungs = early_stop_rungs(es.model_dump(), self.steps)
            for i, r in enumerate(rungs):
                key = f"{where}.rungs[{i}]" if es.rungs is not None else f"{where}.min_step"
                if r >= self.steps:
                    raise ValueError(f"{key}: rung {r} is not before the last step (steps: {self.steps}); a run "
                                     "stops at a rung only before it ends")
                if r % self.eval_every:
                    raise ValueError(f"{key}: rung {r} is not an evaluation step (eval_every: {self.eval_every}); "
                                     "rungs rank runs by evaluated metrics, so each must be a multiple of eval_every: "
                                     f"set train.eval_every: {math.gcd(*[int(x) for x in rungs if x < self.steps])} "
                                     "(or a divisor of it)")
            if es.min_step is not None and es.min_step >= self.steps:
                raise ValueError(f"{where}.min_step: {es.min_step} is not before the last step (steps: {self.steps})")
        if "cmd_online" in self.record and self.cmd.warmup > self.steps // self.record_every + 1:
            raise ValueError(f"cmd.warmup: {self.cmd.warmup} recorded steps, but steps={self.steps} with "
                             f"record_every={self.record_every} records only {self.steps // self.record_every + 1}")
        return self


class ParamSpec(_Model):
    """One swept parameter: a list of values, one fixed value, or a distribution."""

    values: list[Any] | None = None
    value: Any = None
    distribution: Literal["uniform", "log_uniform", "int_uniform"] | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "ParamSpec":
        given = [k for k in ("values", "value", "distribution") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'values' (a list), 'value' (one value) or 'distribution' (with min/max)"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.values is not None and len(self.values) == 0:
            raise ValueError("values: the list is empty; give at least one value")
        if self.distribution is not None:
            if self.min is None or self.max is None:
                raise ValueError(f"distribution {self.distribution!r} needs both 'min' and 'max'")
            if not self.min < self.max:
                raise ValueError(f"min ({self.min}) must be < max ({self.max})")
            if self.distribution == "log_uniform" and self.min <= 0:
                raise ValueError(f"log_uniform needs min > 0, got {self.min} (raydyn's log_uniform takes the bounds of "
                                 "the values, like W&B's log_uniform_values; W&B's log_uniform takes their natural logs)")
            if self.distribution == "int_uniform" and math.ceil(self.min) > math.floor(self.max):
                raise ValueError(f"int_uniform: no integer lies in [{self.min}, {self.max}]; the search space is empty")
        elif self.min is not None or self.max is not None:
            raise ValueError("'min'/'max' only go with 'distribution'")
        return self

    def is_list(self) -> bool:
        return self.distribution is None

    def listed(self) -> list[Any]:
        return list(self.values) if self.values is not None else [self.value]


class ResourcesSpec(_Model):
    cpu: float = Field(1, gt=0, description="CPUs per trial (one trial trains one population)")
    gpu: float = Field(0, ge=0, description="GPUs per trial")
    max_concurrent: int | None = Field(None, ge=1, description="at most this many trials at once")
    population_size: int = Field(64, ge=1, description="at most this many runs vectorised in one trial")


def _cross_check(task: TaskSpec, train: TrainSpec) -> None:
    """Rules that tie task and train together (raised as ValueError, reported with the point)."""
    from raydyn.tasks import registry

    dyn = train.optimizer in DYNAMICS_OPTIMIZERS
    if dyn != (registry.model(task.model).trainer == "dynamics"):
        raise ValueError(f"optimizer {train.optimizer!r} "
                         + ("is an optimiser-as-dynamical-system method and needs model 'none' (dataset tan_sum)"
                            if dyn else "trains a network and needs a model (mlp, cnn, transformer), not 'none'"))
    if dyn:
        n = task.data_options()["grid"] ** 2
        if not 0 <= train.seed < n:
            raise ValueError(f"seed {train.seed} is not an initial condition of the tan_sum grid (seeds 0..{n - 1})")


# ---------------------------------------------------------------------- W&B sweep-config keys
# W&B's keys (docs.wandb.ai, "Sweep configuration options") that mean what a raydyn key means are
# translated before validation; the others are refused, naming the key path. raydyn's own task:/train:
# sections stay required: they say what is trained (W&B's program: would).
_PARAM_FORMS = ("raydyn's parameters are a list of `values`, one `value`, or a `distribution` uniform | "
                "log_uniform (= W&B's log_uniform_values) | int_uniform with min/max")
_WANDB_DISTRIBUTIONS_REFUSED = {
    "q_uniform": "W&B's quantised uniform, round(X / q) * q",
    "q_log_uniform": "W&B's quantised log-uniform",
    "q_log_uniform_values": "W&B's quantised log-uniform",
    "inv_log_uniform": "W&B's inverse log-uniform",
    "inv_log_uniform_values": "W&B's inverse log-uniform",
    "normal": "W&B's normal distribution",
    "q_normal": "W&B's quantised normal distribution",
    "log_normal": "W&B's log-normal distribution",
    "q_log_normal": "W&B's quantised log-normal distribution",
    "beta": "W&B's beta distribution",
    "q_beta": "W&B's quantised beta distribution",
}
_WANDB_PARAM_KEYS_REFUSED = {
    "q": "W&B's quantisation step; raydyn does not quantise draws (int_uniform draws integers, or list the values)",
    "mu": "the mean of W&B's normal distributions, which raydyn does not have",
    "sigma": "the standard deviation of W&B's normal distributions, which raydyn does not have",
    "a": "a parameter of W&B's beta distribution, which raydyn does not have",
    "b": "a parameter of W&B's beta distribution, which raydyn does not have",
    "probabilities": "raydyn draws a list's values with equal probability (repeat a value to weight it in random "
                     "search)",
}


def _wandb_param(name: str, p: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """One parameter entry with W&B's distribution names mapped to raydyn's, and what cannot be mapped."""
    where, p = f"parameters.{name}", dict(p)
    if "parameters" in p:
        return p, [f"{where}.parameters: nested parameters are W&B's; raydyn's parameters are flat names of task/train "
                   "settings (e.g. momentum, width, data.p, model_options.k)"]
    dist = p.get("distribution")
    if isinstance(dist, str) and dist in _WANDB_DISTRIBUTIONS_REFUSED:
        return p, [f"{where}.distribution: {dist!r} ({_WANDB_DISTRIBUTIONS_REFUSED[dist]}) is not supported; "
                   f"{_PARAM_FORMS}"]
    problems = [f"{where}.{k}: {why}" for k, why in _WANDB_PARAM_KEYS_REFUSED.items() if k in p]
    if dist == "constant":  # W&B's spelled-out `value`
        if "value" in p:
            del p["distribution"]
        else:
            problems.append(f"{where}: distribution 'constant' needs 'value'")
    elif dist == "categorical":  # W&B's spelled-out `values`
        if "values" in p:
            del p["distribution"]
        else:
            problems.append(f"{where}: distribution 'categorical' needs 'values' (a list)")
    elif dist == "log_uniform_values":  # log(X) uniform between log(min) and log(max): raydyn's log_uniform
        p["distribution"] = "log_uniform"
    elif dist is None and ("min" in p or "max" in p) and "values" not in p and "value" not in p:
        # W&B's default: int_uniform when both bounds are integers, else uniform
        ints = all(isinstance(p.get(k), int) and not isinstance(p.get(k), bool) for k in ("min", "max"))
        p["distribution"] = "int_uniform" if ints else "uniform"
    return p, problems


def _wandb_aliases(data: Any) -> Any:
    """A sweep file's top-level mapping with W&B's keys translated to raydyn's (``method: bayes`` ->
    ``optuna``, ``metric: {name, goal}`` -> ``metric`` + ``goal``, ``run_cap`` -> ``num_samples``, W&B's
    distributions); raises ValueError naming each W&B key raydyn has no meaning for."""
    if not isinstance(data, dict):
        return data
    data, problems = dict(data), []
    for key in ("program", "command"):
        if key in data:
            problems.append(f"{key}: raydyn runs no training script: it trains the sweep file's task: (data set, "
                            f"model) with its train: settings itself; remove {key}: and describe the training there")
    if "early_terminate" in data:
        problems.append("early_terminate: W&B's Hyperband counts iterations in logged results, which do not map to "
                        "raydyn's training steps; raydyn's early stopping is train.early_stop (successive halving at "
                        "evaluation steps: {metric: test_loss, min_step: 100, eta: 2}, or rungs: [...]); remove "
                        "early_terminate")
    for key in ("project", "entity"):
        if key in data:
            problems.append(f"{key}: W&B's {key} says where runs are logged; raydyn writes them to its store (--store "
                            "or $RAYDYN_STORE) under the sweep's name; remove it")
    metric = data.get("metric")
    if isinstance(metric, dict):  # W&B: metric: {name, goal, target}
        for k in metric:
            if k == "target":
                problems.append("metric.target: raydyn does not stop a sweep when a run reaches a target value; "
                                "remove it")
            elif k not in ("name", "goal"):
                problems.append(f"metric.{k}: unknown key; allowed keys here: name, goal")
        if "name" not in metric:
            problems.append("metric.name: required key is missing (the final_* column to optimise, e.g. final_test_loss)")
        goal = metric.get("goal")
        if goal is not None and goal not in ("minimize", "maximize"):
            problems.append(f"metric.goal: {goal!r} is not minimize or maximize")
        elif goal is not None and data.get("goal", goal) != goal:
            problems.append(f"goal: {data['goal']!r} contradicts metric.goal {goal!r}; give one of them")
        data["metric"] = metric.get("name")
        if goal is not None:
            data["goal"] = goal
    if "run_cap" in data:  # W&B: at most this many runs
        cap = data.pop("run_cap")
        seed = (data.get("parameters") or {}).get("seed") if isinstance(data.get("parameters"), dict) else None
        n_seeds = len(seed["values"]) if isinstance(seed, dict) and isinstance(seed.get("values"), list) else 1
        if data.get("method", "grid") == "grid":
            problems.append("run_cap: a grid sweep trains every combination of its values; remove run_cap")
        elif "num_samples" in data:
            problems.append("run_cap: give num_samples (raydyn's name) or W&B's run_cap, not both")
        elif n_seeds > 1:
            problems.append(f"run_cap: each drawn point is trained once per seed ({n_seeds} seeds), so runs are not "
                            "points; give num_samples (the points to draw) instead")
        else:
            data["num_samples"] = cap
    if data.get("method") == "bayes":  # W&B's Bayesian search: raydyn's Optuna search (TPE sampler)
        missing = []
        if data.get("num_samples") is None:
            missing.append("num_samples (how many points to try, or W&B's run_cap; W&B's bayes runs until it is stopped)")
        if data.get("metric") is None:
            missing.append("metric (the final_* column to optimise, e.g. metric: {name: final_test_loss, "
                           "goal: minimize})")
        if missing:
            problems.append("method: 'bayes' (W&B's Bayesian search) runs as raydyn's 'optuna' (Optuna's TPE "
                            f"sampler on Ray Tune), which needs {' and '.join(missing)}; raydyn's methods: 'grid', "
                            "'random', 'optuna'")
        data["method"] = "optuna"
    params = data.get("parameters")
    if isinstance(params, dict):
        mapped = {}
        for pname, p in params.items():
            mapped[pname], more = _wandb_param(str(pname), p) if isinstance(p, dict) else (p, [])
            problems += more
        data["parameters"] = mapped
    if problems:
        raise ValueError("\n  ".join(problems))
    return data


class SweepSpec(_Model):
    """A whole sweep file, validated.

    W&B sweep configs' own keys are accepted where they mean what raydyn's do (:func:`_wandb_aliases`);
    the file still names what is trained under ``task:`` and ``train:``.
    """

    name: str
    description: str = ""
    task: TaskSpec
    train: TrainSpec
    method: Literal["grid", "random", "optuna"] = "grid"
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    num_samples: int | None = Field(None, ge=1, description="points drawn by random/optuna (each crossed with every seed)")
    metric: str | None = Field(None, description="optuna objective: a final_* column of the runs table")
    goal: Literal["minimize", "maximize"] = "minimize"
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    phases: dict[str, Any] = Field(default_factory=dict, description="phase thresholds (see raydyn.analysis.phase)")

    @model_validator(mode="before")
    @classmethod
    def _wandb_keys(cls, data: Any) -> Any:
        return _wandb_aliases(data)

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: dict[str, Any]) -> dict[str, Any]:
        from raydyn.analysis.phase import PhaseThresholds

        PhaseThresholds.from_mapping(v)  # ValueError naming phases.<key>
        return v

    def thresholds(self):
        """The phase rules' thresholds (:class:`raydyn.analysis.phase.PhaseThresholds`) of this sweep."""
        from raydyn.analysis.phase import PhaseThresholds

        return PhaseThresholds.from_mapping(self.phases)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid sweep name: use letters, digits, '_', '-', '.' (max 100)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        swept = set(self.parameters)
        if not {"optimizer", "model", "seed"} & swept:
            _cross_check(self.task, self.train)
        if self.method == "grid":
            for pname, p in self.parameters.items():
                if not p.is_list():
                    raise ValueError(
                        f"parameters.{pname}: method 'grid' needs a list of 'values', not a distribution "
                        "(use method: random or optuna for distributions)"
                    )
            if self.num_samples is not None:
                raise ValueError("num_samples: only used by method random/optuna; a grid runs every combination")
        else:
            if self.num_samples is None:
                raise ValueError(f"num_samples: method {self.method!r} needs num_samples (how many points to draw)")
        if self.method == "optuna":
            if not self.metric:
                raise ValueError("metric: method 'optuna' needs the metric to optimise, e.g. final_test_loss")
            if not self.metric.startswith("final_"):
                raise ValueError(f"metric: {self.metric!r} is not a final_* metric (e.g. final_test_loss, final_train_loss)")
            es = self.train.early_stop
            if es is not None and (es.mode == "min") != (self.goal == "minimize"):
                raise ValueError(f"train.early_stop.mode: {es.mode!r} ({es.metric}) prunes Optuna trials in the "
                                 f"opposite direction to goal: {self.goal!r}; rank by a metric of the same direction")
        return self

    # ------------------------------------------------------------------ expansion
    def run_config(self, point: dict[str, Any]) -> "RunConfig":
        """The run at one point of the search space, values coerced to their field types."""
        from raydyn.tasks import registry

        task = self.task.model_dump()
        train = self.train.model_dump()
        for name, value in point.items():
            if name.startswith("data."):
                task["data"] = {**task["data"], name[5:]: value}
            elif name.startswith("model_options."):
                task["model_options"] = {**task["model_options"], name[14:]: value}
            elif name in task:
                task[name] = value
            else:
                train[name] = value
        t, tr = TaskSpec.model_validate(task), TrainSpec.model_validate(train)
        try:
            _cross_check(t, tr)
        except ValueError as e:  # reported per point by expand()
            raise ValidationError.from_exception_data("RunConfig", [
                {"type": "value_error", "loc": ("train",), "input": point, "ctx": {"error": e}}]) from None
        task_cfg = registry.builtin_defaults(t.model_dump())
        if registry.model(t.model).plugin:  # a plug-in reads none of the built-ins' fields: keep them out
            task_cfg = {k: v for k, v in task_cfg.items() if not (k in registry.BUILTIN_ONLY_FIELDS and v is None)}
        cfg = {**task_cfg, **tr.model_dump(exclude=set(EXECUTION_ONLY))}
        cfg["data"] = t.data_options()  # defaults filled in, each value of its option's type
        cfg["record"] = sorted(set(cfg["record"]))
        if "cmd_online" not in cfg["record"]:  # unused settings must not change the run id
            cfg.pop("cmd", None)
        return RunConfig(cfg, run_id_of(cfg))

    def axes(self) -> list[str]:
        """Swept parameter names with more than one value (or a distribution), in file order."""
        return [k for k, p in self.parameters.items() if not p.is_list() or len(p.listed()) > 1]

    def expand(self) -> list["RunConfig"]:
        """All runs of a grid or random sweep, deterministic (so resume finds them again).

        For ``random`` every drawn point is crossed with every listed seed.
        ``optuna`` sweeps are expanded trial by trial by the searcher instead.
        """
        if self.method == "grid":
            names = list(self.parameters)
            combos = itertools.product(*[self.parameters[n].listed() for n in names])
            points = [dict(zip(names, c)) for c in combos]
        elif self.method == "random":
            rng = random.Random(f"raydyn:{self.name}")
            seeds = self.parameters["seed"].listed() if "seed" in self.parameters else [self.train.seed]
            points = []
            for _ in range(self.num_samples or 0):
                pt = {n: _draw(p, rng) for n, p in self.parameters.items() if n != "seed"}
                points.extend({**pt, "seed": s} for s in seeds)
        else:
            raise SpecError("optuna sweeps are expanded by the searcher, one population per trial")
        runs, bad = [], []
        for pt in points:
            try:
                runs.append(self.run_config(pt))
            except ValidationError as e:
                reason = "; ".join(x["msg"].removeprefix("Value error, ") for x in e.errors())
                bad.append(f"{pt}: {reason}")
        if bad:
            head = "no point of the search space is valid" if not runs else f"{len(bad)} of {len(points)} points are invalid"
            raise SpecError(f"sweep {self.name!r}: {head}:\n  " + "\n  ".join(bad[:5])
                            + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""))
        # identical points (e.g. a one-value list next to the default) collapse to one run
        unique = {r.run_id: r for r in runs}
        return list(unique.values())


def _draw(p: ParamSpec, rng: random.Random) -> Any:
    if p.is_list():
        return rng.choice(p.listed())
    lo, hi = float(p.min), float(p.max)  # type: ignore[arg-type]
    if p.distribution == "uniform":
        return rng.uniform(lo, hi)
    if p.distribution == "log_uniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.randint(int(math.ceil(lo)), int(math.floor(hi)))


@dataclass(frozen=True)
class RunConfig:
    """One training run: a flat, JSON-able dict of every setting plus its id.

    The id is a hash of the config, so the same run gets the same id on every
    expansion: that is what makes resume find completed runs.
    """

    config: dict[str, Any]
    run_id: str

    def __getitem__(self, key: str) -> Any:
        return self.config[key]

    def population_key(self) -> str:
        shared = {k: v for k, v in self.config.items() if k not in PER_MEMBER
                  and not (k in _POP_NEUTRAL and v == _POP_NEUTRAL[k])}
        return _hash(shared, 10)

    def flat(self) -> dict[str, Any]:
        """Typed columns for the runs table: every setting, data options as data_<name>, a plug-in's
        model options as model_options_<name> (lists and mappings as JSON text)."""
        out = {}
        for k, v in self.config.items():
            if k in ("data", "model_options"):
                for dk, dv in v.items():
                    out[column_name(f"{k}.{dk}")] = json.dumps(dv, sort_keys=True) if isinstance(dv, (list, dict)) else dv
            elif k in ("weights", "cmd", "early_stop"):  # nested settings: in config_json
                continue
            elif k == "record":
                out["record"] = ",".join(v)
            else:
                out[k] = v
        return out


def column_name(param: str) -> str:
    """The runs-table column of a swept parameter: ``data.p`` -> ``data_p``, ``model_options.k`` ->
    ``model_options_k``, others unchanged."""
    for prefix in ("data.", "model_options."):
        if param.startswith(prefix):
            return prefix[:-1] + "_" + param[len(prefix):]
    return param


def _hash(obj: Any, n: int) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


# Settings added after run ids were first stored: at these values they leave a run's id
# unchanged, so stores written before they existed still resume.
_ID_NEUTRAL: dict[str, Any] = {"curvature_batch": 256, "lr_units": "absolute", "embed_lr": None,
                               "embed_weight_decay": None, "init_perturb": 0.0, "perturb": 0, "bn_eps": 1e-5,
                               "fixed_norm": None, "init": "torch", "model_options": {}, "schedule": "constant",
                               "warmup_steps": 0, "final_lr_factor": 0.0, "decay_every": None, "decay_gamma": 0.1,
                               "clip_grad_norm": None, "precision": "full", "early_stop": None}


# Shared settings added after population ids were first stored: at these values they leave it unchanged.
_POP_NEUTRAL: dict[str, Any] = {"model_options": {}, "precision": "full", "early_stop": None}


def _id_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as it is hashed into ids: settings at their id-neutral values left out."""
    keyed = {k: v for k, v in cfg.items() if not (k in _ID_NEUTRAL and v == _ID_NEUTRAL[k])}
    if isinstance(keyed.get("weights"), dict) and keyed["weights"].get("dtype") == "float32":
        keyed["weights"] = {k: v for k, v in keyed["weights"].items() if k != "dtype"}
    if not {"ntk", "sharpness"} & set(cfg.get("record", ())):
        keyed.pop("curvature_every", None)  # only read by the curvature probes
    return keyed


def run_id_of(cfg: dict[str, Any]) -> str:
    return "r" + _hash(_id_view(cfg), 15)


@dataclass(frozen=True)
class PopulationSpec:
    """Runs trained together in one trial: they share everything but PER_MEMBER values."""

    pop_id: str
    members: tuple[RunConfig, ...]
    shared: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pop_id": self.pop_id, "members": [{"run_id": m.run_id, "config": m.config} for m in self.members]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "PopulationSpec":
        members = tuple(RunConfig(m["config"], m["run_id"]) for m in d["members"])
        return PopulationSpec(d["pop_id"], members, dict(members[0].config))


def populations(runs: list[RunConfig], max_size: int) -> list[PopulationSpec]:
    """Group runs that can share one vectorised trial, in chunks of at most ``max_size``.

    Chunks are balanced (sizes differ by at most one) so trials take similar time.
    """
    groups: dict[str, list[RunConfig]] = {}
    for r in sorted(runs, key=lambda r: r.run_id):
        groups.setdefault(r.population_key(), []).append(r)
    out = []
    for key, members in sorted(groups.items()):
        n_chunks = math.ceil(len(members) / max_size)
        for i in range(n_chunks):
            chunk = members[i::n_chunks]
            pid = f"p{key}-{_hash([m.run_id for m in chunk], 8)}"
            out.append(PopulationSpec(pid, tuple(chunk), dict(chunk[0].config)))
    return out


# ---------------------------------------------------------------------- loading
def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the model at ``loc`` (the parent of an unknown key)."""
    cur: Any = model
    for part in loc:
        if isinstance(cur, type) and issubclass(cur, BaseModel) and isinstance(part, str) and part in cur.model_fields:
            ann = cur.model_fields[part].annotation
            cur = _unwrap(ann)
        elif isinstance(cur, type) and issubclass(cur, BaseModel):
            return None
        else:
            return None
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return None


def _unwrap(ann: Any) -> Any:
    args = getattr(ann, "__args__", None)
    if args:
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                return a
    return ann


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        path = _fmt_loc(loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(SweepSpec, loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{path}: unknown key{hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"{path}: required key is missing")
            continue
        shown = e.get("input")
        got = "" if isinstance(shown, dict) or e["type"].startswith("value_error") else f" (got {shown!r})"
        # a whole-file check's message starts with the key path it is about
        lines.append(f"{msg}{got}" if msg.startswith(f"{path}.") or not loc else f"{path}: {msg}{got}")
    return f"{source}: invalid sweep file\n  " + "\n  ".join(lines)


def _check_parameters(spec: SweepSpec, source: str) -> None:
    """Every swept name must exist, and every listed value must validate in place."""
    from raydyn.tasks import registry

    task_fields = set(TaskSpec.model_fields) - {"data", "dataset", "model_options"}
    train_fields = set(TrainSpec.model_fields) - {"record", "weights", "cmd", "early_stop"} - set(EXECUTION_ONLY)
    d_entry, m_entry = registry.dataset(spec.task.dataset), registry.model(spec.task.model)
    allowed = sorted(task_fields | train_fields) + [f"data.{k}" for k in d_entry.options]
    if m_entry.plugin:
        allowed += [f"model_options.{k}" for k in m_entry.accepts if k not in ("input_shape", "out_dim")]
    problems = []
    for pname, p in spec.parameters.items():
        where = f"parameters.{pname}"
        if pname in EXECUTION_ONLY:
            problems.append(f"{where}: {pname} says how runs are executed, not what is trained; set it under train:, "
                            "it cannot be swept")
            continue
        if pname == "dataset":
            problems.append(f"{where}: the dataset cannot be swept within one sweep; write one sweep per dataset")
            continue
        open_key = (pname.startswith("data.") and d_entry.open_options) or \
            (pname.startswith("model_options.") and m_entry.plugin and m_entry.open_kwargs)
        if pname not in allowed and not open_key:
            problems.append(f"{where}: unknown parameter {pname!r}; sweepable: {', '.join(allowed)}"
                            + ("; a plug-in model's own options are swept as model_options.<name>"
                               if m_entry.plugin and "." not in pname else ""))
            continue
        values = p.listed() if p.is_list() else [p.min, p.max]
        for i, v in enumerate(values):
            vwhere = f"{where}.values[{i}]" if p.values is not None else (where + (".value" if p.is_list() else f".{'min' if i == 0 else 'max'}"))
            try:
                if pname.startswith("data."):
                    TaskSpec.model_validate({**spec.task.model_dump(), "data": {**spec.task.data, pname[5:]: v}})
                elif pname.startswith("model_options."):
                    TaskSpec.model_validate({**spec.task.model_dump(),
                                             "model_options": {**spec.task.model_options, pname[14:]: v}})
                elif pname in task_fields:
                    if p.distribution == "int_uniform" or pname in ("depth", "width", "heads"):
                        v = int(v) if isinstance(v, float) and v.is_integer() and not p.is_list() else v
                    TaskSpec.model_validate({**spec.task.model_dump(), pname: v})
                else:
                    if not p.is_list() and pname in ("steps", "batch_size", "seed", "record_every", "eval_size"):
                        v = int(v)
                    TrainSpec.model_validate({**spec.train.model_dump(), pname: v})
            except ValidationError as e:
                msg = "; ".join(x["msg"].removeprefix("Value error, ") for x in e.errors())
                problems.append(f"{vwhere}: {msg} (got {v!r})")
    if spec.method == "optuna":
        non_seed = [n for n in spec.parameters if n != "seed"]
        if not non_seed:
            problems.append("parameters: method 'optuna' needs at least one parameter other than seed to search over")
    if problems:
        raise SpecError(f"{source}: invalid sweep file\n  " + "\n  ".join(problems))


class _DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (lines are 1-based)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at any depth (PyYAML would
    silently keep the last one). Keys merged in with ``<<: *anchor`` may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base constructor names it
                continue
        return super().construct_mapping(node, deep=deep)


def parse_sweep(text: str, source: str = "<sweep>") -> SweepSpec:
    """Parse and validate sweep-file text. Raises :class:`SpecError` naming every problem
    (a key given twice in one mapping is one)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except _DuplicateKeyError as e:
        where = f"twice on line {e.line}" if e.line == e.first_line else f"on lines {e.first_line} and {e.line}"
        raise SpecError(f"{source}: duplicate key {e.key!r} {where}: a key may appear only once in a mapping "
                        "(YAML would silently keep the last one); remove or merge one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a sweep file is a YAML mapping with keys name, task, train, ...; got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None
    _check_parameters(spec, source)
    return spec


def load_sweep(path: str | Path) -> tuple[SweepSpec, str]:
    """Read a sweep file; returns the spec and the exact text (stored with the results)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such sweep file")
    text = p.read_text()
    return parse_sweep(text, str(p)), text


def sweep_hash(text: str) -> str:
    """Hash of the sweep file's meaning (parsed YAML), so comments and spacing don't matter."""
    return _hash(yaml.safe_load(text), 16)
