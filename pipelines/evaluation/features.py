"""The FD's feature networks: ``classifier`` (the project's own CNN, ``evaluation.classifier``) and
``inception`` (Inception-v3 pool3, 2048-D, the standard FID features of Heusel et al. 2017).

The Inception network is loaded ONLY from a local file the user names: the TorchScript
``inception-2015-12-05.pt`` that StyleGAN2-ADA's and clean-fid's FID code use (the 2015-12-05
TensorFlow graph of the original FID, converted by NVIDIA). It is called as that code calls it,
``net(images_0_255, return_features=True)`` -> ``[N, 2048]``, resizing to 299x299 inside. Nothing is
downloaded at run time. Grey images are repeated to 3 channels (a convention, not part of the FID).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipelines.evaluation.classifier import ClassifierFeatures, load_classifier
from pipelines.evaluation.fd import FeatureNet
from pipelines.registry.feature_store import fetch_feature_net

FeatureKind = Literal["classifier", "inception"]
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """``FeatureNet`` of the TorchScript Inception-v3: float64 ``[N, 2048]`` pool3 features.

    Raises (at construction):
        FileNotFoundError: when ``weights`` is ``None`` or not a file, saying which file to get and
            where to put it.
        ValueError: when the file is not a loadable TorchScript module.
    """

    dim = 2048

    def __init__(self, weights: str | None, device: str = "cpu") -> None:
        path = Path(weights).expanduser() if weights else None
        if path is None or not path.is_file():
            where = f"{path.resolve()} does not exist" if path is not None else "no --inception-weights was given"
            raise FileNotFoundError(
                f"Inception-v3 weights for --fd-features inception: {where}. Download {INCEPTION_FILE} "
                f"(the TorchScript FID Inception of StyleGAN2-ADA / clean-fid) from {INCEPTION_URL} on a machine "
                f"with network access, copy it to e.g. {Path.home() / '.cache' / 'ray-ddpm' / INCEPTION_FILE}, "
                "and pass that path with --inception-weights PATH (nothing is downloaded at run time)"
            )
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{path.resolve()} is not a TorchScript Inception ({INCEPTION_FILE}): {err}") from err
        self.device = device
        self.identity = f"inception:sha256:{_file_sha256(path)}"

    def features(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ValueError(f"Inception takes 1 or 3 channels, got {x.shape[1]}")
        x = ((x + 1.0) * 127.5).clamp(0, 255)
        with torch.no_grad():
            out = self.net(x, return_features=True)
        return out.reshape(len(images), -1).double().cpu().numpy()


def build_feature_net(kind: FeatureKind, classifier: str | None = None, inception_weights: str | None = None,
                      device: str = "cpu") -> FeatureNet:
    """The feature network named by ``--fd-features``.

    Args:
        kind: "classifier" or "inception".
        classifier: for "classifier": a model URI (``models:/fd-classifier-fashion-mnist/1``, ``runs:/<id>/fd_classifier``)
            or a local folder of ``pipelines/train_classifier.py``.
        inception_weights: for "inception": the local ``inception-2015-12-05.pt``.

    Raises:
        ValueError: on an unknown kind, or "classifier" without ``classifier``.
        FileNotFoundError: if the classifier or the Inception file is not found.
    """
    if kind == "classifier":
        if not classifier:
            raise ValueError("--fd-features classifier needs --fd-classifier URI_OR_FOLDER "
                             "(train one with pipelines/train_classifier.py)")
        model, _ = load_classifier(fetch_feature_net(classifier))
        return ClassifierFeatures(model)
    if kind == "inception":
        return InceptionFeatures(inception_weights, device=device)
    raise ValueError(f"--fd-features must be 'classifier' or 'inception', got {kind!r}")
