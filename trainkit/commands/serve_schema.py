"""What `trainkit serve` answers, as pydantic models: the handlers build their answers from them
and the OpenAPI document (/docs, /redoc, /openapi.json) is made from the same models, so the two
cannot drift apart. The examples are what an MNIST run answers."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DIGITS = [str(d) for d in range(10)]


class Health(BaseModel):
    status: str = Field(description='"ok" while the server serves', examples=["ok"])


class Problem(BaseModel):
    """Every error the server sends: one line saying what was wrong."""
    detail: str = Field(description="what was wrong with the request, in one line",
                        examples=["the upload notes.txt is not a readable image: not a PNG, JPEG, "
                                  "WebP, BMP, TIFF, GIF or PBM/PGM/PPM file"])


class TopClass(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(alias="class", description="a class name", examples=["7"])
    probability: float = Field(ge=0, le=1, examples=[0.983])


class Prediction(BaseModel):
    predicted: str = Field(description="the most probable class", examples=["7"])
    top: list[TopClass] = Field(description="the `top` most probable classes, most probable first",
                                examples=[[{"class": "7", "probability": 0.983}, {"class": "9", "probability": 0.011}]])
    probabilities: dict[str, float] = Field(description="every class's probability (they add up to 1)",
                                            examples=[{d: (0.983 if d == "7" else 0.0019) for d in DIGITS}])
    notes: list[str] = Field(description="what was done to the image beyond a resize",
                             examples=[["inverted: a dark digit on a light background (MNIST's digits are light on dark)"]])


class Preprocessing(BaseModel):
    """What a caller must do to an image before the model sees it (also in the exported ONNX model)."""
    image_shape: list[int] = Field(examples=[[1, 28, 28]])
    channels: int = Field(examples=[1])
    color: str = Field(examples=["grayscale"])
    scale: str = Field(examples=["pixel / 255"])
    mean: list[float] = Field(examples=[[0.1307]])
    std: list[float] = Field(examples=[[0.3081]])
    classes: list[str] = Field(examples=[DIGITS])
    outputs: str = Field(description="what the network returns", examples=["log_probs"])


class Info(BaseModel):
    run: str = Field(description="the run folder", examples=["runs/20260101-120000"])
    model: str = Field(examples=["s5net"])
    dataset: str = Field(examples=["mnist"])
    classes: list[str] = Field(examples=[DIGITS])
    accuracy: float | None = Field(description="the final test accuracy, percent; null if not recorded",
                                   examples=[99.31])
    epochs: float = Field(description="epochs trained: 1.5 for a run stopped half-way through its second",
                          examples=[20])
    stopped: bool = Field(description="whether its last epoch was stopped part way (--target-acc, pruned)",
                          examples=[False])
    parameters: int = Field(examples=[198_000])
    reports: list[str] = Field(description="the run's figures, at /run/{name}", examples=[["plot.png", "confusion.png"]])
    preprocessing: Preprocessing
    backend: str = Field(description="torch or onnx", examples=["onnx"])
    max_batch: int = Field(examples=[16])
    workers: int = Field(examples=[1])
    threads: int = Field(examples=[1])
    max_upload_bytes: int = Field(examples=[10 << 20])
    max_pixels: int = Field(examples=[4096 * 4096])
    digits: bool = Field(description="images are framed like MNIST's digits", examples=[True])


# The errors /predict sends, each as {"detail": "..."}
PREDICT_ERRORS = {
    400: "not a readable image, an empty body or file, or a form without a file",
    413: "the upload is over --max-upload-mb, or the image over 4096 x 4096 pixels",
    415: "a content type other than multipart/form-data, image/* or application/octet-stream",
    422: "`top` is not a whole number, or below 1",
}

# The bodies /predict accepts: a form's file field, or the image itself
UPLOAD = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary",
                                                               "description": "a PNG or JPEG image"}}}},
    "image/png": UPLOAD, "image/jpeg": UPLOAD, "image/*": UPLOAD, "application/octet-stream": UPLOAD}}}


def error_responses(errors: dict[int, str]) -> dict:
    """FastAPI's `responses` for errors sent as a Problem."""
    return {status: {"model": Problem, "description": text} for status, text in errors.items()}
