"""bench/federated.py --merge: more runs (DP rows and references) are added to a result file
without re-running (or dropping) the seeds it already holds. The federations are replaced by a
recorder here: this tests the benchmark's bookkeeping, not training (tests/test_accuracy.py
runs the real in-process federation)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def federated(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # it imports its sibling bench/sweep.py
    spec = importlib.util.spec_from_file_location("bench_federated", ROOT / "bench" / "federated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls: list[dict] = []

    def fake_run(s, data, save=None):
        calls.append(s)
        auc = 0.9 + 0.01 * s["seed"] + (0.05 if not s["dp"] else 0.0)
        return {"seed": s["seed"], "dp": s["dp"], "central": s["central"], "test_auc": auc, "val_auc": auc}

    monkeypatch.setattr(mod, "run_inprocess", fake_run)
    return mod, calls


def _main(mod, monkeypatch, out: Path, *extra: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["federated.py", "--data", str(out / "d.npz"), "--engine", "inprocess",
                                      "--epsilons", "8", "--out", str(out), *extra])
    mod.main()
    return json.loads((out / "federated-d-28px.json").read_text())


def test_merge_adds_only_new_seeds_to_dp_rows_and_references(federated, monkeypatch, tmp_path):
    mod, calls = federated
    first = _main(mod, monkeypatch, tmp_path, "--runs", "2", "--reference-runs", "1")
    assert [(c["dp"], c["central"], c["seed"]) for c in calls] == [(1, 0, 0), (1, 0, 1), (0, 0, 0), (0, 1, 0)]
    calls.clear()
    merged = _main(mod, monkeypatch, tmp_path, "--runs", "2", "--reference-runs", "2", "--merge")
    # only the references' seed 1 ran; the DP row's seeds 0 and 1 were kept, not re-run
    assert [(c["dp"], c["central"], c["seed"]) for c in calls] == [(0, 0, 1), (0, 1, 1)]
    assert merged["eps8"]["runs"] == first["eps8"]["runs"]
    for key in ("no_dp", "central"):
        assert [r["seed"] for r in merged[key]["runs"]] == [0, 1]
        assert merged[key]["test_auc"] == pytest.approx((0.95 + 0.96) / 2)
    assert merged["price_of_privacy_auc"]["eps8"] == pytest.approx(0.955 - 0.905)
    # same settings: no "settings_before" appears (it would claim the old runs used others)
    assert "settings_before" not in merged
    calls.clear()
    changed = _main(mod, monkeypatch, tmp_path, "--runs", "2", "--reference-runs", "2", "--merge", "--lr", "0.3")
    assert calls == [] and changed["settings_before"] == merged["settings"]
    # other settings and a row that lacks seeds: refused before anything runs, the file unchanged
    before = (tmp_path / "federated-d-28px.json").read_text()
    with pytest.raises(SystemExit, match=r"row no_dp .*rounds 5 → 20.*seeds \[2\]"):
        _main(mod, monkeypatch, tmp_path, "--runs", "2", "--reference-runs", "3", "--merge", "--rounds", "20")
    assert calls == [] and (tmp_path / "federated-d-28px.json").read_text() == before


def test_merge_refuses_runs_trained_under_other_code_defaults(federated, monkeypatch, tmp_path):
    """A rule in code (here the hospitals' automatic local epochs) changes no flag; the
    settings carry digests of the resolved configs and rules, so ``--merge`` still refuses to
    add seeds to a row whose earlier runs were trained under the old rule."""
    from xrayfed.client import dp as privacy

    mod, calls = federated
    _main(mod, monkeypatch, tmp_path, "--runs", "1", "--references", "0")
    path = tmp_path / "federated-d-28px.json"
    before = path.read_text()
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(privacy, "AUTO_EPOCHS", ((2.0, 10.0), (float("inf"), 50.0)))
        with pytest.raises(SystemExit, match=r"row eps8 .*rules_auto_training [0-9a-f]{12} → [0-9a-f]{12}.*seeds \[1\]"):
            _main(mod, monkeypatch, tmp_path, "--runs", "2", "--references", "0", "--merge")
    assert calls == [] and path.read_text() == before
    # The digests are a pure function of the settings and the code: recomputed (the rule
    # restored), the same; they cover the resolved federation config (the client lr is one of
    # its defaults).
    s = json.loads(before)["settings"]
    assert mod.code_rules(s) == {k: v for k, v in s.items() if k.startswith("rules_")}
    other = mod.code_rules({**s, "lr": 0.3})
    assert other["rules_federation"] != s["rules_federation"] and other["rules_hospital"] == s["rules_hospital"]


def test_an_option_added_since_an_old_run_does_not_count_as_a_change_while_unset(federated):
    mod, _ = federated
    old = {"lr": 0.125, "epsilons": [8.0]}
    assert mod.same_settings(old, {**old, "aspect": None})  # new option, unset: the same settings
    assert not mod.same_settings(old, {**old, "aspect": 0.25})  # set: a change
    assert not mod.same_settings(old, {**old, "lr": 0.5}) and not mod.same_settings(None, old)


def test_references_with_a_smaller_epsilons_settings_get_their_own_rows(federated, monkeypatch, tmp_path):
    """``--reference-epsilons 1``: the no-DP and central runs train with the ε = 1 hospitals'
    settings, land in ``no_dp_at_eps1``/``central_at_eps1`` beside the ε = 8 references, and the
    price of privacy at ε = 1 is taken against them (ε = 8's stays against ``no_dp``)."""
    mod, calls = federated

    def fake_run(s, data, save=None):
        calls.append(s)
        auc = 0.9 if s["dp"] else (0.97 if s["epsilon"] == 8 else 0.93)
        return {"seed": s["seed"], "dp": s["dp"], "central": s["central"], "test_auc": auc, "val_auc": auc}

    monkeypatch.setattr(mod, "run_inprocess", fake_run)
    _main(mod, monkeypatch, tmp_path, "--runs", "1", "--epsilons", "8", "1", "--reference-epsilons", "8")
    assert [(c["dp"], c["central"], c["epsilon"]) for c in calls] == [(1, 0, 8), (1, 0, 1), (0, 0, 8), (0, 1, 8)]
    calls.clear()
    out = _main(mod, monkeypatch, tmp_path, "--runs", "1", "--epsilons", "8", "1", "--reference-epsilons", "1",
                "--merge")
    assert [(c["dp"], c["central"], c["epsilon"]) for c in calls] == [(0, 0, 1), (0, 1, 1)]
    assert out["no_dp"]["test_auc"] == 0.97 and out["no_dp_at_eps1"]["test_auc"] == 0.93
    assert out["central_at_eps1"]["reference_epsilon"] == 1
    assert out["price_of_privacy_auc"] == pytest.approx({"eps8": 0.97 - 0.9, "eps1": 0.93 - 0.9})
    assert "settings_before" not in out  # which references were added is not a training setting


def test_by_default_every_epsilon_gets_references_with_its_own_settings(federated, monkeypatch, tmp_path):
    """Without ``--reference-epsilons`` each DP row is priced against the no-DP run trained with
    its own ε's automatic settings, never against another ε's."""
    mod, calls = federated
    out = _main(mod, monkeypatch, tmp_path, "--runs", "1", "--epsilons", "1", "8")
    assert sorted((c["dp"], c["central"], c["epsilon"]) for c in calls if not c["dp"]) == \
        [(0, 0, 1), (0, 0, 8), (0, 1, 1), (0, 1, 8)]
    assert {"no_dp", "central", "no_dp_at_eps1", "central_at_eps1"} <= set(out)
    assert out["no_dp"]["reference_epsilon"] == 8 and out["no_dp_at_eps1"]["reference_epsilon"] == 1


def test_attach_puts_rows_under_a_prefix_with_their_price():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from attach import attach

    dst = {"eps8": {"test_auc": 0.94, "runs": [1]}, "eps1": {"test_auc": 0.92}, "no_dp": {"test_auc": 0.95}}
    src = {"eps8": {"test_auc": 0.93, "runs": [2]}, "eps1": {"test_auc": 0.89}, "settings": {"unit": "patient"}}
    out = attach(src, dst, "patient_", "price_of_patient_unit_auc")
    assert out["patient_eps8"] == src["eps8"] and out["eps8"] == dst["eps8"] and out["no_dp"] == dst["no_dp"]
    assert out["price_of_patient_unit_auc"]["eps8"] == pytest.approx(0.01)
    assert out["price_of_patient_unit_auc"]["eps1"] == pytest.approx(0.03)
    assert out["attached"]["patient_"]["settings"] == {"unit": "patient"}
