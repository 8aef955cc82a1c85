"""DP enforcement: σ from the budget, ε in the ledger, refusal, no double spend, CSPRNG noise."""

from __future__ import annotations

import json

import pytest
import torch
from scipy import stats

from xrayfed.client.dp import (
    BudgetExceeded,
    PrivacyLedger,
    compute_epsilon,
    csprng_standard_normal,
    plan_dp,
    secure_gaussian_like,
)
from xrayfed.common.config import HospitalConfig, load_config
from xrayfed.common.errors import UserError
from xrayfed.common.privacy.ledger import LedgerError, read_ledger


def hcfg(tmp_path, **over):
    base = {"hospital.name": "h1", "hospital.state_dir": str(tmp_path / "state")}
    base.update(over)
    return load_config(HospitalConfig, None, base)


@pytest.mark.parametrize("eps,rounds,n,batch", [(8.0, 5, 1500, 64), (1.0, 3, 4000, 128), (3.0, 10, 800, 32)])
def test_noise_multiplier_fits_budget(tmp_path, eps, rounds, n, batch):
    cfg = hcfg(tmp_path, **{"privacy.epsilon": eps, "privacy.max_rounds": rounds, "training.batch_size": batch})
    plan = plan_dp(cfg, n)
    assert plan.sample_rate == pytest.approx(batch / n)
    total = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * rounds, plan.delta)
    assert total <= eps
    assert total >= 0.9 * eps  # not wastefully noisy
    # One round more than planned no longer fits.
    assert compute_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * (rounds + 1), plan.delta) > eps


def test_ledger_epsilon_equals_opacus_accountant(tmp_path):
    from opacus.accountants import PRVAccountant

    cfg = hcfg(tmp_path, **{"privacy.epsilon": 6.0, "privacy.max_rounds": 4})
    plan = plan_dp(cfg, 1000)
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    ledger.ensure_header(plan)
    for r in range(1, 4):
        ledger.charge(plan, federation="f", server_round=r, key=f"k{r}")
    recs = [r for r in read_ledger(tmp_path / "state" / PrivacyLedger.FILE) if r["event"] == "train"]
    assert [r["round"] for r in recs] == [1, 2, 3]
    for i, rec in enumerate(recs, start=1):
        acc = PRVAccountant()
        for prev in recs[:i]:
            # recompute from the logged (q, σ, steps) only, step by step through Opacus' own API
            for _ in range(prev["steps"]):
                acc.step(noise_multiplier=prev["noise_multiplier"], sample_rate=prev["sample_rate"])
        assert rec["epsilon"] == pytest.approx(acc.get_epsilon(delta=rec["delta"]), rel=1e-6, abs=1e-9)
    # ε grows with every round and survives a restart (new ledger object reads the file)
    assert recs[0]["epsilon"] < recs[1]["epsilon"] < recs[2]["epsilon"]
    assert PrivacyLedger(tmp_path / "state", cfg).spent() == pytest.approx(recs[-1]["epsilon"])


def test_budget_refusal_says_why_and_spends_nothing(tmp_path):
    cfg = hcfg(tmp_path, **{"privacy.epsilon": 2.0, "privacy.max_rounds": 2})
    plan = plan_dp(cfg, 500)
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    ledger.ensure_header(plan)
    ledger.charge(plan, federation="f", server_round=1, key="a")
    ledger.charge(plan, federation="f", server_round=2, key="b")
    spent = ledger.spent()
    assert spent <= 2.0
    with pytest.raises(BudgetExceeded) as e:
        ledger.charge(plan, federation="f", server_round=3, key="c")
    msg = str(e.value)
    assert "round 3 refused" in msg and "budget" in msg and "\n" not in msg
    assert ledger.spent() == pytest.approx(spent)  # nothing spent
    events = [r["event"] for r in read_ledger(ledger.path)]
    assert events == ["budget", "train", "train", "refused"]


def test_tampered_ledger_is_refused_naming_the_line(tmp_path):
    cfg = hcfg(tmp_path)
    plan = plan_dp(cfg, 500)
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    ledger.ensure_header(plan)
    ledger.charge(plan, federation="f", server_round=1, key="a")
    ledger.charge(plan, federation="f", server_round=2, key="b")
    lines = ledger.path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["epsilon"] = 0.001  # pretend less was spent
    lines[2] = json.dumps(rec, sort_keys=True)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError) as e:
        PrivacyLedger(tmp_path / "state", cfg)
    assert e.value.line == 3
    # deleting a line is caught too
    del lines[1]
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError) as e:
        read_ledger(ledger.path)
    assert e.value.line == 2


def _ledger_with_rounds(tmp_path, n=3, **over):
    cfg = hcfg(tmp_path, **{"privacy.epsilon": 8.0, "privacy.max_rounds": 5, **over})
    plan = plan_dp(cfg, 500)
    ledger = PrivacyLedger(tmp_path / "state", cfg)
    ledger.ensure_header(plan)
    for r in range(1, n + 1):
        ledger.charge(plan, federation="f", server_round=r, key=f"k{r}")
    return cfg, ledger


def test_rechained_ledger_without_the_key_is_refused(tmp_path):
    """Edit a line (fewer steps, lower ε) and recompute the whole chain as an attacker without the
    ledger key would (SHA-256, or HMAC under a guessed key): refused, naming the line."""
    import hashlib
    import hmac

    from xrayfed.common.privacy.ledger import GENESIS, _canonical

    cfg, ledger = _ledger_with_rounds(tmp_path)
    honest = ledger.spent()
    recs = read_ledger(ledger.path)
    for forge in (lambda prev, body: hashlib.sha256(prev.encode() + b"\n" + _canonical(body)).hexdigest(),
                  lambda prev, body: hmac.new(b"x" * 32, prev.encode() + b"\n" + _canonical(body),
                                              hashlib.sha256).hexdigest()):
        prev, out = GENESIS, []
        for r in recs:
            body = {k: v for k, v in r.items() if k != "hash"}
            if body.get("event") == "train":
                body["steps"], body["epsilon"] = 1, 0.04
            body["prev_hash"] = prev
            prev = forge(prev, body)
            out.append(json.dumps(dict(body, hash=prev), sort_keys=True))
        ledger.path.write_text("\n".join(out) + "\n")
        (tmp_path / "state" / "privacy-ledger.head").write_text(json.dumps({"seq": len(out) - 1, "hash": prev}))
        with pytest.raises(LedgerError) as e:
            PrivacyLedger(tmp_path / "state", cfg)
        assert e.value.line == 1 and "\n" not in str(e.value)
    assert honest > 0.04


def test_ledger_cut_short_or_deleted_is_detected(tmp_path):
    cfg, ledger = _ledger_with_rounds(tmp_path)
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text("\n".join(lines[:2]) + "\n")  # last two rounds removed: ε would go down
    with pytest.raises(LedgerError, match="lines were removed from the end"):
        PrivacyLedger(tmp_path / "state", cfg)
    head = tmp_path / "state" / "privacy-ledger.head"
    saved = head.read_text()
    head.unlink()  # ... and the anchor deleted as well
    with pytest.raises(LedgerError, match="head anchor privacy-ledger.head is missing"):
        PrivacyLedger(tmp_path / "state", cfg)
    head.write_text(saved)
    ledger.path.unlink()  # the whole ledger deleted: the anchor remains
    with pytest.raises(LedgerError, match="ledger file is missing"):
        PrivacyLedger(tmp_path / "state", cfg)
    # the ledger key deleted: never a fresh key for an existing ledger
    ledger.path.write_text("\n".join(lines) + "\n")
    (tmp_path / "state" / "ledger.key").unlink()
    with pytest.raises(UserError, match="ledger key .* is missing"):
        PrivacyLedger(tmp_path / "state", cfg)


def test_ledger_key_file_kept_outside_the_state_folder(tmp_path):
    """With [hospital] ledger_key_file the key is not beside the ledger; the chain verifies only with it."""
    keyfile = tmp_path / "keys" / "ledger.key"
    keyfile.parent.mkdir()
    keyfile.write_text("ab" * 32)
    keyfile.chmod(0o600)
    cfg, ledger = _ledger_with_rounds(tmp_path, n=2, **{"hospital.ledger_key_file": str(keyfile)})
    assert not (tmp_path / "state" / "ledger.key").exists()
    assert len(PrivacyLedger(tmp_path / "state", cfg).train_records()) == 2
    with pytest.raises(UserError):  # the default location has no key: cannot verify
        read_ledger(ledger.path)
    keyfile.write_text("cd" * 32)
    with pytest.raises(LedgerError, match="line 1: hash does not match"):
        PrivacyLedger(tmp_path / "state", cfg)


def test_plan_refuses_bad_budgets_with_one_line(tmp_path):
    from xrayfed.common.errors import UserError as UE

    cases = [({"privacy.delta": 0.5}, 360, r"privacy.delta = 0.5: must be below 1/N = 0.00278 .* N = 360"),
             ({"privacy.epsilon": 1e-6}, 1000, r"privacy.epsilon = 1e-06 .* cannot be met"),
             ({"privacy.max_rounds": 10_000, "training.local_epochs": 20.0}, 1000, r"max_rounds = 10000 .* steps")]
    for over, n, msg in cases:
        with pytest.raises(UE, match=msg) as e:
            plan_dp(hcfg(tmp_path, **over), n)
        assert "\n" not in str(e.value)
    from xrayfed.common.config import HospitalConfig, load_config

    with pytest.raises(UE, match=r"privacy.max_rounds: Input should be less than or equal to 10000"):
        load_config(HospitalConfig, None, {"privacy.max_rounds": 10**7})


def test_csprng_noise_is_standard_normal():
    z = csprng_standard_normal(200_001).numpy()
    assert z.shape == (200_001,)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-4
    ref = torch.zeros(300, 400)
    noise = secure_gaussian_like(ref, std=2.5)
    assert noise.shape == ref.shape and noise.dtype == ref.dtype
    assert noise.std().item() == pytest.approx(2.5, rel=0.02)
    # fresh randomness every call
    assert not torch.equal(secure_gaussian_like(ref, 1.0), secure_gaussian_like(ref, 1.0))


def test_the_sigma_search_meets_the_budget_within_its_tolerance_in_few_calls():
    import math

    from xrayfed.client.dp.planning import MAX_SIGMA, smallest_sigma
    from xrayfed.common.privacy.accounting import compute_epsilon

    calls = []

    def gaussian(sigma):  # a closed form: ε of the Gaussian mechanism's rough bound, decreasing in σ
        calls.append(sigma)
        if sigma < 1e-3:  # as the accountant does at tiny σ
            raise OverflowError
        return math.sqrt(2 * math.log(1.25 / 1e-5)) / sigma

    for target in (0.3, 1.0, 8.0, 50.0, 500.0):
        calls.clear()
        s = smallest_sigma(gaussian, target, tolerance=0.01)
        assert target - 0.01 <= gaussian(s) <= target
        assert len(calls) <= 14, (target, len(calls))
    # the accountant itself: ε at the found σ is within [target − 0.01, target], and σ − 1 % is over it
    for q, steps, rounds in ((0.25, 21, 5), (1.0, 2, 20)):
        def eps_of(sigma):
            return compute_epsilon([(sigma, q, steps)] * rounds, 1e-5)

        s = smallest_sigma(eps_of, 8.0)
        assert 7.99 <= eps_of(s) <= 8.0
        assert eps_of(s * 0.99) > 8.0
    with pytest.raises(ValueError):
        smallest_sigma(lambda s: 1e9, 1.0)  # no σ up to MAX_SIGMA helps
    assert MAX_SIGMA >= 1e6

    def broken(sigma):  # an accountant that gives NaN or runs out of memory below σ = 3 never "meets" there
        if sigma < 2:
            return float("nan")
        if sigma < 3:
            raise MemoryError
        return gaussian(sigma)

    s = smallest_sigma(broken, 1.0)
    assert s >= 3 and broken(s) <= 1.0

    def noisy(sigma):  # ε that jumps around near the target: the search still stops, at a σ seen to meet it
        calls.append(sigma)
        return gaussian(sigma) * (1.3 if int(sigma * 1e6) % 2 else 0.7)

    calls.clear()
    s = smallest_sigma(noisy, 5.0, max_calls=20)
    assert len(calls) <= 21 and noisy(s) <= 5.0
