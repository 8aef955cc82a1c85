"""Task metrics and config validation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from xrayfed.common.config import FederationConfig, HospitalConfig, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.prediction import TaskSpec, compute_metrics, probabilities


def test_binary_metrics_by_hand():
    task = TaskSpec(kind="binary", class_names=("NORMAL", "PNEUMONIA"))
    y = np.array([0, 0, 1, 1, 1])
    logits = np.array([[-2.0], [0.5], [1.0], [-0.1], [3.0]])  # preds: 0 1 1 0 1
    m = compute_metrics(task, logits, y)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    # AUC: pairs (neg,pos) correctly ordered: neg -2 < all 3 pos; neg 0.5 < 1.0, 3.0 but > -0.1 → 5/6
    assert m["auc"] == pytest.approx(5 / 6)


def test_multiclass_and_multilabel_metrics():
    mc = TaskSpec(kind="multiclass", class_names=("a", "b", "c"))
    logits = np.eye(3)[[0, 1, 2, 0]] * 5
    m = compute_metrics(mc, logits, np.array([0, 1, 2, 1]))
    assert m["accuracy"] == pytest.approx(0.75)
    assert probabilities(mc, logits).sum(axis=1) == pytest.approx(np.ones(4))
    ml = TaskSpec(kind="multilabel", class_names=tuple("abcd"))
    y = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    m = compute_metrics(ml, np.where(y == 1, 2.0, -2.0), y)
    assert m["auc/a"] == 1.0 and np.isnan(m["auc/c"]) and m["auc"] == 1.0 and m["accuracy"] == 1.0


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "hospital.toml"
    bad.write_text("[privacy]\nepsilon = -3\n")
    with pytest.raises(UserError) as e:
        load_config(HospitalConfig, bad)
    assert "privacy.epsilon" in str(e.value) and "-3" in str(e.value) and "\n" not in str(e.value)
    bad.write_text("[privacy]\nepsilonn = 3\n")
    with pytest.raises(UserError, match="privacy.epsilonn: unknown setting"):
        load_config(HospitalConfig, bad)
    bad.write_text("[federation\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(FederationConfig, bad)
    with pytest.raises(UserError, match="task"):
        load_config(FederationConfig, None, {"task.kind": "binary", "task.class_names": ["a", "b", "c"]})


def test_cli_invalid_config_prints_one_line_no_traceback(tmp_path):
    bad = tmp_path / "federation.toml"
    bad.write_text("[federation]\nrounds = 0\n")
    r = subprocess.run([sys.executable, "-m", "xrayfed.common.cli", "server", "--config", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "federation.rounds" in lines[0] and "greater than or equal to 1" in lines[0]


def test_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "hospital.toml"
    f.write_text('[data]\npath = "scans"\n[hospital]\nstate_dir = "state"\n')
    cfg = load_config(HospitalConfig, f)
    assert cfg.data.path == tmp_path / "sub" / "scans"
    assert cfg.hospital.state_dir == tmp_path / "sub" / "state"


def test_the_threshold_is_never_picked_on_the_split_its_figures_are_measured_on(tmp_path):
    """The patient reads sensitivity/specificity on `[eval] split` as scans the model was not tuned on."""
    bad = tmp_path / "federation.toml"
    bad.write_text('[eval]\nsplit = "test"\nval_split = "test"\n')
    with pytest.raises(UserError, match="val_split = 'test' is the test split") as e:
        load_config(FederationConfig, bad)
    assert "\n" not in str(e.value)
    bad.write_text('[eval]\nsplit = "test"\nval_split = "val"\n')
    assert load_config(FederationConfig, bad).eval.val_split == "val"


def test_the_accountant_prints_no_warning_at_q_equal_one():
    import warnings

    from xrayfed.common.privacy import accounting
    from xrayfed.common.privacy.accounting import compute_epsilon

    accounting._opacus_epsilon.cache_clear()  # the accountant itself runs, not a cached answer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps = compute_epsilon([(1.0, 1.0, 3)], 1e-5)
    assert eps > 0 and not caught, [str(w.message) for w in caught]


def test_atomic_write_never_follows_a_link_planted_at_its_temp_name(tmp_path):
    import os

    from xrayfed.common.files import atomic_write

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.chmod(victim, 0o644)
    target = tmp_path / "shared" / "result.html"
    target.parent.mkdir()
    # The name the temp file had when it was predictable (pid only).
    (target.parent / f".{target.name}.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write(target, b"page")
    assert victim.read_text() == "keep" and (victim.stat().st_mode & 0o777) == 0o644
    assert target.read_bytes() == b"page" and (target.stat().st_mode & 0o777) == 0o600
