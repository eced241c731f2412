"""SimV0Model: projected video features and telemetry as a short prefix into a frozen LLM.

    vis_feats [B,F,dv] --segment mean--> [B,K,dv] --vis_proj--> V [B,K,d]
    telemetry [B,8] --normalize--> tel_mlp --> T [B,1,d]
    X = [V_1..V_K, T, Q]  (K+2 tokens) --frozen LLM (base transformer)--> h = hidden state at Q
    h --> heads: risk (4), reason (4), action (6), confidence (1)

Only vis_proj, tel_mlp, query and heads train. The LLM (and a vision encoder, for raw frames) is
frozen, kept in eval mode, and still lets gradients flow through it to the prefix.

`variant` (sim.models.variants.ModelVariant, the `model.pooling`, `model.readout`, `model.loss_weighting`
and `model.adaptation` options) swaps the segment mean, the readout at Q, the fixed loss weights or the
frozen LLM for the alternatives in pooling.py, readout.py, loss_weighting.py and lora.py; its default
is v0, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from sim.core import labels as L
from sim.core.errors import ConfigError
from sim.core.precision import Precision, dtype_name, named_precision
from sim.models.inference import decisions, model_input
from sim.models.last_row import last_row_only
from sim.models.llm import (
    FAST_KERNELS,
    build_llm,
    checkpointed_layers,
    describe,
    enable_gradient_checkpointing,
    hidden_size,
)
from sim.models.lora import inject_lora, is_lora_param, keep_lora_fp32, lora_dropouts
from sim.models.loss_weighting import build_loss_weighting
from sim.models.pooling import build_pooling, segment_mean_matrix
from sim.models.readout import head_states, init_query
from sim.models.serialization import (
    TRAINABLE_MODULES,
    check_state_dict,
    from_metadata,
    is_trainable_key,
    load,
    model_metadata,
    precision_code,
    precision_from_code,
)
from sim.models.variants import ModelVariant

log = logging.getLogger(__name__)

FROZEN_MODULES = ("llm", "vision")
# The precision travels with the weights as the model's extra state (`get_extra_state`): a
# `load_state_dict(checkpoint["model_state_dict"])` computes as training and validation did.


def freeze(module: nn.Module | None) -> None:
    """Freeze a backbone: no gradients for its weights, and eval mode (no dropout) for good."""
    if module is None:
        return
    module.requires_grad_(False)
    module.eval()


class SimV0Model(nn.Module):
    """The SIM v0 model.

    Args:
        llm_name_or_path: hub id or local directory of the LLM (used when `llm` is not given).
        dv: per-frame feature width; inferred from the vision encoder when there is one. A typed
            value that disagrees with the encoder is an error.
        d: LLM embedding width; always read from the LLM. A typed value that disagrees is an error.
        F: frames per sample. K: visual tokens (segment means of the F frames), 1 <= K <= F.
        use_cached_vis_feats: True reads `vis_feats [B,F,dv]`; False reads `frames [B,F,3,H,W]`
            through `vision_encoder`.
        llm: a built LLM module, or a spec dict for `sim.models.llm.build_llm` (as stored in checkpoints).
        llm_pretrained, llm_dtype: how `llm_name_or_path` is loaded. fp32 by default: it loses nothing, and
            loading a checkpoint's `model_state_dict` casts the weights to the precision it was trained in.
        vision_encoder: a frozen encoder with attribute `dv` (raw frames only).
        telemetry_hidden, head_hidden: the hidden widths of the telemetry MLP and of each head (0: linear heads).
        telemetry_mean, telemetry_std: normalization of raw telemetry, applied inside the model.
        variant: the model options beside v0 (`ModelVariant`, or the `model` config node's keys);
            loss_weights: where model.loss_weighting=learned starts.
        precision: how the forward pass computes (`sim.core.precision.Precision`, or "fp32"/"bf16").
            Default: the LLM's weight dtype, with autocast in that dtype where it is not fp32 (what
            `llm_dtype="auto"` and `training.amp=auto` pick together). A checkpoint's
            `model_state_dict` carries the precision it was trained in and sets it on load.

    Raises:
        ConfigError: K > F, a typed d or dv that disagrees, raw frames without an encoder.
    """

    # For the type checker: nn.Module's __getattr__ types submodules and buffers only loosely.
    llm: Any  # a transformers PreTrainedModel carrying `sim_spec`
    vision: Any  # the frozen vision encoder (raw frames), or None
    tel_mean: torch.Tensor
    tel_std: torch.Tensor

    def __init__(
        self,
        llm_name_or_path: str | None = None,
        dv: int | None = None,
        d: int | None = None,
        F: int = 8,
        K: int = 4,
        use_cached_vis_feats: bool = True,
        *,
        llm: nn.Module | Mapping[str, Any] | None = None,
        llm_pretrained: bool = True,
        llm_dtype: str = "float32",
        vision_encoder: nn.Module | None = None,
        vision_spec: Mapping[str, Any] | None = None,
        telemetry_hidden: int = 256,
        head_hidden: int = 256,
        telemetry_mean: Any = None,
        telemetry_std: Any = None,
        precision: Precision | str | None = None,
        variant: ModelVariant | Mapping[str, Any] | None = None,
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        segment_mean_matrix(int(F), int(K))  # K <= F, checked before anything is built
        self.variant = variant if isinstance(variant, ModelVariant) else ModelVariant.from_options(variant)
        llm = resolve_llm(llm, llm_name_or_path, llm_pretrained, llm_dtype)
        if not use_cached_vis_feats and vision_encoder is None:
            raise ConfigError("raw frames (use_cached_vis_feats=False) need a vision encoder (vision=...)")
        self.F, self.K, self.d, self.dv = int(F), int(K), *resolve_widths(llm, d, dv, vision_encoder)
        self.use_cached_vis_feats = bool(use_cached_vis_feats)
        self.telemetry_hidden = int(telemetry_hidden)
        self.head_hidden = int(head_hidden)
        self.llm = llm
        self.vision = vision_encoder
        self.vision_spec = dict(vision_spec) if vision_spec else None
        self.gradient_checkpointing = False
        self.register_buffer("tel_mean", _stats(telemetry_mean, torch.zeros(8)))
        self.register_buffer("tel_std", _stats(telemetry_std, torch.ones(8)))
        self._build_trainable(loss_weights or L.DEFAULT_LOSS_WEIGHTS)
        freeze(self.llm)
        freeze(self.vision)
        if self.variant.lora is not None:
            inject_lora(self.llm, self.variant.lora)
        self.check_frozen()
        if precision is None:
            weights = self.llm_dtype
            precision = Precision(weights, None if weights == torch.float32 else weights)
        self.set_precision(named_precision(precision))

    def _build_trainable(self, loss_weights: Mapping[str, float]) -> None:
        self.vis_proj = nn.Linear(self.dv, self.d)
        self.tel_mlp = nn.Sequential(
            nn.Linear(8, self.telemetry_hidden), nn.GELU(), nn.Linear(self.telemetry_hidden, self.d)
        )
        self.query = nn.Parameter(init_query(self.variant.n_queries, self.d))
        # LLMs leave their last hidden state at very different scales (SmolLM2's has outlier
        # dimensions in the hundreds); a trainable LayerNorm gives every head the same footing.
        self.head_norm = nn.LayerNorm(self.d)
        self.heads = nn.ModuleDict(
            {name: make_head(self.d, self.head_hidden, n) for name, n in L.NUM_CLASSES.items()}
            | {"confidence": make_head(self.d, self.head_hidden, 1)}
        )
        # The variants' modules come after v0's, so v0's weights draw the same random numbers as before.
        self.temporal_pool = build_pooling(self.variant.pooling, self.F, self.K, self.dv)
        self.loss_weighting = build_loss_weighting(self.variant.loss_weighting, loss_weights)

    # ---- freezing -------------------------------------------------------------------------------
    def param_report(self) -> dict[str, dict[str, int]]:
        """Trainable and frozen parameter counts per top-level module."""
        return param_report(self)

    def check_frozen(self) -> dict[str, dict[str, int]]:
        """Assert the freezing contract and log the counts (`check_frozen`)."""
        return check_frozen(self)

    def train(self, mode: bool = True) -> SimV0Model:
        # Frozen backbones never leave eval mode: a frozen GPT-2 in train mode would keep dropout on.
        super().train(mode)
        for name in FROZEN_MODULES:
            module = getattr(self, name)
            if module is not None:
                module.eval()
        follow_mode(self.llm, mode, self.gradient_checkpointing)
        return self

    def set_gradient_checkpointing(self) -> None:
        """`training.gradient_checkpointing`: the same results, less activation memory, one more LLM forward."""
        enable_gradient_checkpointing(self.llm)
        self.gradient_checkpointing = True
        self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- precision ------------------------------------------------------------------------------
    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def set_precision(self, precision: Precision) -> None:
        """Compute in `precision` from now on: the frozen LLM's weights are cast to its weight dtype
        (the trainable modules stay fp32) and every forward pass runs under its autocast."""
        if self.llm_dtype != precision.weights:
            self.llm.to(dtype=precision.weights)
            if getattr(self.llm, "sim_spec", None):
                self.llm.sim_spec = {**self.llm.sim_spec, "dtype": dtype_name(precision.weights)}
            keep_lora_fp32(self.llm)
        self.precision = precision

    def get_extra_state(self) -> torch.Tensor:
        # A tensor, so a state dict stays a dict of tensors for every tool that walks it.
        return precision_code(self.precision)

    def set_extra_state(self, state: Any) -> None:
        if torch.is_tensor(state):
            self.set_precision(precision_from_code(state))

    # ---- forward --------------------------------------------------------------------------------

    def visual_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-frame features [B,F,dv]: cached ones, or frames through the frozen encoder.

        A raw-frame model also takes `vis_feats` computed by its own encoder (`self.vision`): a
        stream encodes each frame once and reuses its features in every window that holds it."""
        if self.use_cached_vis_feats or ("vis_feats" in batch and "frames" not in batch):
            if "vis_feats" not in batch:
                raise KeyError("batch has no 'vis_feats' [B,F,dv]; this model reads cached features")
            feats = batch["vis_feats"]
        else:
            if "frames" not in batch:
                raise KeyError("batch has no 'frames' [B,F,3,H,W]; this model reads raw frames")
            with torch.no_grad():
                feats = self.vision(batch["frames"])
        if feats.dim() != 3 or feats.shape[1] != self.F or feats.shape[2] != self.dv:
            raise ValueError(f"visual features have shape {list(feats.shape)}, expected [B, F={self.F}, dv={self.dv}]")
        return feats

    def prefix(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The LLM input X = [V_1..V_K, T, Q_1..Q_n], shape [B, K+1+n, d] (n = 1 query token in v0)."""
        feats = self.visual_features(batch).to(self.vis_proj.weight.dtype)
        V = self.vis_proj(self.temporal_pool(feats))
        tel = batch["telemetry"].to(self.tel_mean.dtype)
        T = self.tel_mlp((tel - self.tel_mean) / self.tel_std).unsqueeze(1)
        Q = self.query.to(V.dtype).reshape(-1, self.d).expand(V.shape[0], -1, -1)
        return torch.cat([V, T.to(V.dtype), Q], dim=1)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Logits of every head: risk_logits [B,4], reason_logits [B,4], action_logits [B,6],
        confidence_logits [B] (the confidence head predicts whether the action is right).

        Computes in `self.precision`, whoever calls it (trainer, evaluation, predict_json, export)."""
        with self.precision.context(self.vis_proj.weight.device.type):
            x = self.prefix(batch)
            with last_row_only(self.llm, self.reads_last_row_only()) as last_only:
                out = self.llm(inputs_embeds=x.to(self.llm_dtype), use_cache=False)
            # With `last_only`, the last layer computed Q's row alone: the other rows are not hidden states.
            hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
            states = head_states(hidden, self.variant.n_queries, self.variant.query_heads)
            h = normed_states(self.head_norm, states, self.vis_proj.weight.dtype)
            logits = {f"{name}_logits": self.heads[name](h[name]) for name in L.HEADS}
            # The confidence head reads a detached state: learning to judge the action must not change it.
            logits["confidence_logits"] = self.heads["confidence"](h["confidence"].detach()).squeeze(-1)
        return logits

    def reads_last_row_only(self) -> bool:
        """The heads read one state, the LLM's last row (v0's readout), and nothing recomputes the
        layers (gradient checkpointing) or wraps them (LoRA): the last layer may skip the other rows."""
        return self.variant.n_queries == 1 and not self.gradient_checkpointing and self.variant.lora is None

    @torch.no_grad()
    def predict_json(self, batch: Mapping[str, Any], risk_high_threshold: float | None = None) -> list[dict[str, Any]]:
        """One readable decision per sample.

        Args:
            batch: a collated batch (a leading batch dimension); the inputs (vis_feats or frames, and
                telemetry) are tensors, NumPy arrays or nested lists of numbers; `sample_id` optional.
            risk_high_threshold: if given, risk is "high" whenever P(high) >= this threshold
                (a safety operating point chosen by evaluate.py), else the arg-max.

        Returns:
            [{"sample_id", "risk": {"label", "id", "probs": {name: p}}, "reason": {...},
              "action": {...}, "confidence": float}, ...]

        Raises:
            DataError: an input that is none of those, naming its key.
        """

        was_training = self.training
        self.eval()
        device = self.vis_proj.weight.device
        moved = {k: model_input(k, v, device) for k, v in batch.items()}
        logits = self(moved)
        self.train(was_training)
        return decisions(logits, batch.get("sample_id"), risk_high_threshold)

    # ---- checkpoints ----------------------------------------------------------------------------
    def set_telemetry_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        std = torch.as_tensor(std, dtype=torch.float32).clone()
        std[std < 1e-6] = 1.0  # a constant channel carries no information; don't divide by ~0
        self.tel_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.tel_std.copy_(std)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable modules and the telemetry statistics: what a checkpoint stores."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if is_trainable_key(k, stats=True)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a checkpoint's `model_state_dict` (trainable modules only) or a full state dict.

        Raises:
            CheckpointError: keys missing or unexpected (strict), or shapes of another architecture.
        """
        check_state_dict(self, super().state_dict(), state_dict, strict)
        return super().load_state_dict(dict(state_dict), strict=False, assign=assign)

    def metadata(self) -> dict[str, Any]:
        """Everything needed to rebuild this model without the config that trained it (plain types)."""
        return model_metadata(self)

    # Rebuilding from what a checkpoint or an exported directory holds (sim.models.serialization).
    from_metadata = classmethod(from_metadata)
    # One loader for a checkpoint file and an exported directory, under both names users know.
    from_checkpoint = classmethod(load)
    from_pretrained = classmethod(load)


# Top-level module -> its optim.lr_groups name.
_GROUP_OF = {
    "vis_proj": "projector",
    "tel_mlp": "projector",
    "temporal_pool": "projector",
    "query": "queries",
    "head_norm": "heads",
    "heads": "heads",
    "loss_weighting": "loss_weighting",
    "llm": "lora",
}


def group_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters by optim.lr_groups name: projector, queries, heads, loss_weighting, lora."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(_GROUP_OF[name.split(".")[0]], []).append(p)
    return groups


def normed_states(norm: nn.Module, states: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{head: norm(its state)}, one LayerNorm per distinct state (v0: one state for all heads)."""
    normed: dict[int, torch.Tensor] = {}
    for state in states.values():
        if id(state) not in normed:
            normed[id(state)] = norm(state.to(dtype))
    return {head: normed[id(state)] for head, state in states.items()}


def make_head(d: int, hidden: int, n_out: int) -> nn.Module:
    # A hidden layer lets the heads combine what the frozen LLM mixed into h (e.g. proximity
    # and speed into risk) without asking the frozen layers to do it.
    if hidden <= 0:
        return nn.Linear(d, n_out)
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def _stats(values: Any, default: torch.Tensor) -> torch.Tensor:
    return default if values is None else torch.as_tensor(values, dtype=torch.float32).clone().reshape(8)


def follow_mode(llm: nn.Module, mode: bool, checkpointing: bool) -> None:
    """In a frozen LLM kept in eval mode, what follows train/eval: the LoRA adapters' dropout, and (with
    gradient checkpointing) the checkpointed layers' own flag, as their recompute runs only in training
    (their dropouts stay in eval)."""
    for module in lora_dropouts(llm):
        module.train(mode)
    if checkpointing:
        for layer in checkpointed_layers(llm):
            layer.training = mode


def resolve_llm(
    llm: nn.Module | Mapping[str, Any] | None, name_or_path: str | None, pretrained: bool, dtype: str
) -> nn.Module:
    """The LLM given as a module, as a spec dict (as checkpoints store it), or by name."""
    if isinstance(llm, nn.Module):
        return llm
    if isinstance(llm, Mapping):
        return build_llm(**llm)
    if not name_or_path:
        raise ConfigError("SimV0Model needs llm_name_or_path or llm")
    return build_llm(name_or_path, pretrained=pretrained, dtype=dtype, **FAST_KERNELS)


def resolve_widths(llm: nn.Module, d: int | None, dv: int | None, vision_encoder: nn.Module | None) -> tuple[int, int]:
    """(d, dv): d read from the LLM, dv from the encoder or given; a typed value that disagrees is refused.

    Raises:
        ConfigError: naming the key to leave unset.
    """
    d_llm = hidden_size(llm)
    if d is not None and int(d) != d_llm:
        raise ConfigError(
            f"model.d={d} but the LLM {describe(getattr(llm, 'sim_spec', {}))} has embedding width {d_llm}; "
            "leave model.d unset (null) and it is read from the LLM"
        )
    if vision_encoder is not None:
        enc_dv = int(cast(Any, vision_encoder).dv)
        if dv is not None and int(dv) != enc_dv:
            raise ConfigError(
                f"model.dv={dv} but the vision encoder produces {enc_dv}-wide features; leave model.dv unset"
            )
        dv = enc_dv
    if dv is None:
        raise ConfigError("model.dv is unknown: give dv, or let the trainer read it from the data")
    return d_llm, int(dv)


def param_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per top-level module."""
    report: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        entry = report.setdefault(top, {"trainable": 0, "frozen": 0})
        entry["trainable" if p.requires_grad else "frozen"] += p.numel()
    return report


def check_frozen(model: nn.Module) -> dict[str, dict[str, int]]:
    """Assert the freezing contract and log the counts.

    Raises:
        AssertionError: a backbone weight would train, nothing would train, or something
            outside the named trainable modules would.
    """
    report = param_report(model)
    for name in FROZEN_MODULES:
        backbone = getattr(model, name, None)
        # A LoRA-adapted LLM trains its adapters, and nothing else of it.
        stray = (
            []
            if backbone is None
            else [
                n
                for n, p in backbone.named_parameters()
                if p.requires_grad and not (name == "llm" and is_lora_param(n))
            ]
        )
        assert not stray, f"{name} has trainable parameters: {stray[:3]}"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    named = sum(report.get(m, {}).get("trainable", 0) for m in (*TRAINABLE_MODULES, "llm"))
    assert trainable > 0, "no trainable parameters"
    assert trainable == named, f"{trainable - named} trainable parameters outside {TRAINABLE_MODULES}"
    frozen = sum(v["frozen"] for v in report.values())
    log.info(
        "parameters: trainable %s, frozen %s (%s)",
        f"{trainable:,}",
        f"{frozen:,}",
        ", ".join(f"{k}: {v['trainable']:,} trainable / {v['frozen']:,} frozen" for k, v in report.items()),
    )
    return report
