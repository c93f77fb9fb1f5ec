"""The training configuration: a YAML file plus ``section.key=value`` overrides, resolved into frozen,
validated dataclasses.

Sections (docs/ARCHITECTURE.md, "Configs"): ``model`` (``UNetConfig``), ``diffusion`` (``DiffusionConfig``),
``optimizer``, ``data``, ``train``, ``scaling``, ``tracking``. Unknown sections or keys and
values outside their range raise ``ValueError`` naming ``section.key`` and the allowed range, so a
bad config fails on the driver before any Ray worker starts. Override values are parsed with
``yaml.safe_load`` (``train.total_steps=200``, ``model.channel_mult=[1,2]``,
``tracking.registered_model_name=null``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from diffusion_core.config import DiffusionConfig, UNetConfig, check_out_channels, config_from_dict
from diffusion_core.generate import SamplerName, SamplerSettings
from diffusion_core.validation import (
    check_bool,
    check_choice,
    check_int_in_range,
    check_number_in,
    check_optional_str,
)
from pipelines.common.paths import DEFAULT_STORAGE_PATH
from pipelines.training.timestep_sampler import TimestepSamplerName

OptimizerName = Literal["adam", "adamw"]
Precision = Literal["auto", "bf16", "fp32"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam(W) with linear learning-rate warm-up and gradient-norm clipping (Ho et al. 2020, app. B).

    Attributes:
        name: "adam" (Ho et al.) or "adamw" (decoupled weight decay).
        lr: peak learning rate (2e-4 in Ho et al.), in (0, 1].
        betas: Adam's (beta1, beta2), each in [0, 1).
        eps: Adam's epsilon, > 0.
        weight_decay: L2 (adam) / decoupled (adamw) weight decay, >= 0.
        warmup_steps: steps of linear warm-up from 0 to ``lr`` (5000 in Ho et al.); 0 disables.
        grad_clip: max global gradient L2 norm (1.0 in Ho et al.); 0 disables clipping.
    """

    name: OptimizerName = "adam"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 5000
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OptimizerName)
        check_number_in("optimizer.lr", self.lr, 0.0, 1.0, low_open=True)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise ValueError(f"optimizer.betas={self.betas!r} must be a pair [beta1, beta2]")
        for beta in self.betas:
            check_number_in("optimizer.betas entry", beta, 0.0, 1.0, high_open=True)
        check_number_in("optimizer.eps", self.eps, 0.0, 1.0, low_open=True)
        check_number_in("optimizer.weight_decay", self.weight_decay, 0.0, 1.0)
        check_int_in_range("optimizer.warmup_steps", self.warmup_steps, 0)
        check_number_in("optimizer.grad_clip", self.grad_clip, 0.0, float("inf"), high_open=True)


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how it is read.

    Attributes:
        shards: folder written by ``pipelines/preprocess.py`` (local path or ``s3://``) with
            ``manifest.json``, ``train/`` and ``val/``. Required. The entry point makes a relative
            path absolute (relative to the current directory).
        local_shuffle_buffer: rows in Ray Data's per-worker shuffle buffer
            (``iter_torch_batches(local_shuffle_buffer_size=...)``); 0 reads in shard order,
            which makes runs with different worker counts see the same data.
    """

    shards: str = ""
    local_shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ValueError(f"data.shards={self.shards!r} must name a shard folder (local path or s3://)")
        check_int_in_range("data.local_shuffle_buffer", self.local_shuffle_buffer, 0)


@dataclass(frozen=True)
class TrainSection:
    """The training schedule, evaluation cadence and where checkpoints go. Steps count optimizer
    updates (one global batch each), starting at 1.

    Attributes:
        total_steps: optimizer steps to train for (800k in Ho et al. for CIFAR-10).
        global_batch_size: images per step over all workers (128 in Ho et al.); must be divisible
            by ``scaling.num_workers`` (each worker gets ``global_batch_size / num_workers``).
        ema_decay: decay of the exponential moving average of the weights, in [0, 1)
            (0.9999 in Ho et al.); the EMA weights are what gets sampled, evaluated and served.
        ema_warmup: if true, the decay used after optimizer step s (1-based) is
            min(ema_decay, (1 + s) / (10 + s)) (the ``num_updates`` warm-up of TensorFlow's
            ExponentialMovingAverage), so that in a short run the average is not dominated by the
            initial weights (with a constant 0.999, 37% of the average is still the
            initialization after 1,000 steps); false: Ho et al.'s constant decay.
        seed: seed of the initial weights, the per-example timesteps/noise and dropout.
        log_every: steps between metric points in MLflow (losses are averaged over the window).
        checkpoint_every: steps between checkpoints (a checkpoint is also written at the end); a
            multiple of ``log_every``, so every logged window is covered by one checkpoint.
        keep_checkpoints: how many recent checkpoints Ray Train keeps (>= 1).
        sample_every: steps between sample grids logged to MLflow (0 disables; also at the end).
        sample_images: images in each grid.
        sample_sampler: the grids' sampler, "ddim" (eta = 0), "ddpm" (all T steps), "pc",
            "langevin", "dpm_solver" or "edm_heun", with the other parameters at ``SamplerSettings``'
            defaults (``diffusion_core.generate``).
        sample_steps: the grids' sampler steps (ignored by "ddpm"), at most ``diffusion.num_timesteps``.
        bpd_every: steps between held-out bits/dim estimates (0 disables).
        bpd_images: validation images in the fixed subset for the periodic estimate.
        bpd_samples: K, timesteps sampled per image by ``calc_bpd_estimate``.
        final_bpd_images: validation images for the exact ``calc_bpd_loop`` bound at the end
            (0 disables).
        fd_every: steps between Fréchet distances of EMA samples (0 disables; see
            ``training.fd_monitor``): ``fd_images`` samples drawn with the grids' sampler, shared
            among the workers, scored by the classifier ``fd_classifier`` against the train split;
            ``fd_floor`` (``fd_images`` real val images against the same reference) is logged once.
        fd_images: N, samples per FD (>= 2; also the floor's N).
        fd_classifier: the feature network: a model URI (``models:/fd-classifier-fashion-mnist/1``)
            or a folder of ``pipelines/train_classifier.py``; required when ``fd_every`` > 0.
        run_name: Ray Train run name (the folder under ``storage_path``) and MLflow run name;
            re-submitting with the same name and storage path resumes the run. ``null`` derives
            ``<config name>-<timestamp>`` on the driver.
        storage_path: where Ray Train writes checkpoints (local path or ``s3://``; the entry point
            makes local paths absolute).
        timestep_sampler: how a step draws its timesteps: "uniform", or "loss_second_moment"
            (importance sampling by sqrt(E[L_t^2]), Nichol & Dhariwal 2021 sec. 3.3; only with
            ``diffusion.loss`` "vlb" or "hybrid"; see ``training.timestep_sampler``); not with a
            ``diffusion.timestep_distribution`` other than "uniform".
        max_minutes: training wall-time budget in minutes (0: none). Training stops at the first
            log step (``log_every``) at which the run's training time, summed over resumes, has
            reached it, and ends there as at ``total_steps``: last checkpoint, final grid and bound,
            registered model (``training.time_budget``). Runs compared "at equal wall time" use it.
        max_nonfinite_steps: consecutive steps with a non-finite loss or gradient after which
            training stops with an error (>= 1). Each such step is skipped: no optimizer or EMA
            update, counted in the ``skipped_steps`` metric.
        label_dropout: p_uncond of classifier-free guidance (Ho & Salimans 2022, sec. 3.2; they
            use 0.1-0.2), in [0, 1): the probability that a training image's class label is
            replaced by -1 ("no label"), so that one network learns both p(x | y) and p(x). Drawn
            per image from its own seeded generator (``example_noise.example_label_dropout``).
            Used only by a class-conditional model (``model.num_classes`` set); ignored otherwise.
        sample_guidance_scale: the guidance scale s (>= 0, finite) of a class-conditional model's
            grids and FD samples (``diffusion_core.guidance``: s = 1 is the conditional model, one
            network evaluation per step; s = 0 the unconditional one; any other s costs two
            evaluations per step). Must stay 1.0 for an unconditional model.
    """

    total_steps: int = 1000
    global_batch_size: int = 128
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 0
    sample_images: int = 16
    sample_sampler: SamplerName = "ddim"
    sample_steps: int = 50
    bpd_every: int = 0
    bpd_images: int = 64
    bpd_samples: int = 8
    final_bpd_images: int = 0
    fd_every: int = 0
    fd_images: int = 256
    fd_classifier: str | None = None
    run_name: str | None = None
    storage_path: str = DEFAULT_STORAGE_PATH
    max_nonfinite_steps: int = 10
    max_minutes: float = 0.0
    timestep_sampler: TimestepSamplerName = "uniform"
    label_dropout: float = 0.1
    sample_guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("total_steps", "global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                     "sample_images", "sample_steps", "bpd_images", "bpd_samples", "max_nonfinite_steps"):
            check_int_in_range(f"train.{name}", getattr(self, name), 1)
        check_int_in_range("train.fd_images", self.fd_images, 2)
        for name in ("seed", "sample_every", "bpd_every", "final_bpd_images", "fd_every"):
            check_int_in_range(f"train.{name}", getattr(self, name), 0)
        if self.checkpoint_every % self.log_every:
            raise ValueError(
                f"train.checkpoint_every={self.checkpoint_every} must be a multiple of train.log_every={self.log_every}"
            )
        check_choice("train.sample_sampler", self.sample_sampler, SamplerName)
        check_number_in("train.max_minutes", self.max_minutes, 0.0, float("inf"), high_open=True)
        check_number_in("train.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_bool("train.ema_warmup", self.ema_warmup)
        check_optional_str("train.run_name", self.run_name)
        check_optional_str("train.fd_classifier", self.fd_classifier)
        if self.fd_every and not self.fd_classifier:
            raise ValueError(f"train.fd_every={self.fd_every} needs train.fd_classifier (a model URI or folder of "
                             "pipelines/train_classifier.py)")
        check_choice("train.timestep_sampler", self.timestep_sampler, TimestepSamplerName)
        check_number_in("train.label_dropout", self.label_dropout, 0.0, 1.0, high_open=True)
        check_number_in("train.sample_guidance_scale", self.sample_guidance_scale, 0.0, float("inf"), high_open=True)
        if self.run_name is not None and ("/" in self.run_name or self.run_name in (".", "..")):
            raise ValueError(f"train.run_name={self.run_name!r} must be a plain folder name (no '/')")
        if not isinstance(self.storage_path, str) or not self.storage_path.strip():
            raise ValueError(f"train.storage_path={self.storage_path!r} must be a local path or s3://...")

    @property
    def sampler_settings(self) -> SamplerSettings:
        """The sample grids' ``SamplerSettings``: ``sample_sampler`` with ``sample_steps`` steps."""
        return SamplerSettings(self.sample_sampler, self.sample_steps)


@dataclass(frozen=True)
class ScalingSection:
    """How many Ray Train workers, on what, with how many threads.

    Attributes:
        num_workers: data-parallel workers (8 GPUs for the CIFAR-10 config).
        use_gpu: one GPU per worker, NCCL; otherwise CPU workers with gloo.
        cpus_per_worker: logical CPUs each worker reserves (``resources_per_worker``); keep one
            CPU of the cluster free for Ray Data's ingest.
        torch_threads: intra-op threads per CPU worker (``torch.set_num_threads``); ``null``
            uses ``ceil(cpus_per_worker)`` (Ray sets OMP_NUM_THREADS to the reservation).
        precision: "auto" = bf16 autocast on GPUs and fp32 on CPUs; "bf16" or "fp32" to force.
        channels_last: channels-last memory format on GPUs (ignored on CPUs).
        max_failures: worker-group restarts from the last checkpoint before the run fails
            (``FailureConfig``); -1 retries forever.
        compile: run the UNet through ``torch.compile`` (inductor, CPU and CUDA), applied after the
            DDP wrapping; the first step includes the compilation (the job log says so).
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    precision: Precision = "auto"
    channels_last: bool = True
    max_failures: int = 2
    compile: bool = False

    def __post_init__(self) -> None:
        check_int_in_range("scaling.num_workers", self.num_workers, 1)
        for name in ("use_gpu", "channels_last", "compile"):
            check_bool(f"scaling.{name}", getattr(self, name))
        check_number_in("scaling.cpus_per_worker", self.cpus_per_worker, 0.0, 1024.0, low_open=True)
        if self.torch_threads is not None:
            check_int_in_range("scaling.torch_threads", self.torch_threads, 1)
        check_choice("scaling.precision", self.precision, Precision)
        check_int_in_range("scaling.max_failures", self.max_failures, -1)


@dataclass(frozen=True)
class TrackingSection:
    """What goes to MLflow (tracking URI: ``MLFLOW_TRACKING_URI`` or ``<repo>/mlflow.db``).

    Attributes:
        experiment_name: MLflow experiment (created with artifacts beside a SQLite database).
        registered_model_name: registry name of the final EMA model; ``null`` logs it without
            registering.
        log_system_metrics: CPU/memory/GPU metrics of rank 0 (``log_system_metrics=True``).
    """

    experiment_name: str = "ddpm"
    registered_model_name: str | None = "ddpm"
    log_system_metrics: bool = True

    def __post_init__(self) -> None:
        check_optional_str("tracking.experiment_name", self.experiment_name)
        if self.experiment_name is None:
            raise ValueError("tracking.experiment_name must be a non-empty string")
        check_optional_str("tracking.registered_model_name", self.registered_model_name)
        check_bool("tracking.log_system_metrics", self.log_system_metrics)


_SECTIONS: dict[str, type] = {
    "model": UNetConfig,
    "diffusion": DiffusionConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "train": TrainSection,
    "scaling": ScalingSection,
    "tracking": TrackingSection,
}


@dataclass(frozen=True)
class TrainConfig:
    """The whole resolved training configuration; each attribute is one YAML section.

    Cross-section checks: ``model.out_channels`` must be ``2 * in_channels`` exactly when
    ``diffusion.variance`` is "learned_range", ``train.global_batch_size`` must be divisible by
    ``scaling.num_workers``, and ``train.sample_steps`` must be at most ``diffusion.num_timesteps``
    (unless ``train.sample_sampler`` is "ddpm", which ignores it). ``train.sample_guidance_scale``
    other than 1.0 needs a class-conditional model (``model.num_classes`` set).
    ``train.timestep_sampler`` "loss_second_moment" and a ``diffusion.timestep_distribution`` other
    than "uniform" are refused together: the importance sampler's weights 1/(T p_t) make the
    objective an unbiased estimate of the uniform-timestep one, which the distribution replaces.
    """

    model: UNetConfig
    diffusion: DiffusionConfig
    data: DataConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def __post_init__(self) -> None:
        check_out_channels(self.model, self.diffusion)
        if self.model.num_classes is None and self.train.sample_guidance_scale != 1.0:
            raise ValueError(
                f"train.sample_guidance_scale={self.train.sample_guidance_scale} needs a class-conditional model "
                "(set model.num_classes); an unconditional model has nothing to guide"
            )
        if self.train.timestep_sampler == "loss_second_moment" and self.diffusion.loss == "simple":
            raise ValueError(
                "train.timestep_sampler='loss_second_moment' needs diffusion.loss 'vlb' or 'hybrid' "
                "(it importance-samples the terms of the bound), not 'simple'"
            )
        if self.train.timestep_sampler != "uniform" and self.diffusion.timestep_distribution != "uniform":
            raise ValueError(
                f"train.timestep_sampler={self.train.timestep_sampler!r} cannot be combined with "
                f"diffusion.timestep_distribution={self.diffusion.timestep_distribution!r}: the importance "
                "weights 1/(T p_t) keep the uniform-timestep objective; set one of the two to 'uniform'"
            )
        if self.train.global_batch_size % self.scaling.num_workers:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} must be divisible by "
                f"scaling.num_workers={self.scaling.num_workers}"
            )
        if self.train.sample_sampler != "ddpm" and self.train.sample_steps > self.diffusion.num_timesteps:
            raise ValueError(
                f"train.sample_steps={self.train.sample_steps} must be at most "
                f"diffusion.num_timesteps={self.diffusion.num_timesteps} for train.sample_sampler="
                f"{self.train.sample_sampler!r}"
            )

    @property
    def per_worker_batch_size(self) -> int:
        """Images per worker per step: ``global_batch_size // num_workers``."""
        return self.train.global_batch_size // self.scaling.num_workers

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict, one entry per section (tuples become lists); YAML/JSON-serializable."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in _SECTIONS}

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``--dry-run`` prints and checkpoints store)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat_params(self) -> dict[str, str]:
        """``{"section.key": str(value)}`` for every setting (MLflow params)."""
        return {f"{s}.{k}": str(v) for s, values in self.to_dict().items() for k, v in values.items()}

    def replace(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        """A new config with ``{"section.key": value}`` applied (values already parsed)."""
        return config_from_sections(apply_overrides(self.to_dict(), overrides))

    @classmethod
    def from_dict(cls, sections: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of ``to_dict``; see ``config_from_sections``."""
        return config_from_sections(sections)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce_floats(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``values`` with ints and numeric strings given for ``float`` fields turned into
    floats (YAML 1.1 reads ``2e-4`` without a dot as a string)."""
    float_fields = {f.name for f in dataclasses.fields(cls) if f.type in (float, "float")}
    out = dict(values)
    for key in float_fields & set(out):
        value = out[key]
        if _is_int(value):
            out[key] = float(value)
        elif isinstance(value, str):
            try:
                out[key] = float(value)
            except ValueError:
                pass  # left for the section's own check, which names the key
    return out


def _section(name: str, values: Any) -> Any:
    """Build section ``name`` from its mapping; errors are re-raised as ``ValueError`` naming it."""
    cls = _SECTIONS[name]
    values = {} if values is None else values
    try:
        return config_from_dict(cls, _coerce_floats(cls, values) if isinstance(values, Mapping) else values)
    except (TypeError, ValueError) as err:
        message = str(err)
        raise ValueError(message if message.startswith(f"{name}.") else f"config section '{name}': {message}") from err


def config_from_sections(sections: Mapping[str, Any]) -> TrainConfig:
    """Build a ``TrainConfig`` from ``{section: {key: value}}``; ``model``, ``diffusion`` and
    ``data`` are required, other sections default.

    Integers given for float settings (``optimizer.lr: 1``) are accepted as floats.

    Raises:
        ValueError: on an unknown section or key (listing the known ones), a missing required
            section, or a value out of range (naming ``section.key``).
    """
    if not isinstance(sections, Mapping):
        raise ValueError(f"a training config must be a mapping of sections, got {type(sections).__name__}")
    unknown = sorted(set(sections) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; known sections are {list(_SECTIONS)}")
    missing = [name for name in ("model", "diffusion", "data") if name not in sections]
    if missing:
        raise ValueError(f"config section(s) {missing} are required")
    built = {name: _section(name, sections[name]) for name in _SECTIONS if name in sections}
    return TrainConfig(**built)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``["section.key=value", ...]`` into ``{"section.key": value}``; each value goes
    through ``yaml.safe_load`` (``200`` -> int, ``[1,2]`` -> list, ``null`` -> None, ``v`` -> str).

    Raises:
        ValueError: on an item without ``=``, a key that is not ``section.key``, or a value that
            is not valid YAML.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1 or not all(key.split(".")):
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.total_steps=200)")
        try:
            parsed[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: value is not valid YAML: {err}") from err
    return parsed


def apply_overrides(sections: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A copy of ``sections`` with ``{"section.key": value}`` set (unknown names are caught when
    the result is built by ``config_from_sections``).

    Raises:
        ValueError: if an override names a section that is not a mapping in ``sections``.
    """
    merged = {name: dict(values or {}) for name, values in sections.items()}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise ValueError(
                f"override {key!r}: unknown config section {section!r}; known sections are {list(_SECTIONS)}"
            )
        merged.setdefault(section, {})[name] = value
    return merged


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML training config, apply ``section.key=value`` overrides, validate.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the YAML is invalid, or on any problem ``config_from_sections`` reports.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path.resolve()} does not exist")
    try:
        sections = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path.resolve()} is not valid YAML: {err}") from err
    if not isinstance(sections, Mapping):
        raise ValueError(f"config file {path.resolve()} must hold a mapping of sections")
    return config_from_sections(apply_overrides(sections, parse_overrides(overrides)))
