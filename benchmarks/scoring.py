"""How the studies score a trained model, shared by the benchmark scripts that compare models
(``bench_guidance.py``, ``bench_bpd_configs.py``, ``bench_recipes.py``):

* samples: N images drawn in seeded blocks (``evaluation.distributed_sampling.sample_blocks``, in this
  process) with the sampler the docs recommend for about 20 network evaluations
  (``recommended_settings``: SDE-DPM-Solver++(2M), quadratic spacing; docs/sampling.md);
* their FD with the FD classifier's features against the train split, and its floor: the FD of N real
  val images against the same reference (``classifier_reference``, statistics cached on disk);
* the classifier's class shares of the samples (``class_shares``: min, max and the total variation
  distance from uniform);
* a sweep trial's model on the test split (``score_trial``: the estimated bound in bits/dim, logged as
  an evaluation run, beside the switches and the last metrics its training run logged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from mlflow import MlflowClient

from diffusion_core.checkpoint import LoadedModel
from diffusion_core.generate import SamplerSettings
from diffusion_core.guidance import GuidanceInterval
from pipelines.evaluation.classifier import ClassifierFeatures
from pipelines.evaluation.distributed_sampling import num_blocks, sample_blocks
from pipelines.evaluation.fd import FeatureStats, StatsCache, reference_and_floor
from pipelines.evaluation.features import build_feature_net
from pipelines.evaluation.job import EvalSettings, evaluate
from pipelines.training.tags import MODEL_URI_TAG


def recommended_settings(steps: int) -> SamplerSettings:
    """SDE-DPM-Solver++(2M) on quadratic timesteps (docs/sampling.md, "Which sampler to pick")."""
    return SamplerSettings("dpm_solver", steps, algorithm="sde-dpmsolver++", spacing="quadratic")


def draw_samples(loaded: LoadedModel, settings: SamplerSettings, images: int, block: int, seed: int,
                 classes: Sequence[int] | None = None, guidance_scale: float = 1.0,
                 guidance_interval: GuidanceInterval | None = None) -> dict[str, np.ndarray]:
    """All N = ``images`` samples of ``loaded``, drawn in this process in seeded blocks of ``block``
    images (block b seeded from ``(seed, b)``: the images depend on the model, settings, N, block and
    seed only); class-balanced over ``classes`` (sample i asks for ``classes[i % len(classes)]``) at
    ``guidance_scale`` (within ``guidance_interval`` when given) for a class-conditional model, else ``None``.

    Returns:
        ``sample_blocks``' ``{"index", "image": float32 [N, C, H, W], ("label")}``.
    """
    return sample_blocks(loaded.diffusion, loaded.model, loaded.unet_config.image_shape, settings, images, block,
                         seed, np.arange(num_blocks(images, block)), classes=classes, guidance_scale=guidance_scale,
                         guidance_interval=guidance_interval)


@dataclass(frozen=True)
class FDReference:
    """What every FD of a study is measured against.

    Attributes:
        net: the FD classifier's features (``net.model`` is the classifier itself).
        reference: the statistics of the whole train split under ``net``.
        floor: the FD of the first ``images`` real val images against ``reference``.
        images: N, the samples of each FD (and the floor's real images).
    """

    net: ClassifierFeatures
    reference: FeatureStats
    floor: float
    images: int

    @property
    def num_classes(self) -> int:
        """K, the classes the classifier tells apart."""
        return int(self.net.model.config.num_classes)


def classifier_reference(shards: str, images: int, classifier: str, cache: str | None = None) -> FDReference:
    """Load the FD classifier (model URI or folder) and compute (or read from ``cache``, default
    ``outputs/fd_cache``) the train split's statistics and the floor at N = ``images``.

    Raises:
        ValueError: as ``evaluation.fd.reference_and_floor`` (a split with too few images).
        FileNotFoundError: a classifier that is not found.
    """
    net = build_feature_net("classifier", classifier=classifier)
    reference, floor = reference_and_floor(shards, images, net, StatsCache(cache))
    return FDReference(net=net, reference=reference, floor=floor, images=images)


def class_shares(predicted: np.ndarray, num_classes: int) -> dict[str, Any]:
    """How the samples spread over the classes, from the classifier's class of each sample.

    Args:
        predicted: int64 ``[N]``, N >= 1, each in [0, K).
        num_classes: K.

    Returns:
        ``{"class_shares": [share of class k for k < K] (summing to 1), "class_share_min",
        "class_share_max", "class_share_tv": 0.5 * sum_k |share_k - 1/K|}`` (the total variation
        distance from uniform: 0 when every class has 1/K of the samples, 1 - 1/K when all are one class).

    Raises:
        ValueError: no predictions, or a class outside [0, K).
    """
    predicted = np.asarray(predicted, dtype=np.int64)
    if predicted.size == 0 or predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"need N >= 1 predicted classes in [0, {num_classes}), got {predicted.size} "
                         f"in [{predicted.min(initial=0)}, {predicted.max(initial=0)}]")
    shares = np.bincount(predicted, minlength=num_classes) / predicted.size
    return {"class_shares": [float(s) for s in shares], "class_share_min": float(shares.min()),
            "class_share_max": float(shares.max()),
            "class_share_tv": float(0.5 * np.abs(shares - 1.0 / num_classes).sum())}


def score_trial(trial: Mapping[str, Any], client: MlflowClient, shards: str, test_images: int, estimate: int,
                workers: int, switches: Mapping[str, str], logged_prefix: str = "") -> dict[str, Any]:
    """One trial of a sweep (a results row of ``pipelines.tuning``) scored on the test split.

    Args:
        trial: the row (``variant``, ``trial_id``, ``outcome``, ``step``, ``run_id``).
        client: MLflow client of the sweep's tracking URI.
        shards: the shard folder (absolute; its ``test`` split is scored).
        test_images: the first N test images of the bound; estimate: K timesteps per image;
            workers: Ray actors of the bound (0: in this process).
        switches: ``{column: "section.key"}``: config values of the trial to report (its MLflow
            params, as strings; ``None`` when the run has no such param).
        logged_prefix: prefix of the columns of the last ``fd``, ``fd_floor`` and ``val_bpd`` the
            training run logged (``None`` when never logged).

    Returns:
        ``row`` (the variant), ``trial_id``, ``outcome``, ``steps``, the switches, the bound
        (``test_bpd`` with its standard errors over images and timesteps; ``prior_bpd``,
        ``terms_bpd``, ``decoder_bpd``: L_T, sum of L_t, L_0), the run's logged metrics, the model's URI
        and the training and evaluation run ids.
    """
    trained = client.get_run(trial["run_id"]).data
    model_uri = trained.tags[MODEL_URI_TAG]
    scored = evaluate(EvalSettings(model=model_uri, shards=shards, split="test", images=test_images,
                                   estimate=estimate, workers=workers, samples=0, threads=1))
    metrics = scored["metrics"]
    return {
        "row": trial["variant"], "trial_id": trial["trial_id"], "outcome": trial["outcome"], "steps": trial["step"],
        **{column: trained.params.get(key) for column, key in switches.items()},
        "test_images": test_images, "estimate_k": estimate,
        "test_bpd": metrics["eval_bpd_estimate"], "test_bpd_stderr_images": metrics["eval_bpd_estimate_stderr_images"],
        "test_bpd_stderr_timesteps": metrics["eval_bpd_estimate_stderr"],
        "prior_bpd": metrics.get("eval_bpd_estimate_prior"), "terms_bpd": metrics.get("eval_bpd_estimate_terms"),
        "decoder_bpd": metrics.get("eval_bpd_estimate_decoder"),
        # the run's latest value of each (None when it never logged it)
        **{f"{logged_prefix}{name}": trained.metrics.get(name) for name in ("fd", "fd_floor", "val_bpd")},
        "model_uri": model_uri, "train_run_id": trial["run_id"], "eval_run_id": scored["run_id"],
    }
