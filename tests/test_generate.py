"""diffusion_core.generate: every sampler name through ``generate`` is exactly the direct core call
with the same seed; SamplerSettings validation, defaults and network-evaluation counts; jobs that
differ in one sampler parameter draw different images."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _diffusion_helpers import (
    ConvModel,
    CountingModel,
    single_thread,  # noqa: F401 (autouse fixture)
)
from _unet_helpers import SMALL_UNET, computing_unet

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.samplers.registry import SAMPLERS

T = 30
SHAPE = (2, 1, 6, 6)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(num_timesteps=T))


def _direct(diffusion: GaussianDiffusion, model, settings: SamplerSettings, seed: int) -> torch.Tensor:
    """The core sampler called by hand with the parameters ``settings`` stands for."""
    g, clip = seeded_generator(seed), settings.clip_denoised
    if settings.sampler == "ddpm":
        return diffusion.p_sample_loop(model, SHAPE, generator=g, clip_denoised=clip)
    if settings.sampler == "ddim":
        return diffusion.ddim_sample_loop(model, SHAPE, num_steps=settings.num_steps, eta=settings.eta, generator=g,
                                          clip_denoised=clip, spacing=settings.spacing)
    if settings.sampler == "pc":
        return diffusion.pc_sample_loop(model, SHAPE, num_steps=settings.num_steps,
                                        corrector_steps=settings.corrector_steps, snr=settings.snr, generator=g,
                                        clip_denoised=clip, spacing=settings.spacing)
    if settings.sampler == "langevin":
        return diffusion.langevin_sample_loop(model, SHAPE, num_steps=settings.num_steps,
                                              corrector_steps=settings.corrector_steps, snr=settings.snr,
                                              generator=g, clip_denoised=clip, spacing=settings.spacing)
    return diffusion.dpm_solver_sample_loop(model, SHAPE, num_steps=settings.num_steps, order=settings.order,
                                            spacing=settings.spacing, generator=g, clip_denoised=clip,
                                            algorithm=settings.algorithm)


SETTINGS = [
    SamplerSettings("ddpm"),
    SamplerSettings("ddim", 7),
    SamplerSettings("ddim", 6, eta=0.7, spacing="quadratic", clip_denoised=False),
    SamplerSettings("pc", 5, corrector_steps=2, snr=0.2),
    SamplerSettings("pc", 4, corrector_steps=0, spacing="logsnr"),
    SamplerSettings("langevin", 4, corrector_steps=3, snr=0.1),
    SamplerSettings("dpm_solver", 6),
    SamplerSettings("dpm_solver", 5, order=1, spacing="uniform", clip_denoised=False),
    SamplerSettings("dpm_solver", 6, algorithm="sde-dpmsolver++"),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.params().values()))
def test_generate_equals_the_direct_sampler_call_and_counts_evaluations(diffusion, settings) -> None:
    model = CountingModel(ConvModel())
    images = generate(diffusion, model, SHAPE, settings, generator=seeded_generator(3))
    assert images.shape == SHAPE and images.dtype == torch.float32
    assert len(model.calls) == settings.network_evaluations(T)
    assert torch.equal(images, _direct(diffusion, ConvModel(), settings, seed=3))  # bit for bit
    if settings.clip_denoised:
        assert images.abs().max() <= 1.0
    other = generate(diffusion, ConvModel(), SHAPE, settings, generator=seeded_generator(4))
    assert not torch.equal(images, other)  # every sampler draws x_T from the generator


def test_defaults_are_unchanged_and_spacing_is_resolved() -> None:
    default = SamplerSettings()
    assert (default.sampler, default.num_steps, default.eta, default.clip_denoised) == ("ddim", 50, 0.0, True)
    assert default.spacing == "uniform" and default == SamplerSettings("ddim", 50, 0.0, True, "uniform")
    assert SamplerSettings("dpm_solver").spacing == "logsnr" == SAMPLERS["dpm_solver"].default_spacing
    assert SamplerSettings("pc").spacing == "uniform" and SamplerSettings("langevin").spacing == "uniform"
    assert SamplerSettings("dpm_solver", spacing="quadratic").spacing == "quadratic"
    assert SamplerSettings("ddpm").params() == {"sampler": "ddpm", "clip_denoised": True}
    assert SamplerSettings("pc", 8, corrector_steps=2).params() == {
        "sampler": "pc", "num_steps": 8, "spacing": "uniform", "corrector_steps": 2, "snr": 0.16, "clip_denoised": True}
    assert set(SamplerSettings("ddim").params()) == {"sampler", "num_steps", "eta", "spacing", "clip_denoised"}
    assert set(SamplerSettings("dpm_solver").params()) == {"sampler", "num_steps", "spacing", "order", "algorithm",
                                                           "clip_denoised"}
    assert SamplerSettings("dpm_solver").algorithm == "dpmsolver++"
    with pytest.raises(ValueError, match=r"algorithm='sde' is not allowed"):
        SamplerSettings("dpm_solver", algorithm="sde")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.num_steps = 3  # type: ignore[misc]


def test_ddim_default_is_the_plain_ddim_loop(diffusion) -> None:
    """SamplerSettings("ddim", S) is ddim_sample_loop's own default call (uniform spacing, eta 0)."""
    model = ConvModel()
    images = generate(diffusion, model, SHAPE, SamplerSettings("ddim", 9), generator=seeded_generator(0))
    expected = diffusion.ddim_sample_loop(model, SHAPE, num_steps=9, generator=seeded_generator(0))
    assert torch.equal(images, expected)


def test_network_evaluations() -> None:
    assert SamplerSettings("ddpm", 3).network_evaluations(T) == T  # num_steps is ignored by ddpm
    assert SamplerSettings("ddim", 10).network_evaluations(T) == 10
    assert SamplerSettings("dpm_solver", 10).network_evaluations(T) == 10
    assert SamplerSettings("pc", 10, corrector_steps=2).network_evaluations(T) == 30
    assert SamplerSettings("pc", 10, corrector_steps=0).network_evaluations(T) == 10
    assert SamplerSettings("langevin", 10, corrector_steps=2).network_evaluations(T) == 21
    with pytest.raises(ValueError, match=r"num_steps=31 must be an integer in \[1, 30\]"):
        SamplerSettings("ddim", 31).network_evaluations(T)
    with pytest.raises(ValueError, match="num_timesteps"):
        SamplerSettings("ddim", 3).network_evaluations(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "euler"}, "sampler='euler' is not allowed"),
        ({"num_steps": 0}, "num_steps=0 must be a positive integer"),
        ({"num_steps": 2.0}, "num_steps=2.0 must be a positive integer"),
        ({"eta": -0.1}, "eta=-0.1 must be a number"),
        ({"clip_denoised": 1}, "clip_denoised=1 must be true or false"),
        ({"spacing": "cosine"}, "spacing='cosine' is not allowed"),
        ({"sampler": "pc", "corrector_steps": -1}, "corrector_steps=-1 must be an integer >= 0"),
        ({"sampler": "langevin", "corrector_steps": 0}, "corrector_steps=0 must be an integer >= 1 for sampler 'langevin'"),
        ({"sampler": "pc", "snr": 0.0}, "snr=0.0 must be a number in (0.0, inf)"),
        ({"sampler": "pc", "snr": float("nan")}, "snr=nan must be a number"),
        ({"sampler": "dpm_solver", "order": 3}, "order=3 must be an integer in [1, 2]"),
        ({"sampler": "dpm_solver", "order": 1.5}, "order=1.5 must be an integer in [1, 2]"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplerSettings(**kwargs)
    assert message in str(info.value)


def test_generate_passes_core_errors_through(diffusion) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        generate(diffusion, ConvModel(), SHAPE, SamplerSettings("dpm_solver", T + 1), seeded_generator(0))


PARAMETER_PAIRS = [
    (SamplerSettings("ddim", 5), SamplerSettings("ddim", 6)),
    (SamplerSettings("ddim", 5, eta=0.0), SamplerSettings("ddim", 5, eta=0.5)),
    (SamplerSettings("dpm_solver", 5), SamplerSettings("dpm_solver", 6)),
    (SamplerSettings("dpm_solver", 5, order=1), SamplerSettings("dpm_solver", 5, order=2)),
    (SamplerSettings("pc", 4, corrector_steps=1, snr=0.1), SamplerSettings("pc", 4, corrector_steps=1, snr=0.2)),
    (SamplerSettings("langevin", 4, corrector_steps=1, snr=0.1),
     SamplerSettings("langevin", 4, corrector_steps=1, snr=0.2)),
]


@pytest.mark.parametrize(("first", "second"), PARAMETER_PAIRS,
                         ids=lambda s: "-".join(f"{v}" for v in s.params().values()))
def test_jobs_differing_in_one_parameter_give_different_images(diffusion, first, second) -> None:
    """Two jobs with the same seed that differ only in ``num_steps``, ``eta``, ``order`` or ``snr``
    draw different images on a network whose output depends on its input (``computing_unet``; a
    freshly built UNet outputs 0, and then DDIM, DPM-Solver and the corrector ignore these
    parameters). The bound 1e-3 on the largest pixel difference is 10^4 float32 roundings of [-1, 1]."""
    model = computing_unet(SMALL_UNET, seed=0)
    shape = (2, *SMALL_UNET.image_shape)
    with torch.no_grad():
        a = generate(diffusion, model, shape, first, generator=seeded_generator(1))
        b = generate(diffusion, model, shape, second, generator=seeded_generator(1))
    assert float((a - b).abs().max()) > 1e-3, (first.params(), second.params())


# ------------------------------------------------------------------ class labels and guidance


def _conditional_unet():
    return computing_unet(dataclasses.replace(SMALL_UNET, in_channels=1, out_channels=1, image_size=8,
                                              num_classes=2))


def test_generate_with_class_labels_is_the_guided_sampler(diffusion) -> None:
    from diffusion_core.guidance import classifier_free_guidance

    model, shape = _conditional_unet(), (3, 1, 8, 8)
    settings = SamplerSettings("ddim", 5)
    labels = torch.tensor([1, -1, 0])
    for scale in (0.0, 1.0, 2.0):
        got = generate(diffusion, model, shape, settings, seeded_generator(3), class_labels=labels,
                       guidance_scale=scale)
        guided = classifier_free_guidance(model, labels, scale, diffusion.process)
        want = diffusion.ddim_sample_loop(guided, shape, num_steps=5, generator=seeded_generator(3))
        assert torch.equal(got, want)
    # without labels a conditional model is sampled unlabelled, as model(x_t, t); the scale has no effect
    plain = diffusion.ddim_sample_loop(model, shape, num_steps=5, generator=seeded_generator(3))
    assert torch.equal(generate(diffusion, model, shape, settings, seeded_generator(3), guidance_scale=4.0), plain)
    unlabelled = generate(diffusion, model, shape, settings, seeded_generator(3), class_labels=[-1, -1, -1],
                          guidance_scale=4.0)
    torch.testing.assert_close(unlabelled, plain)


@pytest.mark.parametrize("kwargs,message", [
    ({"class_labels": [0, 1], "guidance_scale": 2.0}, "class_labels has 2 labels"),
    ({"class_labels": [0, 1, 2]}, r"class_labels has the value 2; labels must be in \[-1, 2\)"),
    ({"class_labels": [0, 1, 0], "guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
])
def test_generate_rejects_bad_labels_and_scales(diffusion, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        generate(diffusion, _conditional_unet(), (3, 1, 8, 8), SamplerSettings("ddim", 2), **kwargs)


def test_generate_rejects_labels_for_an_unconditional_model(diffusion) -> None:
    model = computing_unet(dataclasses.replace(SMALL_UNET, in_channels=1, out_channels=1, image_size=8))
    with pytest.raises(ValueError, match="this model is unconditional"):
        generate(diffusion, model, (2, 1, 8, 8), SamplerSettings("ddim", 2), class_labels=[0, 1])
