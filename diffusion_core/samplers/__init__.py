"""The samplers of the diffusion core, one module per family, on the public names of
``diffusion_core.process.DiffusionProcess``; called through the ``GaussianDiffusion`` methods of
the same names and, by name, through ``diffusion_core.generate``.

* ``registry``: the one description of every sampler (names, parameters, defaults, cost); torch-free.
* ``common``: the step helpers the loops share (initial noise, per-step noise, timesteps,
  denoising) and the checked cost :func:`diffusion_core.samplers.common.network_evaluations`.
* ``ancestral``: DDPM (Ho et al. 2020, Algorithm 2).
* ``ddim``: DDIM (Song et al. 2021, eq. 12).
* ``score_based``: predictor-corrector and annealed Langevin dynamics with the model's score
  (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Alg. 1/5; Song & Ermon 2019).
* ``dpm_solver``: DPM-Solver++ multistep, ODE and SDE (Lu et al. 2022).
* ``edm``: EDM's deterministic Heun sampler on the noise levels of eq. 5 (Karras et al. 2022, Alg. 1).

Every sampler runs under ``torch.no_grad()``, draws its noise with
``diffusion_core.rng.randn(..., generator, device=device)`` (so a seeded generator gives the same
images on the same hardware; the generator must live on ``device``; a ``rng.RowGenerators`` gives
each group of rows its own generator, and every per-image quantity, such as the Langevin step
size, is computed per row), takes ``noise=`` (the starting x_T [N, C, H, W]) and ``progress=``,
and returns float32 [N, C, H, W] (in [-1, 1] when ``clip_denoised``).

Validation: the ``*_sample_loop`` functions check their arguments (shape, noise, num_steps, ...) once
at entry and then run unchecked step functions (``ancestral_step``, ``ddim_step``, ...) on the
timesteps they build themselves: checking a timestep tensor reads ``t.min()``/``t.max()``, which
waits for the device at every step. The public single-step functions (``p_sample``, ``ddim_sample``)
check their inputs on every call.

This package's ``__init__`` imports nothing, so that ``diffusion_core.samplers.registry`` stays
importable without torch.
"""
