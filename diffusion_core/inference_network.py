"""The network that inference calls: one builder for every way of running a UNet without gradients.

Serve's replicas (``deploy.model_runner``), the evaluation (``pipelines.evaluation.job``) and the
benchmarks run the model through ``build_inference_network``, in one of the ``NetworkMode``\\ s:

* ``"eager"``: the module itself;
* ``"compiled"``: ``torch.compile(model, dynamic=True)`` (inductor), one graph for every batch size
  N >= 2 and one for N = 1 (dynamo specialises sizes 0 and 1);
* ``"padded"``: ``torch.compile(model, dynamic=False)`` on a few fixed batch sizes (``buckets``): a
  batch runs padded with zero rows up to the smallest bucket that holds it (larger batches run in
  chunks of the largest bucket), so only ``len(buckets)`` static graphs ever exist, all compiled
  when the network is built;
* ``"exported"``: ``torch.export.export`` with a dynamic batch dimension, then ``torch.compile`` of
  the exported program's module.

A class-conditional UNet (``UNetConfig.num_classes`` set) runs with its third input, ``class_labels``
int64 ``[N]`` in [-1, K) (-1: "no label"), in every mode: ``"exported"`` exports the three inputs with
one dynamic batch dimension, ``"padded"`` pads the labels with -1; a call without labels gives every
row -1. An unconditional model keeps its two inputs.

Every row of the UNet's output depends on that row's input only (GroupNorm and attention work per
image, dropout is off in eval mode), so padding rows change no real row. A built network is checked
against the eager module; a mode that fails to build or disagrees runs the eager module instead and
says why (``InferenceNetwork.reason``). Pure torch: no Ray, MLflow or I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence, get_args

import torch

from diffusion_core.validation import check_choice

NetworkMode = Literal["eager", "compiled", "padded", "exported"]
NETWORK_MODES: tuple[str, ...] = get_args(NetworkMode)
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8)
"""Batch sizes of the ``"padded"`` network: Serve's default ``max_batch_size`` is 8."""
CHECK_TOLERANCE = 1e-4
"""Largest absolute and relative difference from the eager module (float32; fused kernels reorder sums)."""

Network = Callable[..., torch.Tensor]
"""``(x_t float32 [N, C, H, W], t int64 [N]) -> [N, C_out, H, W]``, and for a class-conditional model
``(x_t, t, class_labels int64 [N]) -> [N, C_out, H, W]``."""


@dataclass(frozen=True)
class InferenceNetwork:
    """A built network and what it runs.

    Attributes:
        forward: ``(x_t float32 [N, C, H, W], t int64 [N]) -> [N, C_out, H, W]`` for any N >= 1; for a
            class-conditional model ``(x_t, t, class_labels int64 [N])``, the labels in [-1, K).
        mode: the ``NetworkMode`` that runs: the requested one, or ``"eager"`` when building it failed.
        reason: why the requested mode was replaced by the eager module, ``"<exception type>: <message>"``
            (``None`` when it was not).
        num_classes: K of a class-conditional model, ``None`` for an unconditional one.
    """

    forward: Network
    mode: str
    reason: str | None = None
    num_classes: int | None = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(x_t, t)``, or for a class-conditional model ``forward(x_t, t, class_labels)`` with
        ``class_labels`` int64 ``[N]`` in [-1, K) (``None``: every row -1, "no label").

        Raises:
            ValueError: if ``class_labels`` is given to an unconditional model.
        """
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional model (UNetConfig.num_classes is None)")
            return self.forward(x_t, t)
        if class_labels is None:
            class_labels = torch.full_like(t, -1, dtype=torch.int64)
        return self.forward(x_t, t, class_labels)


class PaddedNetwork:
    """Runs ``network`` only at the batch sizes ``buckets``: a batch of N rows is padded with zero
    rows (``x_t`` 0, ``t`` 0, ``class_labels`` -1) to the smallest bucket >= N and the padding is cut
    from the output; a batch larger than the largest bucket runs in chunks of it.

    Args:
        network: ``(x_t [B, C, H, W], t int64 [B]) -> [B, C_out, H, W]`` whose rows are independent,
            or ``(x_t, t, class_labels int64 [B])`` for a class-conditional model.
        buckets: the batch sizes, each >= 1.

    Raises:
        ValueError: if ``buckets`` is empty or holds a size < 1.
    """

    def __init__(self, network: Network, buckets: Sequence[int]) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be batch sizes >= 1, got {list(buckets)}")
        self.network = network
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))

    def bucket(self, n: int) -> int:
        """The batch size a batch of ``n`` rows runs at: the smallest bucket >= n, else the largest."""
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, *class_labels: torch.Tensor) -> torch.Tensor:
        """The network's output for ``x_t`` [N, C, H, W] and ``t`` [N] (and, for a class-conditional
        network, ``class_labels`` [N]), computed in padded chunks."""
        largest = self.buckets[-1]
        chunks = [self._padded(x_t[i:i + largest], t[i:i + largest], *(y[i:i + largest] for y in class_labels))
                  for i in range(0, x_t.shape[0], largest)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _padded(self, x_t: torch.Tensor, t: torch.Tensor, *class_labels: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        pad = self.bucket(n) - n
        if pad == 0:
            return self.network(x_t, t, *class_labels)
        x_pad = torch.cat([x_t, x_t.new_zeros((pad, *x_t.shape[1:]))])
        t_pad = torch.cat([t, t.new_zeros(pad)])
        y_pad = [torch.cat([y, y.new_full((pad,), -1)]) for y in class_labels]
        return self.network(x_pad, t_pad, *y_pad)[:n]


def _compiled(model: torch.nn.Module, buckets: Sequence[int]) -> Network:
    return torch.compile(model, dynamic=True)


def _padded(model: torch.nn.Module, buckets: Sequence[int]) -> Network:
    return PaddedNetwork(torch.compile(model, dynamic=False), buckets)


def _exported(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> Network:
    """``model`` exported on ``example`` (two or three inputs) with one dynamic batch dimension shared
    by every input, then compiled."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))
    return torch.compile(program.module(), dynamic=True)


def warmup_sizes(mode: str, buckets: Sequence[int]) -> tuple[int, ...]:
    """Batch sizes run when a network is built, so that their compilation happens then: every bucket
    for ``"padded"``, 2 (the dynamic graph) and 1 for ``"compiled"`` / ``"exported"``, none for eager."""
    if mode == "padded":
        return tuple(sorted(set(buckets)))
    return () if mode == "eager" else (2, 1)


def build_inference_network(
    model: torch.nn.Module,
    mode: str,
    image_shape: tuple[int, int, int],
    device: str | torch.device,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    warmup: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> InferenceNetwork:
    """``model`` (put in eval mode) run as ``mode``, built and compiled now.

    Each batch size of ``warmup`` (default ``warmup_sizes(mode, buckets)``) is run once on seeded
    N(0, 1) images at timesteps ``0, 1, ..., N - 1`` (0-based), and for a class-conditional model
    with class labels ``-1, 0, 1, ...`` (mod K, so "no label" rows are among them), which compiles its
    graph, and its output is compared with the eager module's (``CHECK_TOLERANCE``). When building,
    compiling or that check fails (no C++ compiler for inductor's CPU code, an operator export cannot
    trace), the result runs the eager module, with ``reason`` saying why.

    Args:
        model: ``(x_t float32 [N, C, H, W], t int64 [N]) -> [N, C_out, H, W]`` on ``device``, or for
            a class-conditional model ``(x_t, t, class_labels int64 [N] in [-1, K))``.
        mode: one of ``NETWORK_MODES``.
        image_shape: ``(C, H, W)`` of the model's images.
        device: where the model's parameters live.
        buckets: batch sizes of ``"padded"`` (ignored by the other modes).
        warmup: batch sizes to compile and check now; ``()`` builds without running the network.
        num_classes: K of a class-conditional model; default: ``model.config.num_classes`` (a
            ``UNet``'s ``UNetConfig``), ``None`` (unconditional) for a module without one.

    Raises:
        ValueError: if ``mode`` is not one of ``NETWORK_MODES`` (e.g. ``"torchscript"``), naming them.
    """
    check_choice("network", mode, NetworkMode)
    model = model.eval()
    if num_classes is None:
        num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if mode == "eager":
        return InferenceNetwork(model, "eager", num_classes=num_classes)
    sizes = warmup_sizes(mode, buckets) if warmup is None else tuple(warmup)
    try:
        with torch.no_grad():
            if mode == "exported":
                network = _exported(model, _example(2, image_shape, device, num_classes))
            else:
                network = (_compiled if mode == "compiled" else _padded)(model, buckets)
            for n in sizes:
                example = _example(n, image_shape, device, num_classes)
                torch.testing.assert_close(network(*example), model(*example), atol=CHECK_TOLERANCE,
                                           rtol=CHECK_TOLERANCE)
    except Exception as err:  # noqa: BLE001 - any build or compile failure: the eager module computes the same
        return InferenceNetwork(model, "eager", f"{type(err).__name__}: {str(err)[:300]}", num_classes)
    return InferenceNetwork(network, mode, num_classes=num_classes)


def _example(n: int, image_shape: tuple[int, int, int], device: str | torch.device,
             num_classes: int | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded N(0, 1) images float32 [n, C, H, W] and timesteps int64 [n] (0, 1, ..., n - 1) on ``device``;
    for a class-conditional model (``num_classes`` K) also class labels int64 [n]: -1, 0, 1, ..., K - 1, -1, ..."""
    x_t = torch.randn((n, *image_shape), generator=torch.Generator().manual_seed(n)).to(device)
    t = torch.arange(n, dtype=torch.int64).to(device)
    if num_classes is None:
        return x_t, t
    labels = torch.arange(n, dtype=torch.int64) % (num_classes + 1) - 1
    return x_t, t, labels.to(device)

