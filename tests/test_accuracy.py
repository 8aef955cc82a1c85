"""Accuracy under DP: the pieces that make the DP model usable — in-process simulation of the real
hospital code, augmentation multiplicity, EMA, the operating point, a public starting model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xrayfed.common.config import FederationConfig, HospitalConfig
from xrayfed.common.model import ModelSpec, build_model
from xrayfed.common.prediction import TaskSpec, choose_threshold, compute_metrics

BINARY = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    from xrayfed.common.synthetic import write_npz

    p = tmp_path_factory.mktemp("d") / "syn.npz"
    write_npz(p, n_train=600, n_val=200, n_test=300, size=28, task="binary", seed=5)
    return p


def _fed(tmp_path, npz, **fed) -> FederationConfig:
    return FederationConfig.model_validate({
        "federation": {"name": "sim", "run_dir": str(tmp_path / "run"), "rounds": 5, **fed},
        "model": {"num_outputs": 1, "width": 16, "weight_standardization": True}, "task": BINARY.to_dict(),
        "image_size": 28,
        "eval": {"path": str(npz), "split": "test", "val_split": "val"},
        "network": {"tls": {"insecure": True}},
    })


def _hospitals(tmp_path, npz, n=2, **training) -> list[HospitalConfig]:
    return [HospitalConfig.model_validate({
        "hospital": {"name": f"h{i}", "state_dir": str(tmp_path / f"state-{i}"), "device": "cpu"},
        "data": {"path": str(npz), "partition": f"{i}/{n}"},
        "privacy": {"epsilon": 8.0, "max_rounds": 5},
        # batch size and local epochs: the hospital's automatic choice (physical batch: speed only)
        "training": {"max_physical_batch_size": 256, **training},
    }) for i in range(n)]


def _auc(fed: FederationConfig, state, split="test") -> float:
    from xrayfed.common.data import load_dataset
    from xrayfed.common.train import evaluate

    model = build_model(fed.model)
    model.load_state_dict(state)
    ds = load_dataset(fed.eval.path, split=split, image_size=28, task=fed.task)
    return evaluate(model, ds, fed.task, torch.device("cpu"))["auc"]


@pytest.fixture(scope="module")
def federated(tmp_path_factory, npz):
    """One simulated federation with the defaults a hospital gets by stating only its budget."""
    from xrayfed.server.simulate import simulate

    tmp = tmp_path_factory.mktemp("fed")
    fed, hs = _fed(tmp, npz), _hospitals(tmp, npz)
    return fed, hs, simulate(fed, hs)


# ----------------------------------------------------------------------------- simulation
def test_in_process_simulation_runs_the_hospital_code_learns_and_charges_the_ledger(federated):
    """The sweep path: 2 hospitals × 5 rounds of the real ``train_round`` (ledger, DP-SGD) in
    one process, with default settings only; the model learns and every hospital's ε is its
    ledger's and the accountant's."""
    from xrayfed.client.dp import PrivacyLedger, plan_dp
    from xrayfed.common.privacy.accounting import compute_epsilon

    fed, hs, res = federated
    assert _auc(fed, res.state_dict) >= 0.9
    for h, reply in zip(hs, res.rows[-1]["hospitals"]):
        ledger = PrivacyLedger(h.hospital.state_dir, h)
        assert [r["event"] for r in ledger.records].count("release") == 5
        plan = plan_dp(h, int(reply["num-examples"]))
        want = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 5, plan.delta, "prv")
        assert reply["epsilon"] == pytest.approx(ledger.spent()) == pytest.approx(want, rel=1e-9)
        assert ledger.spent() <= 8.0


def test_simulation_without_dp_is_benchmark_only_and_charges_nothing(tmp_path, npz):
    from xrayfed.common.config import load_config
    from xrayfed.server.simulate import simulate

    fed, hs = _fed(tmp_path, npz, rounds=1), _hospitals(tmp_path, npz, n=1)
    res = simulate(fed, hs, dp=False)
    assert res.rows[0]["hospitals"][0]["epsilon"] == float("inf")
    assert not (tmp_path / "state-0" / "privacy-ledger.jsonl").exists()
    # and no hospital setting turns DP off
    for key in ("privacy.dp", "privacy.enabled", "training.dp", "privacy.noise_multiplier"):
        with pytest.raises(Exception):
            load_config(HospitalConfig, None, {key: 0})


def test_tan_stand_in_keeps_steps_and_step_noise_at_a_fraction_of_the_compute(tmp_path, npz):
    """``tan_scale=k`` (sweeps only, Sander et al. 2023): each hospital trains its own plan at
    batch B/k and σ/k for the same steps, so the noise in each averaged step (σ/B) is the plan's;
    it sees about 1/k of the examples, still learns, and charges nothing (no ledger, ε = ∞)."""
    from xrayfed.client.dp import plan_dp
    from xrayfed.server.simulate import simulate, tan_plan

    fed, hs = _fed(tmp_path, npz), _hospitals(tmp_path, npz)
    res = simulate(fed, hs, tan_scale=4)
    assert _auc(fed, res.state_dict) >= 0.9
    for h, reply in zip(hs, res.rows[-1]["hospitals"]):
        full = plan_dp(h, int(reply["num-examples"]))
        small = tan_plan(full, 4)
        assert reply["steps"] == small.steps == full.steps
        assert reply["noise_multiplier"] == pytest.approx(full.noise_multiplier / 4)
        assert reply["sample_rate"] == pytest.approx(full.sample_rate / 4)
        assert small.noise_multiplier / small.expected_batch_size == pytest.approx(
            full.noise_multiplier / full.expected_batch_size, rel=0.02)
        # Poisson batches of mean B/4: the examples seen are about a quarter of the real plan's
        assert 0.15 * full.steps * full.expected_batch_size < reply["examples_seen"] < 0.35 * full.steps * full.expected_batch_size
        assert reply["epsilon"] == float("inf")
        assert not (Path(h.hospital.state_dir) / "privacy-ledger.jsonl").exists()
    with pytest.raises(ValueError, match="at least 1"):
        tan_plan(full, 0.5)


def test_fedavgm_server_momentum_moves_further_than_fedavg():
    from xrayfed.server.simulate import ServerOptimizer

    w = {"a": torch.zeros(3)}
    mean = {"a": torch.ones(3)}
    plain = ServerOptimizer().step(w, mean)
    m = ServerOptimizer(momentum=0.9, server_lr=1.0)
    s1 = m.step(w, mean)
    s2 = m.step(s1, {"a": s1["a"] + 1})
    assert torch.equal(plain["a"], mean["a"]) and torch.equal(s1["a"], mean["a"])
    assert torch.allclose(s2["a"], torch.full((3,), 1 + 1.9))  # v = 0.9·1 + 1


def test_in_process_fedadam_is_flowers_fedadam(monkeypatch):
    """The sweeps' FedAdam (``ServerAdam``) takes the same steps as Flower's own strategy, which
    the real server runs: two rounds of example-weighted replies, compared array by array."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAdam
    from flwr.supercore.task_identity import TaskIdentity

    from xrayfed.server.simulate import ServerAdam, weighted_mean

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # a Message needs them
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    gen = torch.Generator().manual_seed(0)
    w = {"conv": torch.randn(4, 3, generator=gen), "bias": torch.randn(4, generator=gen)}
    flower, ours = FedAdam(eta=0.05), ServerAdam(eta=0.05)
    flower.current_arrays = {k: v.numpy().copy() for k, v in w.items()}
    for rnd in (1, 2):
        states = [{k: v + torch.randn(v.shape, generator=gen) * 0.1 for k, v in w.items()} for _ in range(3)]
        counts = [120, 30, 250]
        replies = [Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in st.items()}),
                                                "metrics": MetricRecord({"num-examples": n})}),
                           dst_node_id=1, message_type="train") for st, n in zip(states, counts)]
        arrays, _ = flower.aggregate_train(rnd, replies)
        w = ours.step(w, weighted_mean(states, [float(n) for n in counts]))
        for k in w:
            assert np.allclose(w[k].numpy(), arrays[k].numpy(), rtol=1e-5, atol=1e-6), (rnd, k)
        flower.current_arrays = {k: a.numpy() for k, a in arrays.items()}
    assert not torch.allclose(w["bias"], states[0]["bias"])  # it moved by Adam's step, not to a reply


def test_in_process_simulation_refuses_a_strategy_it_cannot_run(tmp_path, npz):
    from xrayfed.common.errors import UserError
    from xrayfed.server.simulate import simulate

    with pytest.raises(UserError, match=r"'fedprox': the in-process simulation runs fedavg, fedavgm, fedadam"):
        simulate(_fed(tmp_path, npz, strategy="fedprox"), _hospitals(tmp_path, npz))
    assert not (tmp_path / "state-0").exists()  # refused before any hospital trained


def test_cosine_schedule_reaches_the_final_fraction(tmp_path, npz):
    from xrayfed.server.strategy import round_lr

    fed = _fed(tmp_path, npz, rounds=5, lr=1.0, lr_schedule="cosine", lr_final_fraction=0.1)
    lrs = [round_lr(fed, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert round_lr(_fed(tmp_path, npz, lr=0.7), 3) == 0.7


# ----------------------------------------------------------------------------- DP-SGD techniques
def test_augmentation_multiplicity_clips_one_averaged_gradient_per_example():
    """K views of each example → one per-example gradient (their mean) reaches Opacus' clipping,
    so the sensitivity, and hence the accounting, is that of one example."""
    from opacus import GradSampleModule

    from xrayfed.client.augment import random_shift
    from xrayfed.client.dp import average_views

    torch.manual_seed(0)
    model = build_model(ModelSpec(num_outputs=1, width=4, depth=2))
    gsm = GradSampleModule(model)
    b, k = 5, 3
    x = torch.randn(b, 1, 16, 16)
    xv = random_shift(x.repeat_interleave(k, 0), 0.125)
    assert xv.shape == (b * k, 1, 16, 16) and not torch.equal(xv, x.repeat_interleave(k, 0))
    y = torch.randint(0, 2, (b * k, 1)).float()
    torch.nn.functional.binary_cross_entropy_with_logits(gsm(xv), y).backward()
    per_view = {n: p.grad_sample.clone() for n, p in gsm.named_parameters()}
    average_views(gsm, k)
    for n, p in gsm.named_parameters():
        assert p.grad_sample.shape[0] == b
        want = per_view[n].view(b, k, *per_view[n].shape[1:]).mean(1)
        assert torch.allclose(p.grad_sample, want)
        # per-view gradient of view j of example i is its own loss's gradient
    single = build_model(ModelSpec(num_outputs=1, width=4, depth=2))
    single.load_state_dict({kk.removeprefix("_module."): v for kk, v in gsm.state_dict().items()})
    torch.nn.functional.binary_cross_entropy_with_logits(single(xv[:1]), y[:1]).backward()
    name, p0 = next(iter(single.named_parameters()))
    assert torch.allclose(per_view["_module." + name][0], p0.grad, atol=1e-5)


def test_random_shift_translates_with_edge_repeat():
    from xrayfed.client.augment import random_shift

    x = torch.arange(16.0).view(1, 1, 4, 4)
    g = torch.Generator().manual_seed(1)
    out = random_shift(x.repeat(8, 1, 1, 1), 0.25, generator=g)
    for o in out:  # every output is x moved by at most one pixel, edges repeated
        ok = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                r = (torch.arange(4) + dy).clamp(0, 3)
                c = (torch.arange(4) + dx).clamp(0, 3)
                ok |= torch.equal(o[0], x[0, 0][r][:, c])
        assert ok


def _radial(n: int) -> torch.Tensor:
    c = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / (n / 2)  # pixel centres, affine_grid's units
    return (c[:, None] ** 2 + c[None, :] ** 2).sqrt().view(1, 1, n, n)


def test_random_view_rotates_zooms_and_jitters_within_its_ranges():
    """The ranges of TrainingSection are what the views get: a radially symmetric image is
    unchanged by rotation and scaled by 1/zoom by zoom; contrast/brightness is an affine map of
    the pixels with slope within 1 ± c and offset within ± c (before clipping)."""
    from xrayfed.client.augment import random_view
    from xrayfed.common.config import TrainingSection

    g = torch.Generator().manual_seed(0)
    x = _radial(64).repeat(16, 1, 1, 1) * 0.5  # values in [0, 0.71]: inside [−1, 1]
    inner = (slice(None), slice(None), slice(8, 56), slice(8, 56))  # away from the repeated border
    rot = random_view(x, TrainingSection(augment_shift=0, augment_rotate=30), generator=g)
    assert (rot - x)[inner].abs().max() < 0.02
    zoom = random_view(x, TrainingSection(augment_shift=0, augment_zoom=0.2), generator=g)
    ratio = (zoom[inner] / x[inner].clamp_min(1e-3))[:, :, 8:-8, 8:-8].flatten(1)  # ≈ 1/zoom, one per image
    assert (ratio.std(dim=1) < 0.02).all()
    assert ((ratio.mean(1) > 1 / 1.2 - 0.01) & (ratio.mean(1) < 1 / 0.8 + 0.01)).all() and ratio.mean(1).std() > 0.02
    jit = random_view(x, TrainingSection(augment_shift=0, augment_contrast=0.1), generator=g)
    for xi, ji in zip(x.flatten(1), jit.flatten(1)):
        slope, offset = torch.linalg.lstsq(torch.stack([xi, torch.ones_like(xi)], 1), ji[:, None]).solution[:, 0]
        assert 0.9 - 1e-4 <= slope <= 1.1 + 1e-4
        mean = xi.mean()
        assert abs(offset + slope * mean - mean) <= 0.1 + 1e-4  # brightness offset about the mean
    assert random_view(x, TrainingSection(augment_contrast=0.5), generator=g).abs().max() <= 1.0
    assert torch.equal(random_view(x, TrainingSection(augment_shift=0)), x)  # nothing asked: nothing changed


def test_random_view_changes_the_aspect_within_its_range():
    """augment_aspect stretches the width by s and shrinks the height by 1/s (one s per image,
    within [1/(1 + a), 1 + a]): on a ramp along the columns the slope becomes 1/s, on a ramp along
    the rows it becomes s, drawn from the same random numbers."""
    from xrayfed.client.augment import random_view
    from xrayfed.common.config import TrainingSection

    n, a = 64, 0.3
    c = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / (n / 2)
    cols, rows = c[None, :].expand(n, n) * 0.5, c[:, None].expand(n, n) * 0.5
    t = TrainingSection(augment_shift=0, augment_aspect=a)
    out_cols = random_view(cols.repeat(16, 1, 1, 1), t, generator=torch.Generator().manual_seed(3))
    out_rows = random_view(rows.repeat(16, 1, 1, 1), t, generator=torch.Generator().manual_seed(3))
    mid = slice(24, 40)  # the centre, where no border pixel is repeated for s ≤ 1.3

    def slope(img, axis):  # per image, the mean step along `axis` in the centre, against the input's
        d = img[:, 0, mid, mid].diff(dim=axis).mean(dim=(1, 2))
        return d / (0.5 * 2 / n)

    s_cols, s_rows = slope(out_cols, 2), slope(out_rows, 1)  # 1/s and s
    assert torch.allclose(s_cols * s_rows, torch.ones(16), atol=1e-3)
    assert ((s_rows > 1 / (1 + a) - 1e-3) & (s_rows < 1 + a + 1e-3)).all() and s_rows.std() > 0.05


def test_augmented_training_bypasses_the_feature_cache():
    """Augmented views never come back, so they must not fill (and evict) the ScatterNet cache."""
    from xrayfed.common.model import scatter_front as model_mod

    front = model_mod.ScatterFront()
    x = torch.randn(3, 1, 16, 16)
    before = len(model_mod._SCATTER_CACHE._d)
    with torch.no_grad(), model_mod.feature_cache(False):
        off = front(x)
    assert len(model_mod._SCATTER_CACHE._d) == before
    with torch.no_grad():
        on = front(x)
    assert len(model_mod._SCATTER_CACHE._d) == before + 3 and torch.equal(on, off)


def test_views_and_ema_train_under_dp_with_the_same_charge(tmp_path, npz, federated):
    """Augmentation multiplicity and EMA change what is computed, not what is spent."""
    from xrayfed.server.simulate import simulate

    fed = _fed(tmp_path, npz, rounds=1)
    e_plain = [h["epsilon"] for h in federated[2].rows[0]["hospitals"]]
    for i, options in enumerate(({"augment_multiplicity": 2, "ema_decay": 0.9},
                                 {"augment": True, "augment_zoom": 0.1, "augment_rotate": 10, "augment_contrast": 0.2})):
        tricks = simulate(fed, _hospitals(tmp_path / f"b{i}", npz, **options))
        e_tricks = [h["epsilon"] for h in tricks.rows[-1]["hospitals"]]
        assert e_plain == pytest.approx(e_tricks, rel=1e-12)
        assert all(torch.isfinite(v).all() for v in tricks.state_dict.values())
        row = tricks.rows[-1]["hospitals"][0]
        assert row["status"] == "trained" and row["train_loss"] > 0


def test_ema_averages_the_iterates():
    from xrayfed.client.augment import EMA

    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.5)
    for v in (1.0, 1.0, 1.0):
        with torch.no_grad():
            m.weight.fill_(v)
        ema.update(m)
    # warm-up decays min(0.5, (1+t)/(10+t)) = 0.1, 2/11, 0.25
    want = 0.0
    for t in range(3):
        d = min(0.5, (1 + t) / (10 + t))
        want = d * want + (1 - d)
    ema.copy_to(m)
    assert m.weight.item() == pytest.approx(want)


# ----------------------------------------------------------------------------- operating point
def test_threshold_maximises_youden_on_validation_and_is_used_for_the_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    logits = (y * 1.5 + rng.normal(0, 1, 400) - 1.2).reshape(-1, 1)
    [t] = choose_threshold(BINARY, logits, y)
    p = 1 / (1 + np.exp(-logits[:, 0]))
    best = max(((p[y == 1] >= c).mean() + (p[y == 0] < c).mean() - 1) for c in np.unique(p))
    got = compute_metrics(BINARY, logits, y, threshold=t)
    assert got["sensitivity"] + got["specificity"] - 1 == pytest.approx(best)
    at_half = compute_metrics(BINARY, logits, y)
    assert got["sensitivity"] + got["specificity"] >= at_half["sensitivity"] + at_half["specificity"]
    ml = TaskSpec(kind="multilabel", class_names=("a", "b"))
    two = np.stack([logits[:, 0], -logits[:, 0]], 1)
    ts = choose_threshold(ml, two, np.stack([y, 1 - y], 1))
    assert len(ts) == 2 and ts[0] == pytest.approx(t)
    assert choose_threshold(TaskSpec(kind="multiclass", class_names=("a", "b", "c")), np.zeros((3, 3)), [0, 1, 2]) \
        is None


def test_checkpoint_keeps_its_threshold_and_refuses_a_bad_one(tmp_path):
    from xrayfed.common.checkpoint import Checkpoint, from_bytes, to_bytes
    from xrayfed.common.errors import UserError

    spec = ModelSpec(num_outputs=1, width=4, depth=1)
    c = Checkpoint(model=spec, task=BINARY, image_size=28, state_dict=build_model(spec).state_dict(), threshold=[0.31])
    assert from_bytes(to_bytes(c)).threshold == [0.31]
    c.threshold = [1.7]
    with pytest.raises(UserError, match="probabilities"):
        from_bytes(to_bytes(c))
    c.threshold = None
    assert from_bytes(to_bytes(c)).threshold is None


def test_patient_decision_uses_the_models_operating_point():
    from xrayfed.common.prediction import decide

    assert decide(BINARY, [0.7, 0.3], [0.25]) == ["PNEUMONIA"]
    assert decide(BINARY, [0.7, 0.3], None) == ["NORMAL"]
    ml = TaskSpec(kind="multilabel", class_names=("a", "b", "c"))
    assert decide(ml, [0.2, 0.6, 0.4], [0.1, 0.7, 0.4]) == ["a", "c"]
    mc = TaskSpec(kind="multiclass", class_names=("a", "b", "c"))
    assert decide(mc, [0.2, 0.5, 0.3], None) == ["b"]


def test_server_evaluation_reports_metrics_at_the_validation_threshold(npz, federated):
    from xrayfed.common.data import load_dataset
    from xrayfed.common.train import predict_logits
    from xrayfed.server.federation import evaluate_global

    fed, _, res = federated
    state = res.state_dict
    model = build_model(fed.model)
    model.load_state_dict(state)
    val = load_dataset(npz, split="val", image_size=28, task=BINARY)
    test = load_dataset(npz, split="test", image_size=28, task=BINARY)
    ev = evaluate_global(model, fed, test, val, torch.device("cpu"))
    vl, vy = predict_logits(model, val, torch.device("cpu"))
    assert ev["threshold"] == choose_threshold(BINARY, vl, vy)
    tl, ty = predict_logits(model, test, torch.device("cpu"))
    assert ev["metrics"]["sensitivity"] == compute_metrics(BINARY, tl, ty, threshold=ev["threshold"])["sensitivity"]
    assert ev["metrics"]["threshold"] == ev["threshold"][0]


# ----------------------------------------------------------------------------- public starting model
def test_federation_starts_from_a_public_checkpoint(tmp_path, npz, federated):
    """A model trained on 'public' data (here: the model this module's federation trained) is
    the round-0 global model: same task → every weight; another task → every layer but a fresh
    head; another architecture → refused. (The real server using it: tests/test_faults.py.)"""
    from xrayfed.common.checkpoint import Checkpoint, save_checkpoint
    from xrayfed.common.errors import UserError
    from xrayfed.server.federation import initial_state

    fed = federated[0]
    public = federated[2].state_dict
    path = tmp_path / "public.pt"
    save_checkpoint(path, Checkpoint(model=fed.model, task=BINARY, image_size=28, state_dict=public))

    start = _fed(tmp_path, npz, rounds=1, initial_model=str(path))
    state = initial_state(start)
    assert all(torch.equal(state[k], public[k]) for k in public)
    assert _auc(start, state) >= 0.9  # round 0 already knows the finding

    four = FederationConfig.model_validate({**start.model_dump(mode="json"),
                                            "task": {"kind": "multiclass", "class_names": ["a", "b", "c", "d"]}})
    s4 = initial_state(four)
    keys = list(s4)
    assert all(torch.equal(s4[k], public[k]) for k in keys[:-2])
    assert s4[keys[-2]].shape[0] == 4

    other = FederationConfig.model_validate({**start.model_dump(mode="json"),
                                             "model": {**start.model.model_dump(), "width": 8}})
    with pytest.raises(UserError, match="another architecture: width 16 \\(federation: 8\\)"):
        initial_state(other)


def test_a_hospital_states_only_its_budget_and_gets_batch_epochs_and_sigma(tmp_path):
    """Automatic DP-SGD settings from the hospital's own N and ε (never from the server), a value
    in hospital.toml wins, and the choice is written into the ledger's budget line."""
    from xrayfed.client.dp import PrivacyLedger, auto_training, plan_dp
    from xrayfed.common.config import load_config

    assert auto_training(4000, 8.0) == (1000, 5.0)
    assert auto_training(600, 8.0) == (256, 5.0)
    assert auto_training(200, 8.0) == (200, 5.0)  # all of a small hospital's scans
    assert auto_training(100_000, 1.0) == (2048, 2.0)
    assert auto_training(4000, 1.0, batch_size=64, local_epochs=3.0) == (64, 3.0)
    # the same epochs in all, spread over the rounds the budget is planned for
    assert auto_training(4000, 1.0, max_rounds=20) == (1000, 0.5)
    assert auto_training(4000, 8.0, max_rounds=20) == (1000, 1.25)
    assert auto_training(4000, 8.0, local_epochs=3.0, max_rounds=20) == (1000, 3.0)  # hospital.toml wins
    assert auto_training(4000, 8.0, max_rounds=2) == (1000, 5.0)  # a short plan: not longer per round
    long = plan_dp(load_config(HospitalConfig, None, {"privacy.epsilon": 1.0, "privacy.max_rounds": 20}), 2000)
    assert long.local_epochs == 0.5 and long.steps == 2  # q = 500/2000: 0.5 epochs = 2 steps per round
    cfg = load_config(HospitalConfig, None, {"hospital.state_dir": str(tmp_path), "privacy.epsilon": 3.0})
    assert cfg.training.batch_size is None and cfg.training.local_epochs is None
    plan = plan_dp(cfg, 2000)
    assert plan.expected_batch_size == 500 and plan.steps == 20 and plan.settings_source == "auto"
    assert plan.noise_multiplier > 0
    ledger = PrivacyLedger(tmp_path, cfg)
    ledger.ensure_header(plan)
    head = ledger.records[0]
    assert head["batch_size"] == 500 and head["local_epochs"] == 5.0 and head["training_settings"] == "auto"
    fixed = load_config(HospitalConfig, None, {"training.batch_size": 100, "training.local_epochs": 1.0})
    p2 = plan_dp(fixed, 2000)
    assert p2.expected_batch_size == 100 and p2.steps == 20 and p2.settings_source == "hospital.toml"
