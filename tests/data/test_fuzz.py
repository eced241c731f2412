"""Property-based tests: generated malformed samples and batches against validation and collate.

Every generated input is either refused with `sim.core.errors.DataError` (data.on_bad_sample=error),
or accepted and then trains: a forward/backward/optimizer step of a tiny model (through the
non-finite guard, as in the trainer) runs without an exception. Nothing may escape as an error from
inside torch, NumPy or transformers. The skip policy must agree with the error policy: it drops
exactly the samples the error policy names, and what it keeps trains.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sim.core import labels as L
from sim.core.errors import DataError
from sim.core.labels import DEFAULT_LOSS_WEIGHTS
from sim.data.validate import SKIPPED_KEY, SampleValidator, ValidatedDataset
from sim.evaluation.metrics import compute_losses
from sim.models.model import SimV0Model
from sim.training.guards import NonFiniteGuard

F, DV, H = 4, 8, 8
TINY_LLM = {
    "arch": {
        "model_type": "gpt2",
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "n_positions": 16,
        "vocab_size": 8,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "pretrained": False,
    "dtype": "float32",
}
KEYS = ("vis_feats", "telemetry", "risk_id", "reason_id", "action_id", "weight", "sample_id")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RAN: Counter[str] = Counter()  # cases per property, reported at the end of the module

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.int8,
    torch.bool,
    torch.complex64,
    torch.uint16,
]
SPECIAL = [math.nan, math.inf, -math.inf, 1e38, -1e38, 1e300, 0.0]

# ---- strategies ---------------------------------------------------------------------------------
finite = st.floats(-50, 50, allow_nan=False, width=32)


def weird_tensor(draw) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 9), max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    t = torch.randn(shape) * draw(st.sampled_from([1.0, 1e3, 1e30]))
    return t.to(dtype) if not dtype.is_complex else torch.complex(t, t).to(dtype)


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.floats(), max_size=9),
    st.lists(st.integers(-5, 9), max_size=9),
    st.lists(st.lists(st.integers(0, 3), max_size=3), max_size=3),  # ragged nesting
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(lambda s: np.array(s, dtype=object), st.lists(st.integers(), max_size=3)),
    st.builds(lambda s: np.array(s), st.lists(st.text(max_size=2), min_size=1, max_size=3)),
    st.composite(lambda draw: weird_tensor(draw))(),
    st.builds(lambda x: np.float64(x), st.floats()),
    st.builds(lambda x: np.int64(x), st.integers(-10, 10)),
    st.builds(lambda x: torch.tensor(x), st.integers(-10, 10)),
    st.builds(lambda x: torch.tensor([x]), st.floats(width=32)),
)


@st.composite
def valid_sample(draw, i: int = 0, video_key: str = "vis_feats") -> dict:
    if video_key == "vis_feats":
        video = torch.from_numpy(draw(arrays(np.float32, (F, DV), elements=finite)))
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        video = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (F, 3, H, H), dtype=np.uint8))
    sample = {
        video_key: video,
        "telemetry": torch.from_numpy(draw(arrays(np.float32, (8,), elements=finite))),
        **{f"{h}_id": draw(st.integers(0, n - 1)) for h, n in L.NUM_CLASSES.items()},
        "sample_id": f"s{i}",
    }
    w = draw(st.one_of(st.none(), st.floats(0, 5)))
    if w is not None:
        sample["weight"] = w
    return sample


@st.composite
def mutated_sample(draw, i: int = 0, video_key: str = "vis_feats"):
    s = dict(draw(valid_sample(i, video_key)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(["drop", "junk", "poison", "label", "shape", "dtype", "layout", "container", "sample"])
        )
        key = draw(st.sampled_from([video_key if k == "vis_feats" else k for k in KEYS] + ["extra"]))
        if kind == "drop":
            s.pop(key, None)
        elif kind == "junk":
            s[key] = draw(junk)
        elif kind == "poison" and torch.is_tensor(s.get(video_key)) and torch.is_tensor(s.get("telemetry")):
            target = draw(st.sampled_from([video_key, "telemetry"]))
            t = s[target].double() if s[target].is_floating_point() else s[target].float()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL))
            s[target] = t if draw(st.booleans()) else t.float()
        elif kind == "label":
            head = draw(st.sampled_from(L.HEADS))
            n = L.NUM_CLASSES[head]
            s[f"{head}_id"] = draw(
                st.one_of(
                    st.integers(-10, -1),
                    st.integers(n, n + 10),
                    st.just(float(n - 1)),
                    st.just(np.int64(n - 1)),
                    st.just(torch.tensor(n - 1)),
                    st.just(True),
                )
            )
        elif kind == "shape" and torch.is_tensor(s.get(video_key)):
            shape = list(s[video_key].shape)
            axis = draw(st.integers(0, len(shape) - 1))
            shape[axis] = max(0, shape[axis] + draw(st.sampled_from([-1, 1])))
            s[video_key] = torch.zeros(shape, dtype=s[video_key].dtype)
        elif kind == "dtype" and torch.is_tensor(s.get(key)):
            dtype = draw(st.sampled_from(DTYPES))
            s[key] = s[key].to(dtype) if not dtype.is_complex else s[key].to(torch.complex64)
        elif kind == "layout" and torch.is_tensor(s.get(key)):
            # Valid content in unusual containers: NumPy (negative strides), lists, a strided view.
            form = draw(st.sampled_from(["numpy_reversed", "list", "transposed", "requires_grad"]))
            t = s[key]
            if form == "numpy_reversed":
                s[key] = np.ascontiguousarray(t.numpy()[::-1])[::-1]
            elif form == "list":
                s[key] = t.tolist()
            elif form == "transposed" and t.dim() == 2:
                s[key] = t.t().contiguous().t()
            elif form == "requires_grad" and t.is_floating_point():
                s[key] = t.clone().requires_grad_()
        elif kind == "container":
            s[key] = draw(st.sampled_from([[s.get(key)], (s.get(key),), {"value": s.get(key)}]))
        elif kind == "sample":
            return draw(junk)
    return s


# ---- the tiny model and one training step ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = SimV0Model(llm=TINY_LLM, dv=DV, F=F, K=2, telemetry_hidden=16, head_hidden=0)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3)
    guard = NonFiniteGuard(max_consecutive=10**9)  # count only: fuzzing feeds extreme values on purpose
    yield model, opt, guard
    RAN["non-finite steps skipped by the guard"] = guard.skipped
    print("\nfuzz cases run:", dict(RAN))


def train_step(tiny, batch: dict) -> None:
    """What the trainer does with a batch: forward, loss, backward, clip, guarded step."""
    model, opt, guard = tiny
    model.train()
    logits = model(batch)
    losses = compute_losses(logits, batch, DEFAULT_LOSS_WEIGHTS)
    losses["objective"].backward()
    guard.observe_loss(losses["objective"])
    norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
    if guard.should_step(model.trainable_parameters(), norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    for p in model.trainable_parameters():
        assert torch.isfinite(p).all(), "a guarded step left non-finite weights"


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class CollatedDataset(ListDataset):
    """A dataset whose __getitems__ hands over a (possibly malformed) collated batch."""

    def __init__(self, batch, n):
        super().__init__([None] * n)
        self.batch = batch

    def __getitems__(self, indices):
        return self.batch

    def __getitem__(self, i):
        raise IndexError("this dataset only reads whole batches")


def run_both_policies(tiny, dataset, n: int, video_key: str = "vis_feats", shape=(F, DV)) -> str:
    """Error policy: DataError or a batch that trains. Skip policy: drops exactly what error names."""
    strict = ValidatedDataset(dataset, SampleValidator(video_key, shape, on_bad_sample="error"), "train")
    lenient = ValidatedDataset(dataset, SampleValidator(video_key, shape, on_bad_sample="skip"), "train")
    indices = list(range(n))
    try:
        batch = strict.__getitems__(indices)
    except DataError as exc:
        named = str(exc)
        assert "sample" in named and ("expected" in named or "could not be read" in named), named
        kept = lenient.__getitems__(indices)
        skipped = kept.pop(SKIPPED_KEY)
        assert skipped, "skip policy found nothing the error policy refused"
        for _split, index, _sid, key, problem in skipped:
            assert key and problem and index in indices
        if kept:
            assert kept[video_key].shape[0] == len(kept["sample_id"]) < n
            train_step(tiny, kept)
            return "refused, the good rest trained"
        return "refused"
    assert SKIPPED_KEY not in batch
    assert batch[video_key].shape == (n, *shape) and batch["telemetry"].shape == (n, 8)
    assert batch["telemetry"].dtype == torch.float32 and all(batch[f"{h}_id"].dtype == torch.long for h in L.HEADS)
    train_step(tiny, batch)
    return "accepted and trained"


@FUZZ
@given(data=st.data(), n=st.integers(1, 4))
def test_generated_samples_are_refused_or_train(tiny, data, n):
    samples = [data.draw(st.one_of(valid_sample(i), mutated_sample(i))) for i in range(n)]
    outcome = run_both_policies(tiny, ListDataset(samples), n)
    RAN[f"samples: {outcome}"] += 1


@st.composite
def collated_batch(draw):
    n = draw(st.integers(1, 4))
    samples = [draw(valid_sample(i)) for i in range(n)]
    batch = {
        "vis_feats": torch.stack([s["vis_feats"] for s in samples]),
        "telemetry": torch.stack([s["telemetry"] for s in samples]),
        **{f"{h}_id": torch.tensor([s[f"{h}_id"] for s in samples]) for h in L.HEADS},
        "weight": torch.ones(n),
        "sample_id": [s["sample_id"] for s in samples],
    }
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["drop", "junk", "poison", "label", "rows", "dtype", "numpy", "not_a_dict"]))
        key = draw(st.sampled_from(KEYS))
        if kind == "drop":
            batch.pop(key, None)
        elif kind == "junk":
            batch[key] = draw(junk)
        elif kind == "poison" and torch.is_tensor(batch.get(key)) and batch[key].numel():
            t = batch[key].double()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL))
            batch[key] = t
        elif kind == "label" and torch.is_tensor(batch.get(key)) and key.endswith("_id"):
            batch[key] = batch[key].clone()
            batch[key][draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, 4, 6, 99, -(2**40)]))
        elif kind == "rows" and torch.is_tensor(batch.get(key)):
            batch[key] = batch[key][: max(0, n - 1)] if draw(st.booleans()) else torch.cat([batch[key], batch[key][:1]])
        elif kind == "dtype" and torch.is_tensor(batch.get(key)):
            dtype = draw(st.sampled_from(DTYPES))
            batch[key] = batch[key].to(dtype) if not dtype.is_complex else batch[key].to(torch.complex64)
        elif kind == "numpy" and torch.is_tensor(batch.get(key)):
            batch[key] = batch[key].numpy() if draw(st.booleans()) else batch[key].tolist()
        elif kind == "not_a_dict":
            return draw(st.sampled_from([list(batch.values()), None, "batch", (batch,)])), n
    return batch, n


@FUZZ
@given(case=collated_batch())
def test_generated_collated_batches_are_refused_or_train(tiny, case):
    batch, n = case
    outcome = run_both_policies(tiny, CollatedDataset(batch, n), n)
    RAN[f"collated batches: {outcome}"] += 1


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), n=st.integers(1, 3))
def test_generated_raw_frame_samples_are_refused_or_train(frames_model, data, n):
    samples = [data.draw(st.one_of(valid_sample(i, "frames"), mutated_sample(i, "frames"))) for i in range(n)]
    outcome = run_both_policies(frames_model, ListDataset(samples), n, "frames", (F, 3, H, H))
    RAN[f"raw frames: {outcome}"] += 1


@pytest.fixture(scope="module")
def frames_model():
    from sim.models.vision import build_encoder

    encoder = build_encoder("tiny", arch={"channels": 4, "grid": [2, 2]}, preprocessing={"image_size": H})
    model = SimV0Model(
        llm=TINY_LLM, F=F, K=2, use_cached_vis_feats=False, vision_encoder=encoder, telemetry_hidden=16, head_hidden=0
    )
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3)
    return model, opt, NonFiniteGuard(max_consecutive=10**9)


def test_the_properties_ran_many_cases():
    # Runs after the properties above (pytest keeps file order): a silently filtered-out strategy
    # would otherwise pass with almost nothing tested.
    samples = sum(v for k, v in RAN.items() if k.startswith("samples:"))
    collated = sum(v for k, v in RAN.items() if k.startswith("collated batches:"))
    if samples == 0 or collated == 0:
        pytest.skip("run with the property tests above (e.g. the whole file)")
    assert samples >= 150 and collated >= 150, dict(RAN)
    for prefix in ("samples", "collated batches"):
        assert RAN[f"{prefix}: accepted and trained"] > 0, f"no {prefix} case was accepted: the strategy is too hostile"
        assert RAN[f"{prefix}: refused"] + RAN[f"{prefix}: refused, the good rest trained"] > 0, (
            f"no {prefix} case was refused"
        )
