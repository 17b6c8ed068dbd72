"""The one interface through which ovd uses any CLIP model (open_clip).

Three ways to load, same object afterwards:
  (a) an open_clip model name + pretrained tag, e.g. ``ViT-B-32`` / ``openai`` (from the local hub
      cache first; downloaded only when ``allow_download`` and the network allow it);
  (b) an open_clip model name + a local checkpoint file (``.safetensors``, ``.pt``, ``.bin``);
  (c) an open_clip ``local-dir:`` folder (``open_clip_config.json`` + weights), which is how the
      mini-world's tiny CLIP is saved — a custom config going through the same open_clip code.

Everything downstream (adapter, miner, feature cache, detector) sees only :class:`ClipModel`:
unit-norm image embeddings of box crops and unit-norm text embeddings of class names, with the
embedding dimension taken from the model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.ops import roi_align

from ovd.errors import OvdError, describe
from ovd.utils.io import atomic_dir, atomic_path
from ovd.utils.safe_load import check_nonempty, read_safetensors
from ovd.vlm.adapter_file import apply_adapter, layernorm_parameters, text_layernorm_parameters

# EZSD/ViLD prompt. Ensembles can be passed per call; the default keeps the paper's single prompt.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# clip.precision: the image tower's autocast dtype when embedding crops. bf16 halves the tiny CLIP's
# forward time on a CPU with AVX512-BF16 (docs/benchmarks.md, bench speed); embeddings come back as float32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
CROP_ENLARGE = 1.2  # EZSD: GT boxes enlarged 1.2x before cropping, to include a little context


def fill_template(template: str, name: str) -> str:
    """Insert a class name; "a {}" becomes "an {}" before a vowel, as in natural captions."""
    text = template.format(name)
    if name[:1].lower() in "aeiou":
        text = re.sub(rf"\b([aA]) {re.escape(name)}", rf"\1n {name}", text)
    return text


def default_text_clean():
    """open_clip's text cleaning for its CLIP tokenizer (``SimpleTokenizer(clean="lower")``): ftfy
    fix, HTML unescape, whitespace collapsed, lower-cased."""
    from open_clip.tokenizer import get_clean_fn

    return get_clean_fn("lower")


def tokenizer_clean(tokenizer):
    """The cleaning function ``tokenizer`` applies to text before tokenizing (open_clip tokenizers
    expose it as ``clean_fn``); open_clip's default for tokenizers that do not say."""
    fn = getattr(tokenizer, "clean_fn", None)
    return fn if callable(fn) else default_text_clean()


def vocabulary_clash(names: Sequence[str], clean=None) -> tuple[str, str, str] | None:
    """The first two class names the tokenizer reads as one text — (first, second, what it reads) —
    or None. "red square" and "Red  Square" are one name to CLIP: one embedding for two classes."""
    return _clash(tuple(names), clean or default_text_clean())


@functools.lru_cache(maxsize=16)  # predict(image, classes=...) per image: LVIS's 1203 names cost ~20 ms
def _clash(names: tuple[str, ...], clean) -> tuple[str, str, str] | None:
    seen: dict[str, str] = {}
    for n in names:
        key = clean(n)
        if key in seen:
            return seen[key], n, key
        seen[key] = n
    return None


def describe_clash(clash: tuple[str, str, str]) -> str:
    a, b, key = clash
    if a == b:
        return a
    return f"'{a}' and '{b}' are one name to the CLIP tokenizer (it reads both as '{key}')"


def check_tokens(tokenizer, names: list[str], templates: list[str], texts: list[str], tokens: torch.Tensor) -> None:
    """Refuse what the text tower would silently get wrong: a prompt longer than its context (the
    tokenizer cuts it, so two names differing only after the cut get one embedding) and two names
    whose prompts tokenize identically. ``texts`` / ``tokens``: every name with every template,
    name-major, as :meth:`ClipModel.encode_text` builds them."""
    ctx = int(tokens.shape[1])
    try:  # one position more: a prompt that fits gives the same tokens plus padding
        longer = tokenizer(texts, context_length=ctx + 1)
    except TypeError:  # a tokenizer without a context_length argument: the identity check only
        longer = None
    if longer is not None:
        cut = (longer[:, :ctx] != tokens).any(dim=1).nonzero().flatten().tolist()
        if cut:
            i = cut[0]
            name, template = names[i // len(templates)], templates[i % len(templates)]
            raise OvdError(
                f"class name '{name}' is longer than the text tower reads: the prompt {texts[i]!r} "
                f"(template {template!r}) needs more than its {ctx} tokens, and the rest would be cut off; "
                f"shorten the name"
            )
    rows = tokens.view(len(names), len(templates) * ctx)
    seen: dict[tuple, str] = {}
    for name, row in zip(names, rows.tolist()):
        other = seen.setdefault(tuple(row), name)
        if other != name:
            raise OvdError(
                f"duplicate class name(s) in vocabulary: '{other}' and '{name}' are identical as the CLIP "
                f"tokenizer sees them (same tokens with every template)"
            )


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Force the hub client into cache-only mode (it reads this flag at call time)."""
    try:
        import huggingface_hub.constants as hc
    except ImportError:  # pragma: no cover - open_clip depends on it
        yield
        return
    old = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = old or offline
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old


def _weights_files(model: str, pretrained: str | None) -> list[Path]:
    """The weights file(s) a CLIP is loaded from; [] for a pretrained tag or random init."""
    if model.startswith("local-dir:"):
        return sorted(
            p for p in Path(model[len("local-dir:") :]).iterdir() if p.suffix in (".safetensors", ".bin", ".pth")
        )
    if pretrained and Path(pretrained).is_file():
        return [Path(pretrained)]
    return []


# sha256 of a weights file by (resolved path, size, mtime): hashing ViT-B/32 (600 MB) once per process
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """Content hash of a file, cached by (path, size, mtime) so repeated fingerprints stay cheap."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def _short_error(e: Exception) -> str:
    """One line from a loader error: the headline plus its first detail (e.g. the first mismatched key)."""
    text = describe(e, 300, lines=2)
    if "TorchScript" in text:
        text += " (a TorchScript archive: save its state_dict() to a .safetensors file and pass that)"
    return text


@contextlib.contextmanager
def _quiet_logging():
    """open_clip logs an ERROR for a cache miss we handle ourselves; keep the console clean."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def autocast_dtype(precision: str, key: str) -> torch.dtype | None:
    """The autocast dtype a ``precision`` setting names (None: plain float32)."""
    if precision not in PRECISIONS:
        raise OvdError(f"{key}: unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    return PRECISIONS[precision]


def crop_boxes_square(boxes: torch.Tensor, enlarge: float = CROP_ENLARGE) -> torch.Tensor:
    """EZSD crop geometry: enlarge a box about its centre, then grow the short side to a square.

    ``boxes``: (N, 4) xyxy. Returns (N, 4) xyxy squares of side ``enlarge * max(w, h)``; parts
    outside the image are padded when sampled (see :meth:`ClipModel.crop`).
    """
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * enlarge
    half = side / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


class CropSampler:
    """EZSD crops at a CLIP's input size and normalisation, without the model: small and picklable,
    so loader workers (mining, extraction) cut crops while the main process runs the CLIP forward."""

    def __init__(self, image_size: int, mean: torch.Tensor, std: torch.Tensor):
        self.image_size, self.mean, self.std = int(image_size), mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(…, 3, H, W) floats in [0, 1] → CLIP-normalised."""
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, enlarge: float = CROP_ENLARGE) -> torch.Tensor:
        """EZSD crops of ``boxes`` (N, 4 xyxy, pixels) from ``image`` (3, H, W, [0, 1]) → (N, 3, S, S).

        One ``roi_align`` call samples every square crop at the model's input size: vectorised,
        bilinear, and averaging over several samples per output pixel when shrinking (adaptive
        ``sampling_ratio``), i.e. an anti-aliased resize. Sampling happens on the normalised image,
        so the zero padding outside the image is the CLIP mean colour.
        """
        if boxes.numel() == 0:
            return image.new_zeros((0, 3, self.image_size, self.image_size))
        sq = crop_boxes_square(boxes.to(torch.float32), enlarge) + 1.0  # +1: the padding ring below
        rois = torch.cat([sq.new_zeros((len(sq), 1)), sq], dim=1)
        # roi_align clamps samples within one pixel outside the image to the edge pixel; a ring of
        # zeros (= the mean colour once normalised) makes all outside samples padding.
        norm = F.pad(self.normalize(image.to(torch.float32)), (1, 1, 1, 1))[None]
        return roi_align(norm, rois, output_size=self.image_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _resolve_spec(model: str, pretrained: str | None) -> tuple[str, str | None, str]:
    """(model, pretrained, source) of a model name / folder and weights, checked before any loading:
    a folder becomes ``local-dir:``; unknown names, missing folders and unknown tags are errors."""
    import open_clip

    if not model.startswith(("local-dir:", "hf-hub:")) and Path(model).is_dir():
        model = f"local-dir:{model}"
    elif not model.startswith(("local-dir:", "hf-hub:")) and ("/" in model or os.sep in model):
        raise OvdError(
            f"CLIP model folder not found: {model} (expected an open_clip local-dir folder with "
            f"open_clip_config.json and weights; model names have no '/')"
        )
    source = model if model.startswith("local-dir:") else f"{model}/{pretrained or 'random-init'}"
    if model.startswith("local-dir:"):
        _check_local_dir(Path(model[len("local-dir:") :]))
        return model, None, source
    if model not in open_clip.list_models():
        raise OvdError(
            f"unknown open_clip model '{model}' (e.g. ViT-B-32, ViT-B-16, RN50; see open_clip.list_models())"
        )
    if pretrained and not Path(pretrained).is_file():
        looks_like_file = os.path.sep in pretrained or Path(pretrained).suffix in (
            ".pt",
            ".pth",
            ".bin",
            ".safetensors",
        )
        tags = open_clip.list_pretrained_tags_by_model(model)
        if looks_like_file or pretrained not in tags:
            raise OvdError(
                f"CLIP weights '{pretrained}' for {model}: no such file, and not a known pretrained tag "
                f"({', '.join(tags) or 'none'})"
            )
    return model, pretrained, source


def _check_local_dir(folder: Path) -> None:
    if not folder.is_dir():
        raise OvdError(
            f"CLIP model folder not found: {folder} (expected an open_clip local-dir folder with "
            f"open_clip_config.json and weights)"
        )
    if not (folder / "open_clip_config.json").is_file():
        raise OvdError(f"CLIP folder {folder} has no open_clip_config.json (expected an open_clip local-dir model)")
    if not any(any(folder.glob(pat)) for pat in ("*.safetensors", "*.bin", "*.pth")):
        raise OvdError(f"CLIP folder {folder} has no weights file (*.safetensors, *.bin or *.pth)")


def _create_model(model: str, pretrained: str | None, device, allow_download: bool, source: str):
    """open_clip's model (weights_only loading): the local hub cache first, a download only when
    allowed; every failure is one OvdError. Returns (model, whether QuickGELU was forced)."""
    import open_clip

    kwargs = {"device": device, "weights_only": True}
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained and not Path(pretrained).is_file() else {}
    if tag_cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True  # OpenAI's weights were trained with QuickGELU
    offline_hint = f"Give a local checkpoint file instead, e.g. clip.pretrained=weights/{model}.safetensors"
    try:
        with _hub_offline(True), _quiet_logging():  # the local hub cache first: no network, no retries
            try:
                return open_clip.create_model(model, pretrained=pretrained, **kwargs), "force_quick_gelu" in kwargs
            except RuntimeError as e:
                if not (pretrained and not Path(pretrained).is_file() and "download" in str(e).lower()):
                    raise
        if not allow_download:
            raise OvdError(
                f"CLIP weights {model}/{pretrained} are not in the local cache and downloads are off "
                f"(offline). {offline_hint}"
            )
        try:
            return open_clip.create_model(model, pretrained=pretrained, **kwargs), "force_quick_gelu" in kwargs
        except RuntimeError as e:
            raise OvdError(
                f"could not download CLIP weights {model}/{pretrained} (offline?): {_short_error(e)}. {offline_hint}"
            ) from None
    except OvdError:
        raise
    except Exception as e:  # corrupt files and architecture mismatches surface as many error types
        raise OvdError(f"could not load CLIP {source}: {_short_error(e)}") from None


class ClipModel:
    """open_clip CLIP + tokenizer + preprocessing, with batched crop/text encoders."""

    def __init__(self, model: torch.nn.Module, tokenizer, image_size: int, mean, std, name: str, source: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.name = name
        self.source = source
        self.adapter: str | None = None  # set by ovd.vlm.adapter_file.apply_adapter (its file), if any
        self.adapter_text = False  # ... and whether that file adapted the text tower too
        self.weights_files: list[Path] = []  # the files the weights came from (set by load)
        self.config_text = ""  # the model's open_clip config, canonical JSON (set by load)
        self._text_cache: dict[tuple, torch.Tensor] = {}
        # bounded (least recently used dropped): a server prompted with ever-new vocabularies must not grow
        self.text_cache_size = 64
        self.text_tower_calls = 0  # vocabularies embedded by the text tower (cache misses)
        self.image_autocast: torch.dtype | None = None  # clip.precision (set by clip_from_config)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        allow_download: bool | None = None,
    ) -> ClipModel:
        """Load (a) name + tag, (b) name + local checkpoint file, or (c) a ``local-dir:`` folder.

        ``model`` may also be a plain folder path holding ``open_clip_config.json``.
        ``allow_download=None`` allows it unless ``HF_HUB_OFFLINE`` is set.
        """
        import open_clip

        if allow_download is None:
            allow_download = os.environ.get("HF_HUB_OFFLINE", "") in ("", "0", "false", "False")
        model, pretrained, source = _resolve_spec(model, pretrained)
        for f in _weights_files(model, pretrained):
            try:
                check_nonempty(f, "weights file")
            except OvdError as e:
                raise OvdError(f"could not load CLIP {source}: {e}") from None
        net, quick_gelu = _create_model(model, pretrained, device, allow_download, source)
        tokenizer = open_clip.get_tokenizer(model)
        pp = getattr(net.visual, "preprocess_cfg", {}) or {}
        size = net.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pp.get("std", open_clip.OPENAI_DATASET_STD)
        clip = cls(net, tokenizer, size, mean, std, name=model, source=source)
        clip.weights_files = _weights_files(model, pretrained)
        if model.startswith("local-dir:"):
            cfg = json.loads((Path(model[len("local-dir:") :]) / "open_clip_config.json").read_text())
        else:
            cfg = {"model": model, "config": open_clip.get_model_config(model), "tag": None}
            if not clip.weights_files:  # a pretrained tag names fixed weights; "" = random init
                cfg["tag"] = pretrained or None
        cfg["quick_gelu"] = quick_gelu
        clip.config_text = json.dumps(cfg, sort_keys=True)
        return clip

    # -- properties -------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """Identifies what the model computes, for caches keyed by model: its open_clip config plus
        the *content* of its weights files (or the pretrained tag), plus the adapted LayerNorm
        parameters when an adapter is applied. No path enters it, so a copied or moved work_dir
        keeps its feature cache valid; new weights at the same path are a different CLIP."""
        h = hashlib.sha1(f"{self.config_text}|{self.embed_dim}".encode())
        if self.weights_files:
            for p in self.weights_files:
                h.update(f"|{p.name}:{file_digest(p)}".encode())
        elif "random-init" in self.source:  # random init (tests): the weights themselves
            h.update(_tensors_digest(self.model.state_dict()).encode())
        if self.adapter is not None:
            h.update(f"|adapter:{_tensors_digest(layernorm_parameters(self.model))}".encode())
            if self.adapter_text:  # the text tower adapted too (adapter.text_tower)
                h.update(f"|text_adapter:{_tensors_digest(text_layernorm_parameters(self.model))}".encode())
        if self.image_autocast is not None:  # other embeddings (to ~3 digits): another cache
            h.update(f"|image_autocast:{self.image_autocast}".encode())
        return h.hexdigest()[:16]

    def check_dim(self, dim: int, what: str) -> None:
        if int(dim) != self.embed_dim:
            raise OvdError(
                f"{what} has embedding dimension {dim}, but the CLIP model {self.source} has {self.embed_dim}: "
                f"it was made with a different CLIP"
            )

    # -- images -----------------------------------------------------------------------------------
    @property
    def cropper(self) -> CropSampler:
        """This model's crop geometry and normalisation, for loader workers (see :class:`CropSampler`)."""
        return CropSampler(self.image_size, self.mean, self.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(…, 3, H, W) floats in [0, 1] → CLIP-normalised."""
        return self.cropper.normalize(images)

    def crop(self, image: torch.Tensor, boxes: torch.Tensor, enlarge: float = CROP_ENLARGE) -> torch.Tensor:
        """EZSD crops of ``boxes`` (N, 4 xyxy, pixels) from ``image`` (3, H, W, [0, 1]) → (N, 3, S, S);
        see :class:`CropSampler`."""
        return self.cropper(image, boxes, enlarge)

    @torch.no_grad()
    def encode_normalized(self, crops: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Already-normalised (N, 3, S, S) crops → (N, D) unit embeddings."""
        dev = self.device
        with torch.autocast(dev.type, dtype=self.image_autocast or torch.float32, enabled=bool(self.image_autocast)):
            out = [
                F.normalize(self.model.encode_image(crops[i : i + batch_size].to(dev)).float(), dim=-1).cpu()
                for i in range(0, len(crops), batch_size)
            ]
        return torch.cat(out) if out else torch.zeros((0, self.embed_dim))

    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, 3, S, S) images in [0, 1] at the model's input size → (N, D) unit embeddings."""
        return self.encode_normalized(self.normalize(images), batch_size)

    def encode_boxes(self, image: torch.Tensor, boxes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Embeddings of EZSD crops of ``boxes`` in one image."""
        return self.encode_normalized(self.crop(image, boxes), batch_size)

    # -- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(C, D) unit embeddings of class names: mean over prompt templates, then L2-normalised.

        Cached per (vocabulary, templates): the last :attr:`text_cache_size` vocabularies used.
        """
        names = list(names)
        if not names:
            raise OvdError("empty class vocabulary: give at least one class name")
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise OvdError(f"class names must be non-empty strings, got {bad[:5]}")
        clash = vocabulary_clash(names, tokenizer_clean(self.tokenizer))
        if clash:
            raise OvdError(f"duplicate class name(s) in vocabulary: {describe_clash(clash)}")
        key = (tuple(names), tuple(templates))
        if key in self._text_cache:
            self._text_cache[key] = self._text_cache.pop(key)  # most recently used last
        else:
            self.text_tower_calls += 1
            texts = [fill_template(t, n) for n in names for t in templates]
            tokens = self.tokenizer(texts)
            check_tokens(self.tokenizer, names, list(templates), texts, tokens)
            tokens = tokens.to(self.device)
            emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
            emb = emb.view(len(names), len(templates), -1).mean(dim=1)
            self._text_cache[key] = F.normalize(emb, dim=-1)
            while len(self._text_cache) > max(1, self.text_cache_size):
                self._text_cache.pop(next(iter(self._text_cache)))
        return self._text_cache[key]

    def clear_text_cache(self) -> None:
        self._text_cache.clear()


def save_local_dir(
    net: torch.nn.Module, folder: str | os.PathLike, model_cfg: dict, image_size: int, mean, std
) -> Path:
    """Save an open_clip CLIP as a ``local-dir:`` folder (config JSON + safetensors).

    The folder is replaced as a whole (built beside it, then renamed): weights and config always
    belong together, whatever kills the writer, and files of an earlier save do not survive."""
    folder = Path(folder)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"size": image_size, "mean": list(mean), "std": list(std)}}
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def native_cpu_bf16() -> bool:
    """Does this CPU compute bf16 natively (oneDNN's own check: AVX512-BF16 or AMX)?"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 path either
        return False


def clip_from_config(c, adapter: str | os.PathLike | None = None) -> ClipModel:
    """Build the CLIP named by a config's ``clip`` section, with an optional adapter file applied."""
    clip = ClipModel.load(c.model, c.pretrained or None, device=c.device, allow_download=c.allow_download)
    clip.image_autocast = autocast_dtype(c.precision, "clip.precision")
    if clip.image_autocast == torch.bfloat16 and str(c.device).startswith("cpu") and not native_cpu_bf16():
        warnings.warn(
            "clip.precision=bf16 on a CPU without native bf16 (no AVX512-BF16 / AMX): emulated bf16 is "
            "slower than fp32 here (~7x measured on an AVX2 CPU); set clip.precision=fp32",
            stacklevel=2,
        )
    if adapter:
        apply_adapter(clip, adapter)
    return clip


TEXT_FORMAT = "ovd-text-embeddings/1"


def save_text_embeddings(path: str | os.PathLike, clip: ClipModel, names: Sequence[str], templates=DEFAULT_TEMPLATES):
    """Store a vocabulary's text embeddings (safetensors + names, templates, CLIP, dim) atomically,
    so a detector can be prompted with it later without the text tower."""
    return write_text_embeddings(path, clip.encode_text(names, templates), names, clip.source, templates)


def write_text_embeddings(
    path: str | os.PathLike,
    emb: torch.Tensor,
    names: Sequence[str],
    source: str,
    templates=DEFAULT_TEMPLATES,
    fingerprint: str | None = None,
) -> Path:
    """Write (C, D) embeddings of ``names`` in the stored-vocabulary format (atomically).
    ``fingerprint``: the CLIP's :meth:`ClipModel.fingerprint` (recorded as ``clip_fingerprint``, so a
    detector can refuse a vocabulary made with another CLIP of the same dimension)."""
    names = list(names)
    if emb.ndim != 2 or emb.shape[0] != len(names) or len(set(names)) != len(names):
        raise OvdError(f"text embeddings: need one row per distinct class name ({emb.shape} for {len(names)} names)")
    clash = vocabulary_clash(names)
    if clash:
        raise OvdError(f"text embeddings: duplicate class names: {describe_clash(clash)}")
    meta = {
        "format": TEXT_FORMAT,
        "names": json.dumps(names),
        "templates": json.dumps(list(templates)),
        "clip_source": source,
        "embed_dim": str(emb.shape[1]),
    }
    if fingerprint:
        meta["clip_fingerprint"] = str(fingerprint)
    emb = emb.detach().float().cpu().contiguous()
    if not bool(torch.isfinite(emb).all()):
        raise OvdError("text embeddings: non-finite values (NaN or infinity); nothing written")
    meta["embeddings_sha256"] = _embeddings_digest(emb)
    with atomic_path(path) as tmp:
        save_file({"embeddings": emb}, str(tmp), metadata=meta)
    return Path(path)


def _embeddings_digest(emb: torch.Tensor) -> str:
    """SHA-256 of the float32 embedding bytes (row-major): a stored vocabulary's content hash."""
    return hashlib.sha256(emb.float().contiguous().numpy().tobytes()).hexdigest()


UNIT_TOL = 1e-3  # a stored row's norm may differ from 1 by float32 rounding of the mean over templates, not more


def load_text_embeddings(path: str | os.PathLike, embed_dim: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Read stored text embeddings → (C, D) tensor and the class names; checks the dimension."""
    tensors, meta = read_safetensors(path, "text embeddings file", TEXT_FORMAT)
    damaged = f"damaged vocabulary file {path}:"
    if "embeddings" not in tensors:
        raise OvdError(f"{damaged} no 'embeddings' tensor")
    emb = tensors["embeddings"]
    try:
        names = json.loads(meta["names"])
    except KeyError:
        raise OvdError(f"{damaged} no 'names' metadata (the class name of each row)") from None
    except json.JSONDecodeError as e:
        raise OvdError(f"{damaged} its 'names' metadata is not JSON ({e.msg})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise OvdError(f"{damaged} its 'names' metadata must be a JSON list of non-empty class names")
    if emb.ndim != 2 or emb.shape[0] != len(names) or emb.dtype != torch.float32:
        raise OvdError(f"{damaged} {tuple(emb.shape)} {emb.dtype} embeddings for {len(names)} class names "
                       f"(expected one float32 row per name)")  # fmt: skip
    stored = meta.get("embeddings_sha256")  # files written before it was recorded have none
    if stored is not None and stored != _embeddings_digest(emb):
        raise OvdError(f"{damaged} its embeddings do not match their stored content hash (changed after writing)")
    if embed_dim is not None and emb.shape[1] != embed_dim:
        raise OvdError(
            f"text embeddings {path} are {emb.shape[1]}-d (made with {meta.get('clip_source')}), "
            f"but the model expects {embed_dim}-d: they were made with a different CLIP"
        )
    if not bool(torch.isfinite(emb).all()):
        bad = int((~torch.isfinite(emb)).any(dim=1).nonzero()[0])
        raise OvdError(f"{damaged} non-finite values (NaN or infinity) in the row of '{names[bad]}'")
    off = ((emb.norm(dim=1) - 1).abs() > UNIT_TOL).nonzero().flatten()
    if len(off):
        bad = int(off[0])
        raise OvdError(f"{damaged} the row of '{names[bad]}' has norm {float(emb[bad].norm()):.4g}, expected "
                       f"unit text embeddings ({len(off)} such rows)")  # fmt: skip
    return emb, names
