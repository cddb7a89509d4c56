"""`genmodels sample`: a PNG grid from a registered generator (or any model URI MLflow loads).

    sample("models:/genmodels-gan@champion", num_images=64, out="grid.png")
"""

from __future__ import annotations

import io
from pathlib import Path


def sample(model_uri: str, *, num_images: int, out: str | Path, seed: int = 0, truncation: float | None = None,
           project_dir: str | Path = ".") -> Path:
    import mlflow
    import pandas as pd
    import torch
    from PIL import Image

    from genmodels.data.transforms import image_grid
    from genmodels.files import write_bytes
    from genmodels.tracking import resolve_tracking

    mlflow.set_tracking_uri(resolve_tracking(Path(project_dir)).uri)
    row = {"num_images": num_images, "seed": seed, **({"truncation": truncation} if truncation is not None else {})}
    pixels = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame([row]))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    buffer = io.BytesIO()
    Image.fromarray(image_grid(images)).save(buffer, format="PNG")
    write_bytes(Path(out), buffer.getvalue())
    return Path(out)
