"""The registered generator as an MLflow pyfunc model, logged from code (MLflow's "models from
code": this file is the model; nothing is cloudpickled). It imports no `genmodels`: a consumer
has mlflow and torch, not this repository. The network code comes with the model (`code_paths`)
as a copy of `genmodels/models` under the package name that generator.json gives, so an
installed `genmodels` can neither shadow it nor be needed.

    model = mlflow.pyfunc.load_model("models:/genmodels-gan@champion")
    images = model.predict(pd.DataFrame([{"num_images": 8, "seed": 0}, {"num_images": 4, "seed": 1}]))
    # uint8 [12, H, W, C]: the first 8 drawn from seed 0, the next 4 from seed 1
    # (a seed's first k images are the same in any row that asks it for k or more)
    pngs = model.predict(rows, params={"format": "png"})   # base64 PNG strings, one per image

Rows may carry `truncation` (GANs): latent draws beyond that many standard deviations are drawn
again (the truncation trick, Brock et al. 2019 sec. 3.1); empty or absent means none.
Loading checks the weights' sha256 against generator.json and reads them with
`torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
import json
import math
import pickle

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

MAX_IMAGES_PER_CALL = 10_000  # a bound on one request's output (28x28: ~8 MB of uint8)
GENERATE_BATCH_SIZE = 256
FORMATS = ("raw", "png")


class WeightsRefused(RuntimeError):
    """The weights file is not the one registered, or is not a plain tensor state dict."""


def load_weights(path: str, expected_sha256: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected_sha256:
        raise WeightsRefused(f"{path}: sha256 {digest.hexdigest()[:16]}... is not the registered weights' "
                             f"{expected_sha256[:16]}... (generator.json): refusing to load a replaced file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsRefused(f"{path}: refused, not a plain tensor state dict (torch.load weights_only=True "
                             f"stops pickled code): {str(err).splitlines()[0]}") from None


class Generator(PythonModel):
    def load_context(self, context) -> None:
        with open(context.artifacts["generator"]) as f:
            self.spec = json.load(f)
        models = importlib.import_module(self.spec["package"])
        self.model = models.build_generator(self.spec["builder"], **self.spec["kwargs"])
        self.model.load_state_dict(load_weights(context.artifacts["weights"], self.spec["weights_sha256"]))
        self.model.eval().requires_grad_(False)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        # A DataFrame hint: MLflow infers nothing from it (the logged signature types the input) and
        # stops asking for type hints.
        fmt = (params or {}).get("format") or "raw"
        if fmt not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        total = sum(_count(row) for row in rows)
        if total > MAX_IMAGES_PER_CALL:
            raise ValueError(f"num_images: {total} in one call; at most {MAX_IMAGES_PER_CALL}: split the rows over calls")
        batches = [self._generate(row) for row in rows]
        images = torch.cat(batches) if batches else torch.empty(0, self.spec["channels"], self.spec["image_size"],
                                                                  self.spec["image_size"])
        pixels = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return pixels if fmt == "raw" else [_png(image) for image in pixels]

    @torch.no_grad()
    def _generate(self, row: dict) -> torch.Tensor:
        seed, truncation = row.get("seed"), _truncation(row.get("truncation"))
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
            raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
        if truncation is not None and not self.spec["truncation"]:
            raise ValueError(f"truncation: this {self.spec['family']} generator takes none, got {truncation}")
        generator = torch.Generator().manual_seed(int(seed))
        z = torch.empty(_count(row), self.spec["latent_dim"])
        for latent in z:  # one draw per image: the first n images of a seed are the same whatever the row's count
            if truncation is None:
                latent.normal_(generator=generator)
            else:
                torch.nn.init.trunc_normal_(latent, 0.0, 1.0, -truncation, truncation, generator=generator)
        # in batches: the activations, not the uint8 output, bound a large request's memory
        return torch.cat([self.model.generate(batch) for batch in z.split(GENERATE_BATCH_SIZE)])


def _count(row: dict) -> int:
    value = row.get("num_images")
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"num_images: expected an integer >= 1 per row, got {value!r}")
    return int(value)


def _truncation(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):  # an absent cell of a DataFrame
        return None
    if not isinstance(value, (int, float, np.number)) or not value > 0:
        raise ValueError(f"truncation: expected a number > 0 (standard deviations), got {value!r}")
    return float(value)


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


mlflow.models.set_model(Generator())
