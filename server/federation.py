"""One federated training run on the server side (called by the thin ServerApp).

Resumes from the run directory's latest checkpoint, runs the remaining rounds with the
configured strategy, and after every round: evaluates the global model on the server's
held-out set (when configured), writes the checkpoint, appends the metrics line and prints
one summary line.

Secure aggregation (``[federation] secure_aggregation = true``): the strategy's ``Grid`` is
wrapped in :class:`xrayfed.server.secagg.SecAggPlusGrid` with the ``[secure_aggregation]``
parameters, so every training round runs Flower's SecAgg+ protocol and the strategy's
``aggregate_train`` - like everything else in this process - only ever receives the sum
(weighted mean) of the hospitals' updates, never one hospital's update. The hospitals'
plaintext records still arrive per hospital: status, num-examples (the weight), ε and the
other DP figures, train_loss (see :mod:`xrayfed.client.client_app`); they are what
metrics.jsonl is made of.

At rest: with a key (``xrayfed server --atrest-key-file`` / ``$XRAYFED_ATREST_KEY_FILE`` /
``$XRAYFED_ATREST_KEY``, inherited by this ServerApp process) the checkpoints are encrypted
(:mod:`xrayfed.server.rundir`).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from xrayfed.common.checkpoint import Checkpoint, strip_prefix
from xrayfed.common.config import FederationConfig
from xrayfed.common.cores import CoreShare
from xrayfed.common.data import load_dataset
from xrayfed.common.errors import UserError
from xrayfed.common.model import build_model
from xrayfed.common.prediction import choose_threshold, compute_metrics, measured_performance
from xrayfed.common.protocol.rounds import RUN_FINISHED_ACTION, SENT_AN_UPDATE, RunFinished
from xrayfed.common.security.atrest import load_checkpoint, load_key
from xrayfed.common.train import predict_logits, scored
from xrayfed.server.polling import breakdown_text, round_breakdown
from xrayfed.server.rundir import RunDir
from xrayfed.server.secagg import SecAggPlusConfig, SecAggPlusGrid
from xrayfed.server.strategy import HospitalsMissing, ledger_anchors, make_strategy, pinned_plans

log = logging.getLogger(__name__)
PREFIX = "[xrayfed]"
#: Seconds the server waits for the hospitals to acknowledge that the run is finished.
FINISHED_TIMEOUT_S = 30.0


def _say(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def _fmt(v: Any, spec: str = ".3f") -> str:
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return "n/a"


def summary_line(row: dict[str, Any]) -> str:
    ev = row.get("eval") or row.get("client_eval") or {}
    eps = ", ".join(
        f"{h['hospital']} ε={_fmt(h.get('epsilon'), '.2f')}{'' if h.get('status') == 'trained' else ' (' + h.get('status', '?') + ')'}"
        for h in row.get("hospitals", [])
    )
    src = "test" if row.get("eval") else "val"
    return (
        f"round {row['round']}: {src} AUC {_fmt(ev.get('auc'))} acc {_fmt(ev.get('accuracy'))} "
        f"| {len(row.get('participants', []))} trained | {eps} | {row.get('duration_s', 0):.1f}s"
        + (f": {breakdown_text(row['timing'])}" if row.get("timing") else "")
    )


def _load_eval_set(cfg: FederationConfig, split: str | None = None, what: str = "evaluation"):
    if cfg.eval.path is None:
        return None
    split = split or cfg.eval.split
    ds = load_dataset(cfg.eval.path, split=split, image_size=cfg.image_size, task=cfg.task,
                      test_fraction=cfg.eval.test_fraction)
    _say(f"server-side {what} on {len(ds)} held-out scans ({split})")
    return ds


def warm_evaluation(cfg: FederationConfig, eval_set, val_set, device) -> threading.Thread | None:
    """Start computing the held-out sets' fixed features (the scattering front's per-scan cache:
    seconds at the first evaluation, then reused every round) in a background thread, while the
    server waits for the hospitals and for round 1's replies; :func:`evaluate_global` is then
    called after ``join()``. It runs the untrained model of ``cfg.model`` (its front has no
    parameters, so the features are those of every round's model) and keeps nothing but that cache.
    None when there is nothing to evaluate. A failure here is only a lost head start: the first
    evaluation computes the features itself (and reports its own error)."""
    sets = [s for s in (val_set, eval_set) if s is not None]
    if not sets:
        return None
    with torch.random.fork_rng(devices=[]):  # here, not in the thread: the run's random stream stays as it was
        model = build_model(cfg.model)

    def work() -> None:
        try:
            with torch.no_grad(), CoreShare() as share:  # co-located with hospitals: its share of the cores
                for ds in sets:  # a loader with its own generator: the global one is the main thread's
                    predict_logits(model, ds, device, generator=torch.Generator(), after_batch=share.adjust)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.debug("warming the server-side evaluation up failed: %s", e)

    t = threading.Thread(target=work, name="xrayfed-eval-warmup", daemon=True)
    t.start()
    return t


def evaluate_global(model, cfg: FederationConfig, eval_set, val_set, device) -> dict[str, Any]:
    """Server-side figures of one global model: the operating point chosen on ``val_set`` (no
    hospital trains on it; see :func:`~xrayfed.common.prediction.choose_threshold`) and the
    metrics on ``eval_set`` at that threshold (``threshold``, ``threshold/<label>``), plus
    ``val_auc``; ``performance``: per-class sensitivity/specificity at that threshold on
    ``eval_set`` (the held-out test scans; :func:`~xrayfed.common.prediction.measured_performance`),
    or ``None`` without one — what the patient is told with a prediction."""
    out: dict[str, Any] = {}
    threshold = performance = None
    with CoreShare() as share:  # co-located with hospitals (a demo): the cores they leave idle
        if val_set is not None:
            vl, vy = predict_logits(model, val_set, device, after_batch=share.adjust)
        if eval_set is not None:
            el, ey = predict_logits(model, eval_set, device, after_batch=share.adjust)
    if val_set is not None:
        threshold = choose_threshold(cfg.task, vl, vy)
        out["val_auc"] = compute_metrics(cfg.task, vl, vy)["auc"]
    if eval_set is not None:
        out.update(scored(cfg.task, el, ey, threshold))
        performance = measured_performance(cfg.task, el, ey, threshold, split=cfg.eval.split)
    if threshold is not None:
        if cfg.task.kind == "binary":
            out["threshold"] = threshold[0]
        else:
            out.update({f"threshold/{n}": t for n, t in zip(cfg.task.class_names, threshold)})
    return {"metrics": out, "threshold": threshold, "performance": performance}


def initial_state(cfg: FederationConfig, atrest_key=None) -> dict:
    """The round-0 global model from ``[federation] initial_model`` (an xrayfed checkpoint,
    encrypted at rest or not): every layer is taken from it; only the classification head is
    kept fresh (the last layer) when the checkpoint was trained for a different task (other classes). A
    different architecture is refused before any round."""
    path = cfg.federation.initial_model
    ckpt = load_checkpoint(path, atrest_key)
    mine = cfg.model.model_dump(exclude={"num_outputs", "pretrained_path"})
    theirs = ckpt.model.model_dump(exclude={"num_outputs", "pretrained_path"})
    if mine != theirs:
        diff = ", ".join(f"{k} {theirs[k]!r} (federation: {mine[k]!r})" for k in mine if mine[k] != theirs[k])
        raise UserError(f"federation.initial_model {path}: another architecture: {diff}")
    state = build_model(cfg.model).state_dict()
    theirs_sd = strip_prefix(ckpt.state_dict)
    fresh = [k for k in state if k not in theirs_sd or tuple(theirs_sd[k].shape) != tuple(state[k].shape)]
    same_task = ckpt.task == cfg.task
    if same_task and fresh:
        raise UserError(f"federation.initial_model {path}: its weights do not fit the model ({fresh[0]})")
    if not same_task:  # the head (the last layer: weight and bias in every supported architecture) starts fresh
        fresh = sorted(set(fresh) | set(list(state)[-2:]), key=list(state).index)
    for k in state:
        if k not in fresh:
            state[k] = theirs_sd[k].clone()
    _say(f"starting from {path} (model {ckpt.model_version}, {ckpt.task.kind} {list(ckpt.task.class_names)}"
         + (f"; new head for {list(cfg.task.class_names)}: {', '.join(fresh)}" if fresh else "") + ")")
    return state


def run_security(cfg: FederationConfig, atrest_key=None, simulated: bool = False) -> dict[str, Any]:
    """What protected a run, as this server process was configured: recorded with every metrics
    row (a restart may change it), read by ``xrayfed report``. A simulation (one machine, no
    network) has no transport to protect: TLS and hospital authentication are off there."""
    return {
        "transport": "simulation" if simulated else "grpc",
        "tls": not simulated and not cfg.network.tls.insecure,
        "hospital_auth": not simulated and cfg.network.auth_enabled,
        "secure_aggregation": bool(cfg.federation.secure_aggregation),
        "encrypted_at_rest": atrest_key is not None,
    }


def announce_finished(grid, cfg: FederationConfig, rounds: int, timeout_s: float = FINISHED_TIMEOUT_S) -> int:
    """Tell every hospital connected now that this run is over after ``rounds`` rounds (a
    :class:`~xrayfed.common.protocol.rounds.RunFinished` query): each one's ``xrayfed client``
    then stops instead of waiting for a server that will not come back. Waits at most
    ``timeout_s`` seconds for the acknowledgements; returns how many hospitals acknowledged.

    Only a finished run sends it: a server that is killed or stops before its last round sends
    nothing, so the hospitals keep waiting for it to resume."""
    from flwr.app import Message
    from flwr.app.message_type import MessageType

    nodes = sorted(grid.get_node_ids())
    if not nodes:
        return 0
    note = RunFinished(federation=cfg.federation.name, rounds=rounds)
    msgs = [Message(content=note.to_content(), dst_node_id=n, message_type=f"{MessageType.QUERY}.{RUN_FINISHED_ACTION}")
            for n in nodes]
    try:
        replies = list(grid.send_and_receive(msgs, timeout=timeout_s))
    except Exception as e:  # noqa: BLE001 - the run is done either way; the hospitals can be stopped by hand
        _say(f"could not tell the hospitals that the run is finished ({type(e).__name__}); stop their "
             "`xrayfed client` by hand")
        return 0
    acked = sum(1 for r in replies if not r.has_error())
    _say(f"told the {len(nodes)} connected hospital(s) that the run is finished ({acked} acknowledged); "
         "their `xrayfed client` exits")
    return acked


def run_federation(grid, cfg: FederationConfig, flwr_run_id: str = "", atrest_key=None,
                   simulated: bool = False) -> RunDir:
    """Run the configured federation on ``grid``; ``atrest_key`` (default: from the environment)
    encrypts the checkpoints; ``simulated``: Flower's Simulation Engine (no network)."""
    if atrest_key is None:
        atrest_key = load_key()
    calls = getattr(grid, "calls", None)  # each exchange's timing (xrayfed.server.polling.PromptGrid)
    run = RunDir(cfg.federation.run_dir, key=atrest_key).create()
    if not run.config_path.is_file():  # started without `xrayfed server` (which writes it)
        run.write_config(cfg)
    torch.manual_seed(cfg.federation.seed)

    latest = run.load_latest()
    if latest is not None:
        if latest.model != cfg.model or latest.task != cfg.task or latest.image_size != cfg.image_size:
            raise UserError(
                f"{run.latest_checkpoint()}: the checkpoint's model/task/image size differ from the config; "
                "use a new run_dir for a different model"
            )
        start_round = latest.round
        state = latest.state_dict
        _say(f"resuming from checkpoint of round {start_round} ({run.latest_checkpoint()})")
    else:
        start_round = 0
        state = build_model(cfg.model).state_dict()
        if cfg.federation.initial_model is not None:
            state = initial_state(cfg, atrest_key)
    remaining = cfg.federation.rounds - start_round
    if remaining <= 0:
        _say(f"all {cfg.federation.rounds} rounds are done (latest checkpoint: round {start_round})")
        if not simulated:  # simulated hospitals have no `xrayfed client` to stop
            announce_finished(grid, cfg, start_round)
        return run

    eval_set = _load_eval_set(cfg)
    val_set = _load_eval_set(cfg, cfg.eval.val_split, "choice of the decision threshold") if cfg.eval.val_split else None
    if eval_set is not None or val_set is not None:
        import sklearn.metrics  # noqa: F401 - seconds to import: now, while the hospitals join, not in round 1
    warm = warm_evaluation(cfg, eval_set, val_set, torch.device("cpu"))

    anchors: dict[str, tuple[int, str]] = {}
    plans: dict = {}
    for row in run.read_metrics():
        ledger_anchors(row.get("hospitals") or [], anchors)
        pinned_plans(row.get("hospitals") or [], plans)
    strategy = make_strategy(cfg, round_offset=start_round, anchors=anchors, say=_say, plans=plans)
    if latest is not None:
        restored = strategy.load_server_state(run.load_server_state(start_round) or {})
        if restored:
            _say(f"server optimizer state restored from round {start_round} ({', '.join(restored)})")
    secure = ""
    if cfg.federation.secure_aggregation:
        sa = cfg.secure_aggregation
        grid = SecAggPlusGrid(grid, SecAggPlusConfig.from_section(sa))
        def _n(v: float, of: str) -> str:
            return f"{v:.0%} of {of}" if v <= 1.0 else f"{int(v)}"

        secure = (f", SecAgg+ (shares k = {_n(sa.num_shares, 'the round')}, threshold t = "
                  f"{_n(sa.reconstruction_threshold, 'k')}, clip ±{sa.clipping_range:g}, max_weight {sa.max_weight:g}; "
                  "the server sees only the sum of the updates)")
    device = torch.device("cpu")
    t_round = [time.time()]
    security = run_security(cfg, atrest_key, simulated)
    best = [run.best_so_far()]  # (round, val AUC): model selection on the validation split

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        eval_start = time.time()
        g = strategy.global_round(server_round)
        sd = arrays.to_torch_state_dict()
        row: dict[str, Any] = {
            "round": g,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_id": str(flwr_run_id),
            "federation": cfg.federation.name,
            "security": security,
        }
        result = None
        threshold = performance = None
        if eval_set is not None or val_set is not None:
            if warm is not None:
                warm.join()  # the features it computes are this evaluation's
            model = build_model(cfg.model)
            model.load_state_dict(sd)
            ev = evaluate_global(model, cfg, eval_set, val_set, device)
            threshold, m, performance = ev["threshold"], ev["metrics"], ev["performance"]
            row["eval"] = dict(m)
            result = MetricRecord({k: float(v) for k, v in m.items() if k in ("auc", "accuracy", "loss")})
        eval_s = time.time() - eval_start
        ckpt = Checkpoint(model=cfg.model, task=cfg.task, image_size=cfg.image_size, state_dict=sd, round=g,
                          run_id=str(flwr_run_id), threshold=threshold, performance=performance)
        run.save(ckpt)
        server_state = strategy.server_state()
        if server_state:
            run.save_server_state(g, server_state)
        rows = strategy.train_rows.get(g, [])
        row["hospitals"] = rows
        row["participants"] = [r["hospital"] for r in rows if r.get("status") in SENT_AN_UPDATE]
        eps = [float(r["epsilon"]) for r in rows if r.get("epsilon") is not None]
        row["max_epsilon"] = max(eps) if eps else None
        if g in strategy.client_eval:
            row["client_eval"] = strategy.client_eval[g]
        row["model_version"] = ckpt.model_version
        v = (row.get("eval") or {}).get("val_auc")
        if v is not None and v == v and (best[0] is None or v > best[0][1]):
            best[0] = (g, float(v))
            run.save_best(ckpt)
        if best[0] is not None:
            row["best_round"] = best[0][0]
        row["duration_s"] = round(time.time() - t_round[0], 2)
        if calls is not None:  # where the round's seconds went (the hospitals' own figures in their rows)
            row["timing"] = round_breakdown([c for c in calls if c["start"] >= t_round[0]], t_round[0], eval_start,
                                            eval_s, time.time(), rows)
        t_round[0] = time.time()
        run.append_metrics(row)
        _say(summary_line(row))
        if rows and not row["participants"]:
            _say(f"round {g}: every hospital refused (privacy budgets spent) — nothing more can be trained")
        return result

    _say(
        f"federation {cfg.federation.name!r}: rounds {start_round + 1}..{cfg.federation.rounds}, "
        f"strategy {cfg.federation.strategy}, ≥{cfg.federation.min_clients} hospitals, run dir {run.path}"
        + secure + (", checkpoints encrypted at rest" if atrest_key is not None else "")
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout_s,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=on_round_end,
        )
    except HospitalsMissing as e:
        _say(f"stopped: {e}")
        return run
    _say(f"done: {cfg.federation.rounds} rounds; checkpoints and metrics in {run.path}")
    if best[0] is not None:
        _say(f"best global model on the validation split: round {best[0][0]} (val AUC {best[0][1]:.3f}), "
             f"{run.best_path}: the one to serve and export")
    if not simulated:
        announce_finished(grid, cfg, cfg.federation.rounds)
    return run
