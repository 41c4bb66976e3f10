"""What a LitServe user would write to serve the same checkpoint: LitServe's own batching, the upload read as
its documentation reads one (the multipart part `file`), the model's top 5 as /predict answers them.

bench/server_vs_litserve.py starts it (`serve`); LitServe's inference workers import this module to unpickle
the API, so the class lives here, apart from the bench's command, which answers --help without LitServe.
"""

from __future__ import annotations

import io

import litserve as ls
import torch
from PIL import Image

from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.preprocess import preprocess_image
from model.ranking import ranked_classes


class ViTClassifier(ls.LitAPI):
    def __init__(self, torch_threads: int, **batching: float) -> None:
        super().__init__(**batching)
        self.torch_threads = torch_threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.torch_threads)
        self.checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
        self.checkpoint.model.eval()

    # Unannotated: LitServe takes the annotation for the body's type, and with `dict` FastAPI read the upload as
    # JSON (a 500); without one, the request is the multipart form.
    def decode_request(self, request) -> torch.Tensor:
        upload = request["file"]
        return preprocess_image(Image.open(io.BytesIO(upload.file.read())), self.checkpoint.preprocess)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.model(x).softmax(dim=-1)

    def unbatch(self, output: torch.Tensor) -> list[list[float]]:
        return output.tolist()

    def encode_response(self, output: list[float]) -> dict:
        [predictions] = ranked_classes([output], self.checkpoint.classes, 5)
        return {"model": self.checkpoint.name, "predictions": predictions}


def serve(port: int, workers: int, torch_threads: int, max_batch_size: int, batch_timeout_s: float) -> None:
    api = ViTClassifier(torch_threads, max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, generate_client_file=False)
