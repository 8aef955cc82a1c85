"""The server's step for many small hospitals (``[federation] strategy = "auto"``), the model
width `xrayfed simulate` plans for them, and the round-to-round stability it reports.
(`simulate --ray-address` on a Ray cluster: tests/test_simulation.py, beside the other tests
that start Ray.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from xrayfed.server.aggregation import HospitalPlan, average_noise_ratio
from xrayfed.server.model_plan import NARROW_NOISE_RATIO, NARROWEST_WIDTH, num_weights, recommend_model
from xrayfed.server.stability import round_stability
from xrayfed.server.strategy import AUTO_LOW_NOISE, auto_server_step

D = 41_921  # weights of the 28 px default model


def plan(n: int, sigma: float, steps: int, batch: int | None = None) -> HospitalPlan:
    b = batch or n
    return HospitalPlan(num_examples=n, noise_multiplier=sigma, sample_rate=b / n, steps=steps, max_grad_norm=1.0)


def test_noise_of_the_mean_grows_with_small_batches_and_falls_with_more_hospitals():
    big = average_noise_ratio([(plan(1412, 1.71, 5, 353), 1412)] * 3, D)
    small = average_noise_ratio([(plan(42, 3.8, 2), 42)] * 100, D)
    assert big < 0.5 < small  # 3 hospitals of 1,412 scans vs 100 of 42 at ε = 8 over 20 rounds
    # σC/B per step, momentum gains a_k = (1 − 0.9^k)/0.1: by hand for one hospital of 2 steps
    a = [1.0, 1.9]
    by_hand = math.sqrt(D) * 3.8 / 42 * math.hypot(*a) / sum(a)
    assert average_noise_ratio([(plan(42, 3.8, 2), 1)], D) == pytest.approx(by_hand)
    assert small == pytest.approx(by_hand / 10)  # 100 equal hospitals: 1/√N
    # weights count: one large hospital dominates the mean and its noise
    mixed = average_noise_ratio([(plan(42, 3.8, 2), 42), (plan(1412, 1.71, 5, 353), 1412)], D)
    assert mixed < average_noise_ratio([(plan(42, 3.8, 2), 1), (plan(1412, 1.71, 5, 353), 1)], D)
    assert math.isnan(average_noise_ratio([], D))


def test_the_noise_of_a_sampled_round_is_that_of_its_sample_in_any_order():
    """`sampled_noise_ratio`: a round that aggregates k of N hospitals carries the noise of a mean
    over k; the answer does not depend on the order the hospitals are listed in; all of them,
    none, and Adam hospitals give what the whole set gives."""
    import random

    from xrayfed.server.aggregation import sampled_noise_ratio

    equal = [(plan(42, 3.8, 2), 42.0)] * 16
    whole = average_noise_ratio(equal, D)
    assert sampled_noise_ratio(equal, D, 4) == pytest.approx(2 * whole)  # any 4 of 16 equal ones: √(16/4)
    assert sampled_noise_ratio(equal, D, None) == sampled_noise_ratio(equal, D, 16) == sampled_noise_ratio(equal, D, 99) == whole
    mixed = [(plan(n, 3.8, 2), float(n)) for n in range(20, 120, 5)]
    shuffled = list(mixed)
    random.Random(1).shuffle(shuffled)
    assert sampled_noise_ratio(shuffled, D, 5) == sampled_noise_ratio(mixed, D, 5) > average_noise_ratio(mixed, D)
    assert math.isnan(sampled_noise_ratio([], D, 3))
    adam = [(HospitalPlan(42, 3.8, 1.0, 2, 1.0, momentum=0.0, adam=True), 42.0)] + equal * 60
    assert math.isnan(sampled_noise_ratio(adam, D, 2))  # one Adam hospital in 961: still nothing to judge


def test_the_step_for_a_run_counts_the_hospitals_a_round_samples():
    """`recommend_step` (what `simulate` prints at its end) from metrics rows: each hospital's plan
    pinned at its first update, weights capped as the server caps them, the noise of a round of
    ``per_round`` of them."""
    from xrayfed.server.stability import per_round, recommend_step

    rows = [{"hospital": f"h{i}", "status": "trained", "num_examples": 42, "noise_multiplier": 3.8,
             "sample_rate": 1.0, "steps": 2, "max_grad_norm": 1.0, "momentum": 0.9} for i in range(100)]
    everyone = recommend_step(rows, D)
    assert everyone.ratio == pytest.approx(average_noise_ratio([(plan(42, 3.8, 2), 42.0)] * 100, D))
    assert recommend_step(rows, D, per_round=25).ratio == pytest.approx(2 * everyone.ratio)
    assert recommend_step(rows, D, max_weight=10).ratio == pytest.approx(everyone.ratio)  # equal caps: equal weights
    assert per_round(0.25, 2, 100) == 25 and per_round(0.01, 3, 100) == 3 and per_round(1.0, 2, 7) == 7
    assert per_round(0.5, 9, 4) == 4  # never more than are connected


def test_auto_keeps_the_low_noise_step_and_drops_momentum_when_the_mean_is_mostly_noise():
    assert (auto_server_step(0.3).momentum, auto_server_step(0.3).lr) == AUTO_LOW_NOISE
    assert (auto_server_step(math.nan).momentum, auto_server_step(math.nan).lr) == AUTO_LOW_NOISE
    # 100 hospitals of 42 scans over 20 rounds (ρ 1.37) keep it: it led on validation there
    assert (auto_server_step(1.4).momentum, auto_server_step(1.4).lr) == AUTO_LOW_NOISE
    # and 30 of about 75 patients at 224 px (ρ 2.06): FedAvg at lr 0.91 swung there every other round
    assert (auto_server_step(2.06).momentum, auto_server_step(2.06).lr) == AUTO_LOW_NOISE
    assert (auto_server_step(3.0).momentum, auto_server_step(3.0).lr) == AUTO_LOW_NOISE
    noisy = auto_server_step(3.5)
    assert noisy.momentum == 0 and noisy.lr == pytest.approx((3.0 / 3.5) ** 4)
    assert auto_server_step(3.0001).lr == pytest.approx(1.0, abs=1e-3)  # no jump in lr at the threshold
    assert auto_server_step(4.0).lr < noisy.lr < 1.0  # the noisier, the smaller
    assert auto_server_step(5.4).lr == auto_server_step(100).lr == 0.1  # never below the floor
    assert noisy.toml() == 'strategy = "fedavgm", server_momentum = 0, server_lr = 0.54'  # what simulate prints
    assert auto_server_step(0.3).toml() == 'strategy = "fedavgm", server_momentum = 0.5, server_lr = 1'
    assert noisy.describe() == "FedAvg with server lr 0.54: DP noise in the mean update 3.50 × its largest signal"


def _replies(n: int, units: int, sigma: float, steps: int, state: dict, shift: float):
    """``n`` honest-looking training replies of hospitals with ``units`` examples each (plan σ,
    q = 1, ``steps``), every update the global ``state`` + ``shift`` on every weight."""
    from test_adversaries import _reply

    out = {"status": "trained", "ledger": {"head": "0" * 64},
           "state_dict": {k: v + shift if v.is_floating_point() else v for k, v in state.items()},
           "metrics": {"num-examples": units, "epsilon": 1.0, "noise_multiplier": sigma, "sample_rate": 1.0,
                       "steps": steps, "max_grad_norm": 1.0, "momentum": 0.9}}
    return [_reply(10 + i, f"h{i}", out) for i in range(n)]


@pytest.mark.parametrize("n, units, sigma, steps, momentum",
                         [(3, 1412, 0.2, 5, 0.5), (100, 42, 3.8, 2, 0.5), (30, 10, 3.0, 5, 0.0)])
def test_the_strategy_chooses_its_step_from_the_replies_plans(n, units, sigma, steps, momentum):
    """Through the federation's own strategy (Flower's FedAvgM underneath): a few large hospitals
    and a hundred of 42 scans keep server momentum 0.5 and lr 1; thirty of 10 scans, whose mean
    update is mostly noise (ρ above 3), get no momentum and the noise-scaled lr — and the global
    model moves by exactly that lr × the mean update."""
    import numpy as np

    from flwr.app import ArrayRecord

    from xrayfed.common.config import FederationConfig
    from xrayfed.common.model import build_model, default_model
    from xrayfed.server.strategy import XrayAuto, make_strategy

    spec = default_model(28, num_outputs=1)  # 41,921 weights
    cfg = FederationConfig.model_validate({"image_size": 28, "model": spec.model_dump(),
                                           "federation": {"name": "fed", "lr": 0.125}})
    s = make_strategy(cfg, say=lambda line: said.append(line))
    said: list[str] = []
    assert isinstance(s, XrayAuto)
    state = build_model(spec).state_dict()
    s.current_arrays = ArrayRecord(state)
    s.reference = {k: v.numpy() for k, v in state.items()}
    arrays, _ = s.aggregate_train(1, _replies(n, units, sigma, steps, state, 1e-3))
    step = s.steps[1]
    assert step.momentum == momentum and said and f"round 1: server step {step.describe()}" == said[0]
    d = sum(v.numel() for v in state.values() if v.is_floating_point())
    want = auto_server_step(average_noise_ratio([(HospitalPlan(units, sigma, 1.0, steps, 1.0), units)] * n, d))
    assert (step.momentum, step.lr) == (want.momentum, want.lr)
    assert (step.lr < 1) == (units == 10)
    # the many small hospitals' noisy mean (ρ above 1): the operator is told, once, the width a new run would plan
    advice = [line for line in said if "a new run would plan" in line]
    assert len(advice) == (0 if n == 3 else 1) and all("[model] width = 16" in line for line in advice)
    s.aggregate_train(2, _replies(n, units, sigma, steps, state, 1e-3))
    assert len([line for line in said if "a new run would plan" in line]) == len(advice)
    resumed: list[str] = []  # a run resumed after round 5: its first aggregation is round 6, nothing said again
    r = make_strategy(cfg, round_offset=5, say=resumed.append)
    r.current_arrays, r.reference = ArrayRecord(state), {k: v.numpy() for k, v in state.items()}
    r.aggregate_train(1, _replies(n, units, sigma, steps, state, 1e-3))
    assert r.steps[6] == step and not [line for line in resumed if "a new run would plan" in line]
    k = next(k for k, v in state.items() if v.is_floating_point())
    np.testing.assert_allclose(arrays[k].numpy() - state[k].numpy(), step.lr * 1e-3, rtol=1e-3)


def test_the_planned_model_narrows_a_noisy_scatternet_head_and_nothing_else():
    """The width rule: a ScatterNet XrayNet (the small-scan default) halves its width while the
    DP noise in the mean update is above its largest signal, down to width 16; a model whose
    convolutions learn the features (the 224 px default, a torchvision backbone) keeps its width
    however noisy the mean (it lost at width 16 on validation at 224 px, ρ 2.06)."""
    from xrayfed.common.model import default_model

    small, large = default_model(28), default_model(224)
    many = [(plan(42, 3.8, 2), 42)] * 100  # 100 hospitals of 42 scans, ε = 8 over 20 rounds: ρ 1.37 at width 32
    few = [(plan(1412, 1.71, 5, 353), 1412)] * 3  # 3 hospitals of 1,412 scans: ρ below 0.5
    advice = recommend_model(small, many)
    assert advice.changed and advice.spec == small.model_copy(update={"width": 16})
    assert advice.given_ratio == pytest.approx(average_noise_ratio(many, D)) and advice.given_ratio > NARROW_NOISE_RATIO
    assert advice.ratio == pytest.approx(advice.given_ratio * math.sqrt(num_weights(advice.spec) / D))  # noise ∝ √d
    assert advice.ratio <= NARROW_NOISE_RATIO and advice.toml() == "[model] width = 16"
    assert advice.describe().startswith("XrayNet width 16 (16,353 weights): DP noise in the mean update 0.8")
    kept = recommend_model(small, few)
    assert not kept.changed and kept.ratio == kept.given_ratio < NARROW_NOISE_RATIO and "as configured" in kept.describe()
    # a wider head is halved as often as the noise needs, never below the narrowest width
    wide = recommend_model(small.model_copy(update={"width": 64}), many)
    assert wide.spec.width == 16 and wide.given.width == 64
    tiny = [(plan(10, 3.0, 5), 10)] * 30  # 30 hospitals of 10 scans: ρ about 5
    floor = recommend_model(small, tiny)
    assert floor.spec.width == NARROWEST_WIDTH and floor.ratio > NARROW_NOISE_RATIO and "narrowest" in floor.describe()
    # the learned-feature model keeps its width, and so does any model when the noise is unknown
    big = recommend_model(large, many)
    assert not big.changed and big.given_ratio > 1 and "learn the features" in big.describe()
    assert not recommend_model(small, []).changed
    adam = [(HospitalPlan(42, 3.8, 1.0, 2, 1.0, momentum=0.0, adam=True), 42)] * 100
    assert not recommend_model(small, adam).changed and math.isnan(recommend_model(small, adam).ratio)


def test_simulate_plans_the_model_from_the_hospitals_own_plans(tmp_path, capsys):
    """`xrayfed simulate` with no --width: each simulated hospital's DP plan (from its own
    partition, in its privacy unit, as its first reply reports it) decides the width the
    federation runs with, for a round's mean over as many hospitals as the strategy samples, and
    the line gives the operator the [model] key; an operator's --width or [model] is kept."""
    import argparse

    from xrayfed.common.config import FederationConfig, HospitalConfig, load_config
    from xrayfed.common.synthetic import write_npz
    from xrayfed.server import flower_simulation as S
    from xrayfed.server.simulate import simulate

    data = write_npz(tmp_path / "scans.npz", n_train=1200, n_val=60, n_test=100, size=16, task="binary", seed=2)
    own = tmp_path / "own.toml"

    def configs(n: int, rounds: int, width: int | None, fraction: float | None = None, config: str | None = None,
                delta: float = 1e-5):
        out = tmp_path / f"sim-{n}-{rounds}-{width}-{fraction}-{config is not None}-{delta}"
        S._prepare_out(out)
        if config is not None:
            own.write_text(config)
        args = argparse.Namespace(hospitals=n, rounds=rounds, data=data, config=None if config is None else own,
                                  epsilon=8.0, delta=delta, split="iid", alpha=0.5, size_skew=0.0, fraction=fraction,
                                  min_clients=None if fraction is None else 2, image_size=None, local_epochs=None,
                                  batch_size=None, lr=None, width=width, name="plan")
        fed_path, hdir, _, advice = S.write_configs(args, out)
        return load_config(FederationConfig, fed_path), hdir, advice, capsys.readouterr().out

    fed, hdir, advice, said = configs(40, 20, None)  # 40 hospitals of about 30 scans (about 18 patients)
    assert fed.model.width == 16 and advice.changed and advice.given_ratio > NARROW_NOISE_RATIO
    assert "model for 40 hospitals like these: XrayNet width 16" in said and "to fix it: [model] width = 16" in said
    # the planned ρ is the one the hospitals' real replies give the server (patient unit, their own N, σ, q)
    hospitals = [load_config(HospitalConfig, p) for p in sorted(hdir.glob("hospital-*.toml"))]
    one = fed.model_copy(update={"federation": fed.federation.model_copy(update={"rounds": 1})})
    row = simulate(one, hospitals).rows[0]
    assert len(row["hospitals"]) == 40 and all(h["patient_unit"] == 1 for h in row["hospitals"])
    assert row["server_step"]["noise_ratio"] == pytest.approx(advice.ratio, rel=1e-9)
    fed, _, advice, said = configs(3, 5, None)  # 3 of about 400 scans over 5 rounds
    assert fed.model.width == 32 and not advice.changed and advice.ratio <= NARROW_NOISE_RATIO
    assert "model for 3 hospitals like these: XrayNet width 32 (41,921 weights) as configured" in said
    # a quarter of 16 hospitals per round: the noise of a round's mean is that of 4 hospitals
    everyone = configs(16, 5, None)[2]
    sampled = configs(16, 5, None, fraction=0.25)[2]
    assert sampled.given_ratio == pytest.approx(everyone.given_ratio * 2, rel=0.15)
    fed, _, advice, said = configs(40, 20, 32)
    assert fed.model.width == 32 and advice is None and "model for" not in said
    # a plan a hospital would refuse stops the planning before anything runs, naming the hospital
    from xrayfed.common.errors import UserError
    from xrayfed.server.simulate import hospital_plans

    with pytest.raises(UserError, match=r"^hospital hospital-\d+: privacy.delta = 0.09") as refused:
        configs(40, 20, None, delta=0.09)
    assert refused.value.exit_code == 2
    # the server's cap on a hospital's weight is the planner's too
    capped = fed.model_copy(update={"federation": fed.federation.model_copy(update={"max_examples_per_hospital": 5})})
    weights = [w for _, w in hospital_plans(capped, hospitals[:3])]
    assert weights == [5.0, 5.0, 5.0] and all(p.num_examples > 5 for p, _ in hospital_plans(fed, hospitals[:3]))
    # the operator's own federation.toml: its [model] is kept; without one the model is planned, or --width's
    fed, _, advice, _ = configs(40, 20, None, config='image_size = 16\n[federation]\nname = "own"\n[model]\nwidth = 24\n'
                                '\nscattering = true\ndepth = 2\n')
    assert fed.model.width == 24 and advice is None
    assert configs(40, 20, None, config='image_size = 16\n[federation]\nname = "own"\n')[0].model.width == 16
    fed, _, advice, _ = configs(40, 20, 24, config='image_size = 16\n[federation]\nname = "own"\n')
    assert fed.model.width == 24 and fed.model.scattering and advice is None


def test_round_stability_sees_a_model_that_flips_between_rounds():
    flips = round_stability([0.5, 0.898, 0.131, 0.904, 0.116, 0.9, 0.12, 0.91])
    steady = round_stability([0.5, 0.7, 0.85, 0.9, 0.92, 0.93, 0.93, 0.94])
    assert flips.after == steady.after == 2  # the first quarter settles
    assert flips.min_auc == pytest.approx(0.116) and flips.max_drop == pytest.approx(0.788)
    assert steady.min_auc == pytest.approx(0.85) and steady.max_drop == 0.0
    assert steady.std_last < 0.02 < flips.std_last
    assert "lowest 0.116" in flips.line()


@pytest.mark.slow
def test_many_tiny_hospitals_train_a_steady_model_under_the_default_step(tmp_path):
    """30 hospitals of 10 synthetic scans each, ε = 8 over 5 rounds, the real hospital code
    (in-process engine): the mean update is mostly DP noise (ρ ≈ 5). Under the former default
    (FedAvgM, momentum 0.5, lr 1) the global model swung: validation AUC 0.50, 0.37, 0.62, 0.53,
    0.39. Under the default ``auto`` step it must learn and then hold: no fall above 0.1 after
    round 1 and at least 0.6 at the end (measured 0.37, 0.71, 0.82, 0.82, 0.82; 0.42, 0.63, 0.73,
    0.78, 0.78; 0.38, 0.66, 0.74, 0.68, 0.69)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import argparse

    from sweep import add_settings_arguments, run_setting

    from xrayfed.common.config import FederationConfig
    from xrayfed.common.synthetic import write_npz

    data = write_npz(tmp_path / "tiny.npz", n_train=300, n_val=200, n_test=200, size=16, task="binary", seed=0)
    ap = argparse.ArgumentParser()
    add_settings_arguments(ap)
    s = vars(ap.parse_args([]))
    s.update(hospitals=30, rounds=5, image_size=16, split="iid", privacy_unit="scan",
             strategy=FederationConfig().federation.strategy)
    curve = run_setting(s, data)["val_auc_per_round"]
    st = round_stability(curve)
    # The DP noise is never seeded: the bars leave room for its run-to-run spread (measured
    # 0.37-0.42 after round 1, 0.69-0.82 after round 5, falls of at most 0.06) and still fail the
    # former default's swings (falls of 0.09 and 0.14, 0.39 at the end).
    assert st.after == 1, curve
    assert st.max_drop <= 0.1, curve
    assert curve[-1] >= 0.6 and curve[-1] > curve[0] + 0.2, curve
