"""Request inputs: images, prompts, generation arguments, the model's own processor and chat template."""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import InputError, ModelLoadError


def load_image(image) -> Image.Image | None:
    """Accept a path, a PIL image or None; return an RGB PIL image (or None), or raise InputError."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        _check_pixels(image.size, "the given PIL image")
        try:
            image.load()  # a closed image raises here ("Operation on closed image")
            return image.convert("RGB") if image.mode != "RGB" else image
        except (ValueError, OSError, AttributeError) as exc:
            raise InputError(f"the given PIL image cannot be read ({exc}); was it closed? pass an open image") from None
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"image must be a file path, a PIL.Image or None, got {type(image).__name__}")
    text = os.fspath(image)
    if isinstance(text, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise InputError(f"image {text!r} is a URL; URLs are not fetched: download the image and pass its path")
    path = Path(image)
    if path.is_dir():
        raise InputError(f"image {str(path)!r} is a directory, not an image file")
    if not path.is_file():
        raise InputError(f"image file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; a server should refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img.size, str(path))
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(_too_many_pixels(str(path), None)) from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {str(path)!r}: it is not an image file PIL recognises") from None
    except OSError as exc:
        raise InputError(f"cannot read image {str(path)!r}: the file is truncated or corrupt ({exc})") from None


def _check_pixels(size, what: str) -> None:
    if size[0] < 1 or size[1] < 1:
        raise InputError(f"image {what} has no pixels ({size[0]}x{size[1]})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise InputError(_too_many_pixels(what, size))


def _too_many_pixels(what: str, size) -> str:
    dims = f" ({size[0]}x{size[1]} = {size[0] * size[1]} pixels)" if size else ""
    return (
        f"image {what}{dims} is over PIL's pixel limit of {Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS); "
        "downscale it, or raise that limit if you trust the source"
    )


def load_processor(model_dir: Path):
    """The checkpoint's own processor; image-only when its video processor cannot be built.

    transformers' VL processors require a video processor, which needs torchvision. Image requests do
    not, so without torchvision we build the same processor class around the image processor and
    tokenizer the checkpoint ships.
    """
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(str(model_dir))
        if hasattr(processor, "image_processor"):
            return processor
    except (OSError, ValueError, TypeError, AttributeError, ImportError, KeyError):
        pass
    config = _read_json(model_dir / "processor_config.json") or {}
    name = (config.get("processor_class") or (_read_json(model_dir / "tokenizer_config.json") or {}).get("processor_class")
            or _processor_class_for_model_type(model_dir))
    processor_cls = getattr(transformers, name, None) if name else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {model_dir}: {exc}") from None
    if processor_cls is None:
        return tokenizer  # text-only checkpoint
    image_processor = _load_image_processor(model_dir, config)
    kwargs = {k: v for k, v in config.items()
              if k not in ("processor_class", "image_processor", "video_processor", "tokenizer", "chat_template")}
    template = tokenizer.chat_template
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()
    return image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **kwargs
    )


def image_only_processor_class(processor_cls):
    """Subclass of a VL processor that takes no video processor.

    transformers' VL processors insist on a video processor, which needs torchvision; image-only use
    does not. ProcessorMixin reads the attribute list from the __init__ signature, so the subclass
    declares only the parts it has.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_cls.__init__(
            self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=chat_template, **kwargs,
        )

    return type(processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": __name__})


def _processor_class_for_model_type(model_dir: Path) -> str | None:
    """The processor class transformers' AutoProcessor maps config.json's model_type to, when the
    checkpoint saved its image processor and tokenizer separately (no processor_class anywhere)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = (_read_json(model_dir / "config.json") or {}).get("model_type")
    if not (model_dir / "preprocessor_config.json").is_file() and not (model_dir / "processor_config.json").is_file():
        return None  # no image processor saved: a text-only checkpoint
    name = PROCESSOR_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    return name if isinstance(name, str) else None


def _load_image_processor(model_dir: Path, processor_config: dict):
    import transformers
    from transformers.utils import is_torchvision_available

    try:
        from transformers import AutoImageProcessor

        # Without torchvision, ask for the PIL backend explicitly.
        backend = {} if is_torchvision_available() else {"backend": "pil"}
        return AutoImageProcessor.from_pretrained(str(model_dir), **backend)
    except ImportError:
        pass  # transformers 5.17 makes AutoImageProcessor itself require torchvision
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the image processor from {model_dir}: {exc}") from None
    nested = processor_config.get("image_processor") or _read_json(model_dir / "preprocessor_config.json") or {}
    name = nested.get("image_processor_type", "")
    for candidate in (name + "Pil", name.removesuffix("Fast") + "Pil", name):
        cls = getattr(transformers, candidate, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(str(model_dir))
        except ImportError:
            continue
    raise ModelLoadError(
        f"cannot build the image processor {name!r} of {model_dir} without torchvision; install torchvision"
    )


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


def check_prompt(prompt, placeholders=()) -> None:
    """A prompt is non-empty text that encodes as UTF-8 and holds none of the processor's placeholders."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"prompt must be a non-empty string, got {prompt!r}"[:200])
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"prompt is not valid Unicode text: {exc.reason} {prompt[exc.start:exc.end]!r} at "
                         f"character {exc.start}") from None
    for token in placeholders:
        if token in prompt:
            raise InputError(f"prompt contains the model's image placeholder {token!r}; remove it and pass the "
                             "image with image=")


# The processor's tensor work (rescale, normalize, patchify: 0.2 M values for a 256-px image) runs with one
# intra-op thread. Split over all of them, one late thread holds up each small op: on the H200 machine
# (16 threads) 2 of 30 (easy-VQA model) and 4 of 20 (bench model) processor calls in a row took 20-27 ms
# instead of 4, 6-7 ms in each of sub, div_ and reshape, and so did up to 7 of 8 requests of a planner
# validation row; with one thread 0 of 50 requests stalled, at a median cost of +0.5 ms
# (eval/profile_inputs.py; BENCHMARKS.md, "Input building").
INPUT_THREADS = 1


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count lowered to `n` inside the block (never raised), restored after."""
    import torch

    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_inputs(processor, image, prompt: str):
    """Render the chat template and run the processor (with INPUT_THREADS intra-op threads); returns a
    BatchFeature of tensors."""
    with intra_op_threads(INPUT_THREADS):
        return _build_inputs(processor, image, prompt)


def _build_inputs(processor, image, prompt: str):
    check_prompt(prompt)
    tokenizer = getattr(processor, "tokenizer", processor)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    if image is not None:
        if not hasattr(processor, "image_processor"):
            raise InputError("this model has no image processor: it takes text only; pass image=None")
        try:
            return processor(text=[text], images=[image], return_tensors="pt")
        except (ValueError, TypeError, ZeroDivisionError, IndexError) as exc:
            # e.g. an aspect ratio the image processor refuses (1x5000)
            raise InputError(f"image ({image.width}x{image.height}) cannot be prepared by the model's image "
                             f"processor: {exc}") from None
    if processor is tokenizer:
        return tokenizer([text], return_tensors="pt")
    return processor(text=[text], return_tensors="pt")


# -- generation arguments ----------------------------------------------------------------------------

def _is_int(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(low: float, high: float = float("inf"), low_open: bool = False):
    def check(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
            return False
        return (v > low if low_open else v >= low) and v <= high

    return check


_is_bool = lambda v: isinstance(v, bool)  # noqa: E731

# The generation arguments users pass most, with their types and ranges (transformers' own validation
# lets a string "no" through as a truthy do_sample, or divides by num_beams=0 while decoding).
GENERATION_RULES = {
    "do_sample": (_is_bool, "True or False"),
    "use_cache": (_is_bool, "True or False"),
    "early_stopping": (lambda v: isinstance(v, bool) or v == "never", "True, False or 'never'"),
    "num_beams": (_is_int(1), "an integer >= 1"),
    "top_k": (_is_int(0), "an integer >= 0"),
    "min_new_tokens": (_is_int(0), "an integer >= 0"),
    "min_length": (_is_int(0), "an integer >= 0"),
    "no_repeat_ngram_size": (_is_int(0), "an integer >= 0"),
    "num_return_sequences": (lambda v: v == 1 and not isinstance(v, bool), "1 (one answer per request)"),
    "return_dict_in_generate": (lambda v: v is False, "False (the engine returns a Result)"),
    "temperature": (_is_number(0.0, low_open=True), "a number > 0"),
    "top_p": (_is_number(0.0, 1.0, low_open=True), "a number in (0, 1]"),
    "min_p": (_is_number(0.0, 1.0), "a number in [0, 1]"),
    "typical_p": (_is_number(0.0, 1.0, low_open=True), "a number in (0, 1]"),
    "repetition_penalty": (_is_number(0.0, low_open=True), "a number > 0"),
    "length_penalty": (_is_number(float("-inf")), "a number"),
}


def generate_parameters(model) -> set[str]:
    """Keyword arguments of transformers' generate besides the GenerationConfig fields."""
    skip = {"self", "inputs", "generation_config", "kwargs", "args"}
    return {name for name in inspect.signature(model.generate).parameters if name not in skip}


def placeholder_tokens(processor, tokenizer, image_token_id) -> list[str]:
    """The image/video placeholder strings the processor expands; a prompt holding one would desynchronise
    the processor's expansion and the vision features."""
    names = {getattr(processor, attr, None) for attr in ("image_token", "video_token")}
    if image_token_id is not None:
        names.add(tokenizer.convert_ids_to_tokens(int(image_token_id)))
    return sorted(n for n in names if isinstance(n, str) and n)
