"""`python -m sim.export checkpoint=PATH out=DIR`: a trained model as a portable directory.

    DIR/
      model.safetensors     trainable weights, telemetry statistics, precision code
      config.json           what `from_checkpoint` reads (dims, F, K, LLM and encoder identity,
                            precision, labels, telemetry statistics) + the calibrated risk_high_threshold
      model.onnx            the whole model as one graph (onnx=true), and model.int8.onnx (quantize=true)
      onnx_parity.json      ONNX Runtime against PyTorch on the split's windows
      eval/                 evaluate.py's report on the split (metrics.json, per_class.md, figures)
      sim_v0_infer.py       the inference wrapper; run beside these files it loads them
      README.md             the model card

`SimV0Model.from_pretrained(DIR)`, `python -m sim.stream checkpoint=DIR` and the wrapper load it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from sim.core import labels as L
from sim.core.checkpoint import load_checkpoint
from sim.core.cli import CONF_DIR, fail_cleanly, require
from sim.evaluation.evaluate import evaluate, per_class_markdown
from sim.evaluation.metrics import per_class_table
from sim.export.onnx import export_and_check
from sim.models.llm import describe
from sim.models.model import SimV0Model
from sim.models.pretrained import save_pretrained

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("infer_template.py")
CARD_METRICS = ("action_accuracy", "risk_high_recall", "macro_f1", "risk_f1_macro", "reason_f1_macro", "loss")


def export_artifact(cfg: DictConfig) -> dict[str, Any]:
    """Write the directory `cfg.out` from checkpoint `cfg.checkpoint`; returns a summary of what was written.

    The card's figures are evaluate.py's on `cfg.split` of `cfg.data` (the same function, the same
    checkpoint precision), so they equal what `python evaluate.py checkpoint=...` prints.
    """
    require(cfg, "checkpoint", "path/to/best.pt")
    require(cfg, "out", "path/to/DIR")
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(Path(str(cfg.checkpoint)))
    report = evaluate(cfg, out / "eval")
    model = SimV0Model.from_checkpoint(Path(str(cfg.checkpoint)))
    save_pretrained(
        model.trainable_state_dict(),
        model.metadata(),
        out,
        risk_high_threshold=report["risk_high_threshold"],
        risk_high_target_recall=report["risk_high_target_recall"],
    )
    shutil.copyfile(TEMPLATE, out / "sim_v0_infer.py")
    parity = None
    if cfg.onnx:
        onnx_cfg = cfg.copy()
        onnx_cfg.out = str(out / "model.onnx")
        parity = export_and_check(onnx_cfg)
        (out / "onnx_parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    (out / "README.md").write_text(model_card(ckpt, model, report, parity))
    log.info("exported %s -> %s", cfg.checkpoint, out)
    return {"out": str(out), "files": sorted(p.name for p in out.iterdir()), "metrics": report}


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _training_summary(ckpt: dict[str, Any]) -> list[str]:
    cfg = ckpt.get("config") or {}
    data, training = cfg.get("data") or {}, cfg.get("training") or {}
    dataset = str(data.get("dataset_class_path") or "")

    def split(name: str) -> str:
        path = data.get(f"{name}_split_path")
        n = (data.get(f"{name}_kwargs") or {}).get("num_samples")
        return f"`{path}`" if path else f"{n if n is not None else '?'} generated samples"

    monitor = (cfg.get("checkpoint") or {}).get("monitor", "?")
    return [
        f"- Data: `{dataset.rsplit('.', 1)[-1] or 'unknown'}`; train: {split('train')}; val: {split('val')}",
        f"- {training.get('epochs', '?')} epochs, seed {training.get('seed', '?')}; these weights are epoch "
        f"{ckpt.get('epoch')}, the best by `{monitor}`",
    ]


def model_card(ckpt: dict[str, Any], model: SimV0Model, report: dict[str, Any], parity: dict[str, Any] | None) -> str:
    """The README.md of an exported model: use and limits, data, val figures, threshold, how to load."""
    meta = model.metadata()
    ev = report["evaluation"]
    rows = "\n".join(f"| {name} | {_fmt(report.get(name))} |" for name in CARD_METRICS)
    per_class = per_class_markdown(_per_class_tables(report), f"{ev['split']} split ({ev['num_samples']} samples)")
    onnx = "No ONNX graph was exported (onnx=false)."
    if parity is not None:
        agree = ", ".join(f"{h} {_fmt(v)}" for h, v in parity["fp32"]["label_agreement"].items())
        onnx = (
            f"`model.onnx` computes in fp32: max |logit difference| to PyTorch fp32 "
            f"{parity['fp32']['max_abs_logit_diff_all']:.2e} over {parity['fp32']['num_samples']} windows of the "
            f"{parity['split']} split; label agreement {agree}. Details in `onnx_parity.json`."
        )
    threshold = report["risk_high_threshold"]
    return f"""# SIM v0 model

A Spatial Intent Model: a frozen `{describe(meta["llm"])}` reads F={meta["F"]} frames (pooled to K={meta["K"]}
tokens, dv={meta["dv"]}) and 8 telemetry channels and predicts risk, reason and the action a rover should take.

## Intended use and limits
- Decision support for a slow ground rover: risk ({", ".join(L.LABELS["risk"])}), reason
  ({", ".join(L.LABELS["reason"])}) and action ({", ".join(L.LABELS["action"])}).
- It has seen only the data below. Decisions on other cameras, encoders, speeds or scenes are unvalidated:
  evaluate on your own recordings before trusting it, and keep an independent safety stop.
- Inputs must match its training: {"cached features" if meta["use_cached_vis_feats"] else "raw frames"}
  ({_encoder(meta)}), telemetry in the order
  {", ".join(L.TELEMETRY_FIELDS)} (raw; the model normalizes it).

## Training
{chr(10).join(_training_summary(ckpt))}
- Precision: {model.precision.name} (frozen weights {meta["precision"]["weights"]})

## Validation ({ev["split"]} split, {ev["num_samples"]} samples, evaluate.py)
| metric | value |
|---|---|
{rows}

{per_class.replace(chr(10) + "## ", chr(10) + "#### ").replace("# Per-class metrics", "### Per-class metrics", 1)}
## Safety threshold
Risk is "high" whenever P(high) >= **{_fmt(threshold)}** (recall of "high" {_fmt(report["risk_high_threshold_recall"])}
at target {_fmt(report["risk_high_target_recall"])}, precision {_fmt(report["risk_high_threshold_precision"])}).
`config.json` holds it as `risk_high_threshold` (1.0 means the arg-max alone already reaches the target).

## How to load
```python
from sim.model import SimV0Model
model = SimV0Model.from_pretrained("path/to/this/directory")
decisions = model.predict_json(batch, risk_high_threshold={threshold!r})
```
or `python sim_v0_infer.py window.npz` in this directory, or
`python -m sim.stream checkpoint=THIS_DIR video=FILE out=DIR`.

## ONNX
{onnx}
"""


def _encoder(meta: dict[str, Any]) -> str:
    vision = meta.get("vision") or {}
    name = vision.get("name_or_path") or vision.get("kind")
    return f"encoder `{name}`" if name and name != "cached" else "from the encoder the training features came from"


def _per_class_tables(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {h: per_class_table(torch.tensor(report["confusion"][h]["matrix"]), L.LABELS[h]) for h in L.HEADS}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        summary = export_artifact(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=2))
