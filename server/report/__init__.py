"""``xrayfed report``: how much privacy budget was spent, what is left, what it bought.

Two kinds of report, each written as Markdown, a self-contained HTML page (plots embedded as
base64 PNG) and JSON (schema: :class:`Report`, ``xrayfed report --schema``):

* **federation** — ``xrayfed report RUN_DIR`` (the operator): every hospital's ε per round as
  reported to the server (``RUN_DIR/metrics.jsonl``), which hospitals trained in each round,
  the largest ε in the federation, the model's AUC per round and the privacy–utility curve.
  Hospital ledgers found under ``RUN_DIR/hospitals/NAME/privacy-ledger.jsonl`` (demo runs) or
  given with ``--ledger`` are verified and used for the per-hospital detail.
* **hospital** — ``xrayfed report --ledger LEDGER`` (a hospital, its own ledger only).

Each opens in plain words (:func:`~xrayfed.server.report.render.plain_words`): the privacy unit,
what protected the run (TLS, hospital authentication, SecAgg+, encryption at rest: recorded by
the server with every round), each hospital's training-set size, the rounds and their times, a
round resent after a restart, and what left the hospitals without DP.

Every ε gets a second opinion from an accountant independent of training (Google's
dp-accounting; tolerance in :mod:`xrayfed.common.privacy.accounting`). A ledger whose hash chain is
broken is refused, naming the line. Reports carry aggregate numbers only, never patient data.

The package: :mod:`~xrayfed.server.report.schema` (the JSON schema), :mod:`~.build` (from
ledgers and metrics), :mod:`~.findings` (warnings), :mod:`~.render` (Markdown, HTML, JSON),
:mod:`~.plots` (PNG figures), :mod:`~.command` (``xrayfed report``).
"""

from xrayfed.server.report.build import (  # noqa: F401  (the public API)
    build_federation_report,
    build_hospital_report,
    hospital_from_ledger,
    read_metrics,
    resolve_ledger,
)
from xrayfed.server.report.findings import hospital_findings  # noqa: F401
from xrayfed.server.report.render import (  # noqa: F401
    parse_formats,
    plain_words,
    render_html,
    render_json,
    render_markdown,
    summary_table,
    write_report,
)
from xrayfed.server.report.schema import (  # noqa: F401
    REFERENCE_POINTS,
    Finding,
    HospitalReport,
    Report,
    json_schema,
    privacy_level,
)
