"""Put the DP rows of one ``bench/federated.py`` result file into another under a prefix, with the
price of what differs between them.

Used for the privacy unit: the patient-level rows of Kermany run into their own file (their
settings differ, so ``--merge`` rightly refuses to mix them), then go beside the scan-level rows::

    ./dev bench federated --data bench/results/work-kermany-heldout --name kermany-cxr-224-patient \\
        --image-size 224 --split patient --epsilons 8 1 --engine inprocess --references 0 --privacy-unit patient
    ./dev bench attach bench/results/federated-kermany-cxr-224-patient-224px.json \\
        bench/results/federated-kermany-cxr-224-224px.json --prefix patient_ --price price_of_patient_unit_auc

For every ``epsN`` row of SRC, DST gets ``PREFIX + epsN`` (the row as it is: means, spreads and
every run) and ``PRICE[epsN]`` = DST's ``epsN.test_auc`` − SRC's (positive: SRC's setting costs
AUC). DST's other rows are kept; ``PREFIX`` rows already there are replaced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def attach(src: dict, dst: dict, prefix: str, price_key: str) -> dict:
    """``dst`` with ``src``'s ``epsN`` rows under ``prefix`` and their price (see the module)."""
    out = dict(dst)
    price = dict(out.get(price_key) or {})
    for key, row in src.items():
        if not (key.startswith("eps") and isinstance(row, dict) and "test_auc" in row):
            continue
        out[prefix + key] = row
        if isinstance(dst.get(key), dict) and "test_auc" in dst[key]:
            price[key] = float(dst[key]["test_auc"]) - float(row["test_auc"])
    out[price_key] = price
    out.setdefault("attached", {})[prefix] = {"settings": src.get("settings"), "data": src.get("data")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--prefix", required=True, help="e.g. patient_")
    ap.add_argument("--price", required=True, help="key of the price per ε, e.g. price_of_patient_unit_auc")
    args = ap.parse_args()
    merged = attach(json.loads(args.src.read_text()), json.loads(args.dst.read_text()), args.prefix, args.price)
    args.dst.write_text(json.dumps(merged, indent=2) + "\n")
    rows = [k for k in merged if k.startswith(args.prefix)]
    print(f"{args.dst}: {', '.join(rows)}; {args.price} = {merged[args.price]}")


if __name__ == "__main__":
    main()
