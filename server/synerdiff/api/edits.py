"""POST /v1/images/edits: OpenAI's multipart image edit, served as image-to-image or, with a
mask, as inpainting (how depends on the model's UNet: the engine's business).

The form carries the picture (`image`), an optional `mask` (OpenAI's convention: its fully
transparent pixels are the ones to repaint), the generation fields and SynerDiff's
extensions as text parts. Files are decoded here, so the engine receives PIL images; every
client mistake (not multipart, a field of the wrong type, a file that is not an image or is
too large) is a 4xx naming the part.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import warnings
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from PIL import Image
from starlette.datastructures import FormData, UploadFile

from ..contract.requests import SAMPLER_NAMES
from ..engine import GenerationRequest
from .auth import require_api_token
from .errors import APIError
from .generation import check_available, json_response, refused, submit
from .schemas import ImagesResponse
from .state import AppState
from .streaming import stream_response

EDITS_PATH = "/v1/images/edits"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")

router = APIRouter(dependencies=[Depends(require_api_token)])

_TEXT_FIELDS = {
    "prompt",
    "n",
    "size",
    "response_format",
    "model",
    "user",
    "quality",
    "background",
    "output_format",
    "input_fidelity",
    "moderation",
    "safety_identifier",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "sampler",
    "cfg_skip",
    "strength",
    "stream",
    "lora",
}
_FILE_FIELDS = {"image", "mask"}


def _invalid(param: str, message: str, status: int = 400, code: str = "invalid_value") -> APIError:
    return APIError(status, f"{param}: {message}", param=param, code=code)


class EditForm:
    """The form's parts, read with the checks a multipart body needs."""

    def __init__(self, form: FormData):
        self.form = form
        self.files: dict[str, UploadFile] = {}
        self.text: dict[str, str] = {}
        for key, value in form.multi_items():
            # Some clients send a single file as `image[]`.
            name = key[:-2] if key.endswith("[]") else key
            if name not in _TEXT_FIELDS and name not in _FILE_FIELDS:
                raise _invalid(name, "is not a field of this endpoint", code="unknown_parameter")
            if name in self.files or name in self.text:
                raise _invalid(name, "was sent more than once; this endpoint takes one of each")
            if name in _FILE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise _invalid(name, "must be a file part (multipart/form-data with a filename)")
                self.files[name] = value
            else:
                if not isinstance(value, str):
                    raise _invalid(name, "must be a text field, not a file")
                self.text[name] = value

    async def close(self) -> None:
        """Let go of the spooled uploads now rather than at garbage collection."""
        await self.form.close()

    def str_(self, name: str) -> str | None:
        return self.text.get(name)

    def int_(self, name: str) -> int | None:
        raw = self.text.get(name)
        if raw is None:
            return None
        try:
            return int(raw.strip())
        except ValueError:
            raise _invalid(name, f"must be an integer, got {raw[:40]!r}") from None

    def float_(self, name: str) -> float | None:
        raw = self.text.get(name)
        if raw is None:
            return None
        try:
            value = float(raw.strip())
        except ValueError:
            raise _invalid(name, f"must be a number, got {raw[:40]!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise _invalid(name, "must be a finite number")
        return value


def lora_field(raw: str | None) -> list[tuple[str, float]]:
    """The `lora` form field: a JSON list of {"name": ..., "scale": ...} (scale optional, 1.0)."""
    if raw is None or not raw.strip():
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        raise _invalid("lora", 'must be a JSON list such as [{"name": "style", "scale": 0.8}]') from None
    if not isinstance(items, list):
        raise _invalid("lora", "must be a JSON list of {name, scale} objects")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "scale"}:
            raise _invalid("lora", 'each entry must be an object {"name": string, "scale": number}')
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise _invalid("lora", f"{item['name'][:60]!r}: scale must be a number")
        try:
            out.append((item["name"], float(scale)))
        except OverflowError:  # an integer of hundreds of digits
            raise _invalid("lora", f"{item['name'][:60]!r}: scale must be a finite number") from None
    return out


def decode_image(name: str, data: bytes, max_pixels: int, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """A file part as a loaded PIL image, or a 400/413 naming the part."""
    if not data:
        raise _invalid(name, "is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _invalid(name, f"has more than {max_pixels} pixels", status=413, code="image_too_large") from None
    except Exception:
        raise _invalid(name, f"is not an image (expected {', '.join(formats)})", code="invalid_image") from None
    if img.format not in formats:
        raise _invalid(name, f"is {img.format}; expected {', '.join(formats)}", code="invalid_image_format")
    w, h = img.size
    if w * h > max_pixels:
        raise _invalid(name, f"is {w}x{h} = {w * h} pixels; the limit is {max_pixels} (SYNERDIFF_MAX_UPLOAD_PIXELS)", status=413, code="image_too_large")
    try:
        img.load()
    except Exception:
        raise _invalid(name, f"is a {img.format} file that could not be decoded (truncated or corrupt)", code="invalid_image") from None
    return img


def repaint_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
    """OpenAI's mask (transparent = repaint) as diffusers' mask (white = repaint)."""
    if mask.size != image.size:
        raise _invalid("mask", f"is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; they must match", code="mask_size_mismatch")
    if mask.mode not in ("RGBA", "LA", "PA") and not (mask.mode == "P" and "transparency" in mask.info):
        raise _invalid(
            "mask", f"has mode {mask.mode} without an alpha channel; the fully transparent pixels of an RGBA PNG mark what to repaint", code="invalid_mask"
        )
    try:
        alpha = mask.convert("RGBA").getchannel("A")
    except (ValueError, OSError):
        raise _invalid("mask", f"has mode {mask.mode}, whose alpha cannot be read", code="invalid_mask") from None
    return alpha.point(lambda a: 255 if a == 0 else 0)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        raise _invalid("image", f"has mode {image.mode}, which cannot be read as RGB", code="invalid_image") from None


def _choice(form: EditForm, name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = form.str_(name)
    if value is None:
        return default
    if value not in allowed:
        raise _invalid(name, f"must be one of {', '.join(allowed)}, got {value[:40]!r}")
    return value


async def build_edit(form: EditForm, state: AppState) -> GenerationRequest:
    settings = state.settings
    engine = state.engine
    prompt = form.str_("prompt")
    if prompt is None:
        raise _invalid("prompt", "is required")
    if "image" not in form.files:
        raise _invalid("image", "is required (a PNG, JPEG or WebP file part)")
    if _choice(form, "response_format", ("b64_json", "url"), "b64_json") == "url":
        raise APIError(400, "response_format 'url' is not supported; use 'b64_json'", param="response_format", code="unsupported_value")
    if _choice(form, "output_format", ("png", "webp", "jpeg"), None) not in (None, "png"):
        raise APIError(400, "output_format: only 'png' is produced", param="output_format", code="unsupported_value")
    if _choice(form, "background", ("auto", "opaque", "transparent"), None) == "transparent":
        raise APIError(400, "background 'transparent' is not supported", param="background", code="unsupported_value")
    model = form.str_("model")
    if model is not None and model != settings.served_model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {settings.served_model_name!r}", param="model", code="model_not_found")
    data = await form.files["image"].read()
    image = await asyncio.to_thread(decode_image, "image", data, settings.max_upload_pixels)
    mask = None
    if "mask" in form.files:
        raw = await form.files["mask"].read()
        mask = repaint_mask(await asyncio.to_thread(decode_image, "mask", raw, settings.max_upload_pixels, ("PNG",)), image)
    size = form.str_("size")
    if size is None or size == "auto":
        # The picture's own size, down to the sizes the model takes (diffusers' image processor rounds the same way).
        multiple = max(engine.limits.size_multiple, engine.model.size_multiple)
        width, height = (image.size[0] // multiple) * multiple, (image.size[1] // multiple) * multiple
    else:
        try:
            w, h = size.split("x")
            width, height = int(w), int(h)
        except ValueError:
            raise _invalid("size", f"must be WIDTHxHEIGHT or auto, got {size[:40]!r}") from None
    n = form.int_("n")
    steps = form.int_("num_inference_steps")
    guidance = form.float_("guidance_scale")
    strength = form.float_("strength")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise _invalid("strength", f"must be between 0 and 1, got {strength}")
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=form.str_("negative_prompt") or "",
        n=n if n is not None else 1,
        height=height,
        width=width,
        steps=steps if steps is not None else engine.default_steps(),
        guidance_scale=guidance,  # None: the engine's default
        seed=form.int_("seed"),
        sampler=_choice(form, "sampler", SAMPLER_NAMES, None),
        cfg_skip="never" if _choice(form, "cfg_skip", ("auto", "never"), "auto") == "never" else "auto",
        image=_rgb(image),
        mask=mask,
        strength=strength if strength is not None else 0.8,
        lora=lora_field(form.str_("lora")),
    )


async def _read_form(request: Request) -> EditForm:
    ctype = request.headers.get("content-type", "")
    # A form without files comes urlencoded: parsed too, so its missing image is named.
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise APIError(415, f"content-type must be multipart/form-data, got {ctype[:60]!r}", param="body", code="unsupported_media_type")
    try:
        form = await request.form(max_files=4, max_fields=64)
    except Exception as exc:  # a malformed body: its parser's words name the problem
        raise APIError(400, f"the multipart body could not be parsed: {exc}", param="body", code="invalid_multipart") from None
    try:
        return EditForm(form)
    except APIError:
        await form.close()
        raise


def _form_schema() -> dict[str, Any]:
    text = {"type": "string"}
    props: dict[str, Any] = {name: text for name in sorted(_TEXT_FIELDS)}
    props["n"] = {"type": "integer", "minimum": 1}
    props["num_inference_steps"] = {"type": "integer", "minimum": 1}
    props["seed"] = {"type": "integer", "minimum": 0}
    props["guidance_scale"] = {"type": "number", "minimum": 0}
    props["strength"] = {"type": "number", "minimum": 0, "maximum": 1, "default": 0.8}
    props["sampler"] = {"type": "string", "enum": list(SAMPLER_NAMES)}
    props["image"] = {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"}
    props["lora"] = {"type": "string", "description": 'JSON list of LoRA adapters, e.g. [{"name": "style", "scale": 0.8}]'}
    props["mask"] = {"type": "string", "format": "binary", "description": "PNG with alpha: fully transparent pixels are repainted"}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"], "properties": props}}},
        }
    }


@router.post(
    EDITS_PATH,
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    openapi_extra=_form_schema(),
    responses={
        200: {
            "description": "The images (JSON), or with `stream` = `true` a `text/event-stream` of `progress`, `image` (`image_edit.completed`), `done` and `error` events.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
    summary="Edit an image (OpenAI-compatible multipart): image-to-image, or repaint a mask's transparent pixels",
)
async def edit(request: Request) -> Response:
    state: AppState = request.app.state.synerdiff
    started = time.monotonic()
    try:
        check_available(state)
        form = await _read_form(request)
        try:
            stream = _choice(form, "stream", ("true", "false"), "false") == "true"  # before the uploads are decoded
            greq = await build_edit(form, state)
        finally:
            await form.close()
        handle = await submit(state, greq)
    except APIError as err:
        raise refused(state, err) from None
    if stream:
        return stream_response(request, state, greq, handle, started, completed="image_edit.completed")
    return await json_response(request, state, greq, handle, started)
