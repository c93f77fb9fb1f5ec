"""EDM's training choices on the discrete VP chain (Karras et al. 2022, Table 1 and sec. 5):
``diffusion.timestep_distribution: edm_lognormal`` (ln sigma ~ N(P_mean, P_std^2) snapped to the
timesteps) and ``diffusion.loss_weighting: edm`` (lambda(sigma) = (sigma^2 + sigma_data^2) /
(sigma sigma_data)^2 on the x_0-MSE). The distribution against normal-CDF cell masses (scipy) and
against many draws; the weight against its closed form and across the four parameterizations; the
defaults as the unchanged training step; the config checks, round trips, overrides, sweeps and the
refusal beside the importance sampler; a real training step with both switches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _diffusion_helpers import (
    grid_images,
    linear_betas,
    single_thread,  # noqa: F401 (autouse fixture)
)
from _train_helpers import recording_backward
from _unet_helpers import SMALL_UNET
from scipy import stats

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.bound import mean_flat
from diffusion_core.checkpoint import CONFIG_NAME, FORMAT_VERSION, read_checkpoint_config, save_checkpoint
from diffusion_core.losses import edm_weight, loss_weight, min_snr_weight
from diffusion_core.timesteps import edm_lognormal_probabilities
from diffusion_core.unet import UNet
from pipelines.train import main
from pipelines.training.config import load_config
from pipelines.training.example_noise import example_timesteps_and_noise
from pipelines.tuning.spec import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
T = 1000
PREDICTIONS = ("eps", "x_start", "v", "score")
STEPS = (0, 20, 150, 400, 700, 999)  # SNR from ~1e4 to ~4e-5 on the linear T = 1000 chain


def _linear_log_sigma(num_timesteps: int = T) -> np.ndarray:
    """ln sigma_t = 0.5 ln((1 - abar_t) / abar_t) of the linear schedule, from its betas."""
    abar = np.cumprod(1.0 - linear_betas(num_timesteps))
    return 0.5 * np.log((1.0 - abar) / abar)


def _cell_mass(log_sigma: np.ndarray, t: int, mean: float, std: float) -> float:
    """P(ln sigma ~ N(mean, std^2) lies in t's cell), the cell edges at the midpoints of neighbouring
    levels, open at both ends; scipy's normal CDF, its survival function above the mean."""
    low = -np.inf if t == 0 else 0.5 * (log_sigma[t - 1] + log_sigma[t])
    high = np.inf if t == len(log_sigma) - 1 else 0.5 * (log_sigma[t] + log_sigma[t + 1])
    dist = stats.norm(loc=mean, scale=std)
    return float(dist.sf(low) - dist.sf(high)) if low >= mean else float(dist.cdf(high) - dist.cdf(low))


# ---------------------------------------------------------------- the distribution over t
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("mean", "std"), [(-1.2, 1.2), (0.4, 0.5)])
def test_distribution_is_the_normal_mass_of_each_cell(schedule: str, mean: float, std: float) -> None:
    d = GaussianDiffusion(DiffusionConfig(schedule=schedule, timestep_distribution="edm_lognormal",
                                          edm_p_mean=mean, edm_p_std=std))
    p = d.timestep_probabilities
    assert isinstance(p, np.ndarray) and p.dtype == np.float64 and p.shape == (T,)
    assert (p >= 0).all() and p.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(p, edm_lognormal_probabilities(d.alphas_cumprod, mean, std))
    log_sigma = 0.5 * np.log((1.0 - d.alphas_cumprod) / d.alphas_cumprod)
    if schedule == "linear":
        np.testing.assert_allclose(log_sigma, _linear_log_sigma(), rtol=1e-12)
    for t in (0, 1, 16, 88, 300, 700, 998, 999):
        expected = _cell_mass(log_sigma, t, mean, std)
        assert p[t] == pytest.approx(expected, rel=1e-9, abs=1e-300), t


def test_the_density_peaks_at_the_level_nearest_p_mean() -> None:
    """p_t is the mass of t's cell, i.e. about the N(P_mean, P_std^2) density at ln sigma_t times the
    cell's width: the density p_t / width_t peaks at the timestep whose ln sigma_t is nearest P_mean
    (the cell that holds P_mean). The mass per timestep itself peaks at a smaller t, where the cells
    are wider (ln sigma changes fastest near t = 0)."""
    log_sigma = _linear_log_sigma()
    p = edm_lognormal_probabilities(np.exp(-np.logaddexp(0.0, 2 * log_sigma)), -1.2, 1.2)  # abar = 1/(1+sigma^2)
    edges = 0.5 * (log_sigma[:-1] + log_sigma[1:])
    widths = np.diff(edges)  # cells 1..T-2 (the end cells are open)
    density = p[1:-1] / widths
    nearest = int(np.argmin(np.abs(log_sigma + 1.2)))
    assert int(np.argmax(density)) + 1 == nearest
    narrow = widths < 0.02  # where the midpoint rule holds (all but the first few dozen cells)
    assert narrow.sum() > 900
    np.testing.assert_allclose(density[narrow], stats.norm.pdf(log_sigma[1:-1][narrow], -1.2, 1.2), rtol=1e-3)
    assert int(np.argmax(p)) < nearest


def test_distribution_rejects_bad_arguments() -> None:
    abar = GaussianDiffusion(DiffusionConfig(num_timesteps=50)).alphas_cumprod
    for std in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="edm_p_std"):
            edm_lognormal_probabilities(abar, -1.2, std)
    for mean in (math.inf, math.nan, "0"):
        with pytest.raises(ValueError, match="edm_p_mean"):
            edm_lognormal_probabilities(abar, mean, 1.2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        edm_lognormal_probabilities(abar[::-1], -1.2, 1.2)


def test_drawn_timesteps_follow_the_distribution() -> None:
    """10,000 images' timesteps from the training draw (``example_timesteps_and_noise``, each image
    its own seeded generator) against p: every timestep's count within 5 standard errors and a
    chi-square test; the uniform draw of the same images fails the same test."""
    num_timesteps, n = 40, 10_000
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=num_timesteps, timestep_distribution="edm_lognormal"))
    p = d.timestep_probabilities
    x = torch.rand(n, 1, 2, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t, _ = example_timesteps_and_noise(x, seed=3, step=1, num_timesteps=num_timesteps, probabilities=p)
    counts = np.bincount(t.numpy(), minlength=num_timesteps)
    assert counts.sum() == n and t.min() >= 0 and t.max() < num_timesteps
    stderr = np.sqrt(n * p * (1 - p))
    assert (np.abs(counts - n * p) <= 5 * stderr + 1e-9).all()

    def chi2_pvalue(observed: np.ndarray) -> float:
        keep = n * p >= 5
        obs = np.append(observed[keep], observed[~keep].sum())
        exp = np.append(n * p[keep], n * p[~keep].sum())
        return float(stats.chisquare(obs, exp).pvalue)

    assert chi2_pvalue(counts) > 1e-4
    uniform, _ = example_timesteps_and_noise(x, seed=3, step=1, num_timesteps=num_timesteps)
    assert chi2_pvalue(np.bincount(uniform.numpy(), minlength=num_timesteps)) < 1e-12


# ---------------------------------------------------------------- the EDM weight
@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 2.0])
def test_weight_matches_the_closed_form(sigma_data: float) -> None:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1) with sigma^2 = (1 - abar) / abar on the
    x_0-MSE, divided by SNR for the eps and score MSEs and by SNR + 1 for the v-MSE."""
    abar = np.cumprod(1.0 - linear_betas(T))[list(STEPS)]
    sigma2 = (1.0 - abar) / abar
    snr = abar / (1.0 - abar)
    lam = (sigma2 + sigma_data**2) / (sigma2 * sigma_data**2)
    expected = {"x_start": lam, "eps": lam / snr, "score": lam / snr, "v": lam / (snr + 1.0)}
    for prediction in PREDICTIONS:
        got = edm_weight(torch.from_numpy(snr), sigma_data, prediction)
        assert got.dtype == torch.float64 and got.shape == (len(STEPS),)
        np.testing.assert_allclose(got.numpy(), expected[prediction], rtol=1e-12, err_msg=prediction)
    # eps weight 1 + sigma^2 / sd^2; v weight in [1, 1/sd^2] (between them for sd != 1)
    np.testing.assert_allclose(edm_weight(torch.from_numpy(snr), sigma_data, "eps").numpy(),
                               1 + sigma2 / sigma_data**2, rtol=1e-12)
    v = edm_weight(torch.from_numpy(snr), sigma_data, "v").numpy()
    assert ((v >= min(1.0, sigma_data**-2) - 1e-12) & (v <= max(1.0, sigma_data**-2) + 1e-12)).all()


def test_v_weight_is_one_for_unit_sigma_data() -> None:
    """v-prediction is EDM's preconditioning with sigma_data = 1, so its plain MSE is EDM's loss."""
    snr = torch.from_numpy(GaussianDiffusion(DiffusionConfig()).snr)
    torch.testing.assert_close(edm_weight(snr, 1.0, "v"), torch.ones_like(snr), rtol=1e-12, atol=0)


def test_weight_rejects_bad_arguments_and_loss_weight_dispatches() -> None:
    snr = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="prediction"):
        edm_weight(snr, 0.5, "noise")
    for sigma_data in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="edm_sigma_data"):
            edm_weight(snr, sigma_data, "eps")
    for prediction in PREDICTIONS:
        assert torch.equal(loss_weight(snr, prediction, DiffusionConfig()), torch.ones_like(snr))
        assert torch.equal(loss_weight(snr, prediction, DiffusionConfig(loss_weighting="min_snr", min_snr_gamma=2.0)),
                           min_snr_weight(snr, 2.0, prediction))
        assert torch.equal(loss_weight(snr, prediction, DiffusionConfig(loss_weighting="edm", edm_sigma_data=0.7)),
                           edm_weight(snr, 0.7, prediction))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_weighted_losses_agree_across_parameterizations(schedule: str, sigma_data: float) -> None:
    """One network output converted to each parameterization (float64): every edm-weighted loss is
    lambda(sigma) times its x_0-MSE, and the "mse" key stays unweighted."""
    x0 = grid_images((len(STEPS), 2, 4, 4), seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor(STEPS)
    ref = GaussianDiffusion(DiffusionConfig(num_timesteps=T, schedule=schedule))
    abar = torch.from_numpy(ref.alphas_cumprod)[t]
    sigma2 = (1 - abar) / abar
    lam = (sigma2 + sigma_data**2) / (sigma2 * sigma_data**2)
    x_t = ref.q_sample(x0, t, noise)
    xstart_mse = mean_flat((ref.predict_xstart_from_eps(x_t, t, eps_hat) - x0) ** 2)
    for prediction in PREDICTIONS:
        d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, schedule=schedule, prediction=prediction,
                                              loss_weighting="edm", edm_sigma_data=sigma_data))
        plain = GaussianDiffusion(DiffusionConfig(num_timesteps=T, schedule=schedule, prediction=prediction))
        model = lambda x, tt, d=d: d.output_from_eps(x, tt, eps_hat)  # noqa: E731
        out = d.training_losses(model, x0, t, noise=noise)
        torch.testing.assert_close(out["loss"], lam * xstart_mse, rtol=1e-9, atol=0, msg=prediction)
        assert torch.equal(out["mse"], plain.training_losses(model, x0, t, noise=noise)["mse"])
    assert not torch.allclose(lam * xstart_mse, xstart_mse, rtol=1e-3)


def test_hybrid_weights_the_mse_part_only() -> None:
    from _diffusion_helpers import ConvModel

    kwargs = {"num_timesteps": 100, "prediction": "v", "loss": "hybrid", "variance": "learned_range",
              "vlb_weight": 0.5}
    d = GaussianDiffusion(DiffusionConfig(**kwargs, loss_weighting="edm", timestep_distribution="edm_lognormal"))
    x0 = grid_images((4, 2, 6, 6))
    t = torch.tensor([0, 3, 50, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    out = d.training_losses(ConvModel(2, 4), x0, t, noise=noise)
    w = edm_weight(torch.from_numpy(d.snr)[t].float(), 0.5, "v")
    torch.testing.assert_close(out["loss"], w * out["mse"] + 0.5 * 100 * out["vb"], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- the config
def test_config_checks_name_the_key() -> None:
    with pytest.raises(ValueError, match="timestep_distribution='lognormal'.*uniform.*edm_lognormal"):
        DiffusionConfig(timestep_distribution="lognormal")
    with pytest.raises(ValueError, match="loss_weighting='karras'.*none.*min_snr.*edm"):
        DiffusionConfig(loss_weighting="karras")
    for bad in (0, 0.0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="edm_p_std"):
            DiffusionConfig(edm_p_std=bad)
        with pytest.raises(ValueError, match="edm_sigma_data"):
            DiffusionConfig(edm_sigma_data=bad)
    for bad in (math.inf, -math.inf, math.nan, True, "-1.2"):
        with pytest.raises(ValueError, match="edm_p_mean"):
            DiffusionConfig(edm_p_mean=bad)
    with pytest.raises(ValueError, match="loss_weighting='edm' needs loss 'simple' or 'hybrid'"):
        DiffusionConfig(loss="vlb", loss_weighting="edm")
    with pytest.raises(ValueError, match="timestep_distribution='edm_lognormal' needs loss 'simple' or 'hybrid'"):
        DiffusionConfig(loss="vlb", timestep_distribution="edm_lognormal")
    config = DiffusionConfig(loss="hybrid", loss_weighting="edm", timestep_distribution="edm_lognormal",
                             edm_p_mean=0, edm_p_std=2, edm_sigma_data=1)
    assert (config.edm_p_mean, config.edm_p_std, config.edm_sigma_data) == (0, 2, 1)


def test_round_trip_and_old_dicts(tmp_path: Path) -> None:
    old_keys = {"num_timesteps", "schedule", "prediction", "variance", "loss", "vlb_weight"}
    configs = [DiffusionConfig(), DiffusionConfig(loss_weighting="edm"),
               DiffusionConfig(timestep_distribution="edm_lognormal"),
               DiffusionConfig(edm_p_mean=-1.0), DiffusionConfig(edm_sigma_data=1.0),
               DiffusionConfig(prediction="v", loss="hybrid", variance="learned_range", loss_weighting="edm",
                               edm_sigma_data=0.6, timestep_distribution="edm_lognormal", edm_p_std=1.0)]
    for config in configs:
        assert DiffusionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert set(configs[0].to_dict()) == old_keys
    assert set(configs[1].to_dict()) == old_keys | {"loss_weighting", "min_snr_gamma"}
    lognormal = {"timestep_distribution", "edm_p_mean", "edm_p_std"}
    assert set(configs[2].to_dict()) == old_keys | lognormal
    assert set(configs[3].to_dict()) == old_keys | lognormal
    assert set(configs[4].to_dict()) == old_keys | {"edm_sigma_data"}
    assert set(configs[5].to_dict()) == old_keys | lognormal | {"loss_weighting", "min_snr_gamma", "edm_sigma_data"}
    # a config.json without the keys loads with their defaults; one with them keeps them
    folder = tmp_path / "old"
    folder.mkdir()
    payload = {"format_version": FORMAT_VERSION, "unet": SMALL_UNET.to_dict(), "metadata": {},
               "diffusion": {"num_timesteps": 50, "schedule": "cosine", "prediction": "eps",
                             "variance": "fixed_small", "loss": "simple", "vlb_weight": 0.001}}
    (folder / CONFIG_NAME).write_text(json.dumps(payload))
    loaded = read_checkpoint_config(folder)[1]
    assert (loaded.timestep_distribution, loaded.edm_p_mean, loaded.edm_p_std, loaded.edm_sigma_data) == (
        "uniform", -1.2, 1.2, 0.5)
    trained = DiffusionConfig(num_timesteps=50, loss_weighting="edm", timestep_distribution="edm_lognormal")
    save_checkpoint(tmp_path / "new", UNet(SMALL_UNET).state_dict(), SMALL_UNET, trained)
    assert read_checkpoint_config(tmp_path / "new")[1] == trained


def test_training_config_overrides_refusal_and_sweeps(tmp_path: Path, capsys) -> None:
    base = load_config(TINY)
    assert base.diffusion.timestep_distribution == "uniform" and base.diffusion.loss_weighting == "none"
    config = load_config(TINY, ["diffusion.timestep_distribution=edm_lognormal", "diffusion.loss_weighting=edm",
                                "diffusion.edm_p_mean=-1", "diffusion.edm_p_std=1", "diffusion.edm_sigma_data=1"])
    d = config.diffusion
    assert (d.timestep_distribution, d.loss_weighting, d.edm_p_mean, d.edm_p_std, d.edm_sigma_data) == (
        "edm_lognormal", "edm", -1.0, 1.0, 1.0)
    assert all(isinstance(v, float) for v in (d.edm_p_mean, d.edm_p_std, d.edm_sigma_data))
    params = config.flat_params()
    assert params["diffusion.timestep_distribution"] == "edm_lognormal" and params["diffusion.edm_p_std"] == "1.0"
    assert config.replace({}) == config
    with pytest.raises(ValueError, match="diffusion.*edm_p_std"):
        load_config(TINY, ["diffusion.edm_p_std=0"])
    with pytest.raises(ValueError, match="diffusion.*edm_sigma_data"):
        load_config(TINY, ["diffusion.edm_sigma_data=-0.5"])
    # beside the importance sampler: refused, naming both keys
    with pytest.raises(ValueError, match=r"train\.timestep_sampler='loss_second_moment'.*"
                                         r"diffusion\.timestep_distribution='edm_lognormal'"):
        load_config(TINY, ["diffusion.loss=hybrid", "train.timestep_sampler=loss_second_moment",
                           "diffusion.timestep_distribution=edm_lognormal"])
    assert load_config(TINY, ["diffusion.loss=hybrid", "train.timestep_sampler=loss_second_moment",
                              "diffusion.loss_weighting=edm"]).diffusion.loss_weighting == "edm"
    # the entry point's dry run on the shipped config
    assert main(["--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--dry-run",
                 "diffusion.timestep_distribution=edm_lognormal", "diffusion.loss_weighting=edm",
                 f"train.storage_path={tmp_path / 'runs'}"]) == 0
    assert "timestep_distribution: edm_lognormal" in capsys.readouterr().out
    # sweeps
    sweep = spec_from_dict({"metric": "loss", "search_space": {
        "diffusion.timestep_distribution": {"grid_search": ["uniform", "edm_lognormal"]},
        "diffusion.loss_weighting": {"grid_search": ["none", "min_snr", "edm"]},
        "diffusion.edm_p_mean": {"uniform": [-2.0, 0.0]}, "diffusion.edm_p_std": {"choice": [0.8, 1.2]},
        "diffusion.edm_sigma_data": {"choice": [0.5, 1.0]}}})
    sweep.check_against(base.replace({"data.shards": "unused"}))
    with pytest.raises(ValueError, match="search_space.diffusion.edm_p_std"):
        spec_from_dict({"metric": "loss", "search_space": {
            "diffusion.edm_p_std": {"choice": [0.0]}}}).check_against(base)


# ---------------------------------------------------------------- training steps
def _trainee_and_diffusion(overrides: dict):
    from pipelines.training.trainee import build_trainee
    from pipelines.training.worker import Worker

    config = load_config(TINY).replace({"data.shards": "unused", "scaling.torch_threads": 1,
                                        "train.global_batch_size": 8, **overrides})
    trainee = build_trainee(config, Worker(rank=0, world_size=1, device=torch.device("cpu")), None,
                            prepare=lambda net: net)
    return config, trainee, GaussianDiffusion(config.diffusion)


def _images(config) -> torch.Tensor:
    return torch.rand(8, *config.model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_defaults_train_exactly_as_before() -> None:
    """With the defaults a step draws uniform timesteps (``example_timesteps_and_noise`` without
    probabilities) and its loss is the plain MSE, bit for bit; the EDM parameters are not read."""
    from pipelines.training.step import train_step

    runs = []
    for overrides in ({}, {"diffusion.edm_p_mean": 0.3, "diffusion.edm_p_std": 0.4,
                           "diffusion.edm_sigma_data": 2.0, "diffusion.min_snr_gamma": 1.0}):
        config, trainee, diffusion = _trainee_and_diffusion(overrides)
        assert diffusion.timestep_probabilities is None
        x = _images(config)
        t, noise = example_timesteps_and_noise(x, config.train.seed, 1, diffusion.num_timesteps, None)
        with torch.no_grad():
            expected = diffusion.training_losses(trainee.model, x, t, noise=noise)["mse"]
        losses, drawn, grad_norm = train_step(trainee, diffusion, x, config, bf16=False)
        assert torch.equal(drawn, t) and torch.equal(losses, expected)
        runs.append((losses, drawn, grad_norm, [p.detach().clone() for p in trainee.model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3], runs[1][3]))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_training_step_with_edm_lognormal_and_edm_weight(prediction: str) -> None:
    """``train_step`` with both switches draws t from the EDM distribution and backpropagates
    mean_i (SNR_i + 1/sigma_data^2) |x0_hat_i - x0_i|^2 (per-pixel mean), computed here from the
    network's output before the step; no importance weights."""
    from pipelines.training.step import train_step

    config, trainee, diffusion = _trainee_and_diffusion({
        "diffusion.timestep_distribution": "edm_lognormal", "diffusion.loss_weighting": "edm",
        "diffusion.prediction": prediction})
    assert trainee.timestep_sampler is None
    p = diffusion.timestep_probabilities
    assert p is not None and p.shape == (diffusion.num_timesteps,)
    x = _images(config)
    t, noise = example_timesteps_and_noise(x, config.train.seed, 1, diffusion.num_timesteps, p)
    uniform_t, _ = example_timesteps_and_noise(x, config.train.seed, 1, diffusion.num_timesteps, None)
    assert not torch.equal(t, uniform_t)
    with torch.no_grad():
        x_t = diffusion.q_sample(x, t, noise)
        output = trainee.model(x_t, t).double()
    x0_hat, _ = diffusion.xstart_and_eps_from_output(output, x_t.double(), t)  # float64 conversion
    x0_mse = mean_flat((x0_hat - x.double()) ** 2)
    snr = torch.from_numpy(diffusion.snr)[t]
    expected = (snr + 1.0 / 0.5**2) * x0_mse

    with recording_backward() as backpropagated:
        losses, drawn, grad_norm = train_step(trainee, diffusion, x, config, bf16=False)
    assert torch.equal(drawn, t) and torch.isfinite(grad_norm)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-4, atol=0)
    assert float(backpropagated[0]) == pytest.approx(float(expected.mean()), rel=1e-4)
    # the weighting is not the identity here
    assert float(expected.mean()) != pytest.approx(float(x0_mse.mean()), rel=1e-2)
