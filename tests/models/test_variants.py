"""The model variants (model.pooling, model.readout, model.loss_weighting, model.adaptation, optim.lr_groups,
optim=onecycle, training.gradient_checkpointing): each composes, trains, resumes exactly, rebuilds from its
checkpoint and exports to ONNX; the defaults stay v0 bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PRECISIONS, TINY, make_cfg
from hydra.utils import instantiate

from sim.core.checkpoint import load_checkpoint
from sim.core.cli import compose
from sim.core.errors import ConfigError
from sim.core.run import RunDir, read_jsonl
from sim.data.synthetic import SyntheticSimDataset
from sim.models.lora import is_lora_param
from sim.models.model import SimV0Model
from sim.models.variants import ModelVariant
from sim.training.callbacks import Callback
from sim.training.train import build_callbacks, train
from sim.training.trainer import Trainer

SMALL = [*TINY, "data.train_kwargs.num_samples=128", "data.val_kwargs.num_samples=64", "logger=none"]
VARIANTS = {
    # K=4 tokens from F=6 frames: segments of 1 and 2 frames, attended over all six.
    "attention_pooling": ["model.pooling=attention", "model.F=6", "model.K=4"],
    "queries_pooled": ["model.readout=queries", "model.num_queries=3"],
    "queries_per_head": ["model.readout=queries", "model.query_heads=per_head"],
    "learned_loss_weights": ["model.loss_weighting=learned"],
    "lora": ["model.adaptation=lora", "optim.lr_groups.lora=0.005"],
    "onecycle_lr_groups": ["optim=onecycle", "optim.lr_groups.projector=0.002", "optim.lr_groups.heads=0.003"],
    "gradient_checkpointing": ["model.adaptation=lora", "training.gradient_checkpointing=true"],
}


def _state(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / name)["model_state_dict"]


def _val(run: Path) -> list[dict]:
    timing = ("samples_per_s", "time_s", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(run / "metrics" / "val_metrics.jsonl")]


class Crashed(Exception):
    pass


class CrashAfterEpoch(Callback):
    """The process dies once epoch 1's checkpoint is written (an interruption the run resumes from)."""

    def on_epoch_end(self, trainer, epoch, train, val, is_best):
        if epoch == 1:
            raise Crashed


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    """variant_runs(name, precision) -> (straight run dir, resumed run dir): 2 epochs straight, and the
    same run crashed after epoch 1 and resumed, trained on first use."""
    done: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(name: str, precision: str) -> tuple[Path, Path]:
        if (name, precision) not in done:
            root = tmp_path_factory.mktemp(f"{name}_{precision}")
            cfg = make_cfg(*SMALL, *PRECISIONS[precision], *VARIANTS[name], "training.epochs=2")
            train(cfg, run_dir=root / "straight")
            with pytest.raises(Crashed):
                train(cfg, run_dir=root / "resumed", callbacks=[*build_callbacks(cfg), CrashAfterEpoch()])
            cfg.training.resume = "auto"
            train(cfg, run_dir=root / "resumed")
            done[name, precision] = (root / "straight", root / "resumed")
        return done[name, precision]

    return get


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_trains_and_resumes_exactly(variant_runs, name, precision):
    straight, resumed = variant_runs(name, precision)
    train_loss = [r["loss"] for r in read_jsonl(straight / "metrics" / "train_metrics.jsonl")]
    assert train_loss[-1] < train_loss[0], train_loss
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ from the straight run's"
    assert _val(straight) == _val(resumed)
    # The checkpoint records the variant, and from_checkpoint rebuilds it.
    meta = load_checkpoint(straight / "checkpoints" / "last.pt")["metadata"]
    model = SimV0Model.from_checkpoint(straight / "checkpoints" / "last.pt")
    assert model.variant == ModelVariant.from_options(meta["variant"])
    assert model.variant.is_v0() == (not any(o.startswith("model.") for o in VARIANTS[name]))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_rebuilds_from_its_checkpoint_and_exports_to_onnx(variant_runs, name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from sim.evaluation.evaluate import evaluate
    from sim.export.onnx import export_and_check

    straight, _ = variant_runs(name, "fp32")
    best = straight / "checkpoints" / "best.pt"
    # evaluate.py rebuilds the model from the checkpoint alone and reproduces the logged val metrics.
    logged = {r["epoch"]: r for r in read_jsonl(straight / "metrics" / "val_metrics.jsonl")}
    epoch = load_checkpoint(best)["epoch"]
    args = [f"checkpoint={best}", "progress_bar=false", "data.val_kwargs.num_samples=64"]  # the run's val split
    got = evaluate(compose("evaluate", args), tmp_path / "eval")
    for key in ("action_accuracy", "risk_high_recall", "macro_f1", "loss"):
        assert got[key] == pytest.approx(logged[epoch][key], abs=1e-6), key
    report = export_and_check(compose("export_onnx", [f"checkpoint={best}", f"out={tmp_path / 'v.onnx'}"]))
    assert report["fp32"]["max_abs_logit_diff_all"] < 1e-4
    assert all(v == 1.0 for v in report["fp32"]["label_agreement"].values())


def test_lora_trains_only_its_adapters(tmp_path):
    cfg = make_cfg(*SMALL, *VARIANTS["lora"], "training.epochs=1")
    trainer = Trainer(cfg, RunDir(tmp_path))
    trainer.setup()
    llm = trainer.model.llm
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    adapters = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert adapters and all(is_lora_param(n) for n in adapters)
    trainer.fit()
    changed = {k for k, v in llm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(is_lora_param(k) for k in changed), sorted(changed)[:5]
    # The adapters train in float32 and are what the checkpoint adds to v0's keys.
    assert all(p.dtype == torch.float32 for n, p in llm.named_parameters() if is_lora_param(n))
    saved = _state(tmp_path)
    assert {k for k in saved if k.startswith("llm.")} == {f"llm.{n}" for n in adapters}
    # Breaking the contract is caught: a base weight that would train.
    next(p for n, p in llm.named_parameters() if not is_lora_param(n)).requires_grad_(True)
    with pytest.raises(AssertionError, match="llm has trainable parameters"):
        trainer.model.check_frozen()


def test_v0_defaults_compute_the_v0_formula_bit_for_bit():
    """The default model is v0: segment means, Q last, the heads on the LayerNorm of the state at Q,
    and exactly v0's checkpoint keys."""
    llm = instantiate(make_cfg(*TINY).llm, _convert_="all")
    torch.manual_seed(0)
    model = SimV0Model(dv=64, F=8, K=3, llm=llm, precision="fp32")
    assert model.variant.is_v0() and model.loss_weighting is None
    batch = SyntheticSimDataset(num_samples=16).__getitems__(list(range(16)))
    with torch.no_grad():
        got = model(batch)
        P = torch.zeros(3, 8)
        for k, (lo, hi) in enumerate([(0, 2), (2, 5), (5, 8)]):
            P[k, lo:hi] = 1.0 / (hi - lo)
        V = model.vis_proj(torch.einsum("kf,bfd->bkd", P, batch["vis_feats"].float()))
        T = model.tel_mlp((batch["telemetry"] - model.tel_mean) / model.tel_std).unsqueeze(1)
        Q = model.query.expand(16, 1, -1)
        h = model.head_norm(llm(inputs_embeds=torch.cat([V, T, Q], 1), use_cache=False).last_hidden_state[:, -1])
    for head in ("risk", "reason", "action"):
        assert torch.equal(got[f"{head}_logits"], model.heads[head](h)), head
    assert torch.equal(got["confidence_logits"], model.heads["confidence"](h).squeeze(-1))
    tops = {k.split(".")[0] for k in model.trainable_state_dict()}
    assert tops == {"vis_proj", "tel_mlp", "query", "head_norm", "heads", "tel_mean", "tel_std", "_extra_state"}
    assert model.query.shape == (model.d,)


def test_a_checkpoint_without_a_variant_rebuilds_as_v0(tiny_run):
    run_dir, _, _ = tiny_run
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    meta = {k: v for k, v in ckpt["metadata"].items() if k != "variant"}  # as written before the variants
    model = SimV0Model.from_metadata(meta)
    model.load_state_dict(ckpt["model_state_dict"])
    assert model.variant.is_v0()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.pooling=max"], "model.pooling='max': expected one of segment_mean, attention"),
        (["model.readout=cls"], "model.readout='cls': expected one of last_token, queries"),
        (["model.loss_weighting=magic"], "model.loss_weighting='magic'"),
        (["model.adaptation=full"], "model.adaptation='full': expected one of frozen, lora"),
        (["model.adaptation=lora", "model.lora.r=0"], "model.lora.r=0"),
        (["model.adaptation=lora", "model.lora.target_modules=[no_such_layer]"], "model.lora.target_modules"),
        (["optim.lr_groups.lora=-1"], "a learning rate must be > 0"),
        (["+optim.lr_groups.vision=0.1"], "optim.lr_groups has unknown groups"),
    ],
)
def test_a_bad_variant_option_is_refused_by_name(overrides, message, tmp_path):
    cfg = make_cfg(*SMALL, "training.epochs=1", *overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Trainer(cfg, RunDir(tmp_path)).setup()


def test_learned_loss_weights_are_logged_and_move(variant_runs):
    straight, _ = variant_runs("learned_loss_weights", "fp32")
    rows = read_jsonl(straight / "metrics" / "train_metrics.jsonl")
    weights = [(r["loss_weight_risk"], r["loss_weight_reason"], r["loss_weight_action"]) for r in rows]
    assert len(weights) == 2 and weights[0] != weights[1]
    # They start at model.loss_weights (risk 1.0, reason 0.5, action 1.0) and stay near them after 2 epochs.
    assert weights[0] == pytest.approx((1.0, 0.5, 1.0), abs=0.05)
    assert json.dumps(rows)  # plain numbers, as every logger writes them


def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradients():
    batch = SyntheticSimDataset(num_samples=8).__getitems__(list(range(8)))
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        llm = instantiate(make_cfg(*TINY).llm, _convert_="all")
        model = SimV0Model(dv=64, F=8, K=4, llm=llm, precision="fp32", variant={"adaptation": "lora"})
        if checkpointing:
            model.set_gradient_checkpointing()
        model.train()
        seen: list[int] = []
        # A module inside the checkpointed layer: the layer's own hooks stay outside the checkpoint.
        llm.h[0].attn.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        out = model(batch)
        (out["risk_logits"].sum() + out["action_logits"].sum()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        calls.append(len(seen))
    assert calls == [1, 2], "the checkpointed layer did not run again in the backward pass"
    assert grads[0].keys() == grads[1].keys() and any(is_lora_param(k) for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-6, msg=k)


def test_a_lora_model_travels_with_its_adapters(variant_runs, tmp_path):
    """The stream runner and an exported directory rebuild the adapted LLM, not the frozen one."""
    from sim.export.stream import load_runner
    from sim.models.pretrained import save_pretrained

    straight, _ = variant_runs("lora", "fp32")
    best = straight / "checkpoints" / "best.pt"
    model = SimV0Model.from_checkpoint(best)
    saved = {k: v for k, v in load_checkpoint(best)["model_state_dict"].items() if is_lora_param(k)}
    assert saved and any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k), "the adapters never trained"
    # The synthetic features have no encoder on record: the tiny CNN's 64 features stand in for it.
    runner = load_runner(best, vision=instantiate(make_cfg(*TINY, "vision=tiny").vision, _convert_="all"))
    out = save_pretrained(model.trainable_state_dict(), model.metadata(), tmp_path / "exported")
    exported = SimV0Model.from_pretrained(out)
    batch = SyntheticSimDataset(split="val", num_samples=16).__getitems__(list(range(16)))
    with torch.no_grad():
        ref = model(batch)
        for other in (runner.model, exported):
            assert all(torch.equal(other(batch)[k], ref[k]) for k in ref)
    # Without the adapters the same heads decide otherwise: they are part of the model.
    frozen = SimV0Model.from_metadata({**model.metadata(), "variant": ModelVariant().to_dict()})
    frozen.load_state_dict({k: v for k, v in model.trainable_state_dict().items() if not is_lora_param(k)})
    with torch.no_grad():
        assert not torch.equal(frozen(batch)["action_logits"], ref["action_logits"])
