"""A report as people see it: render ``report.html`` in headless Chromium at a laptop's width and
check that nothing on the page is wider than the window (no sideways scrolling, no table or
figure cut off) and that every plot is shown at its own size (100 %) or smaller.

    ./dev bench report_render RUN_DIR/report/report.html              # 1280 px wide window
    ./dev bench report_render report.html --width 1024 --screenshot shots/

A RUN_DIR (a federation run folder) is accepted as well: its report is written first with
``xrayfed report RUN_DIR --format html`` into RUN_DIR/report. Chromium is the system's
(``chromium``, ``chromium-browser``, ``google-chrome``; or ``$XRAYFED_CHROMIUM``); it loads
the file from disk with networking off. Exit status: 0 fits, 1 overflows, 2 no Chromium or no
such file. Prints one line per page: its width against the window's, the elements that stick
out, and each plot's shown size against its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTH = 1280  # px: a common laptop window
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
RESULT_ID = "xrayfed-layout-result"

# Runs in the page once it has loaded: the page's width against the window's, every element whose
# right edge is past the window or that scrolls sideways inside, and each image's shown width
# against its own. The result is written into the page, which Chromium then prints (--dump-dom).
_PROBE = """
<script>
window.addEventListener("load", () => {
  const vw = document.documentElement.clientWidth;
  const out = {viewport: vw, page_width: document.documentElement.scrollWidth, overflowing: [], images: []};
  const name = el => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
      (el.className && typeof el.className === "string" ? "." + el.className.split(" ")[0] : "");
  for (const el of document.querySelectorAll("body *")) {
    const r = el.getBoundingClientRect();
    const ox = getComputedStyle(el).overflowX;
    if (r.width > 0 && r.right > vw + 0.5) out.overflowing.push({element: name(el), right: Math.round(r.right)});
    else if (ox !== "visible" && el.scrollWidth > el.clientWidth + 1)
      out.overflowing.push({element: name(el), scrolls: el.scrollWidth - el.clientWidth});
  }
  for (const img of document.images)
    out.images.push({alt: img.alt, natural: img.naturalWidth, shown: img.clientWidth});
  const pre = document.createElement("pre");
  pre.id = "%s";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
""" % RESULT_ID


def find_chromium() -> str | None:
    """A Chromium or Chrome on this machine (``$XRAYFED_CHROMIUM`` first), or None."""
    env = os.environ.get("XRAYFED_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _flags(width: int, profile: str) -> list[str]:
    return ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
            f"--user-data-dir={profile}", f"--window-size={width},900", "--virtual-time-budget=5000"]


def measure(html: str | Path, width: int = WIDTH, chromium: str | None = None,
            screenshot: Path | None = None, timeout_s: float = 120.0) -> dict:
    """Load ``html`` (a file) in headless Chromium with a ``width`` px window. Returns
    ``{"viewport", "page_width" (px), "overflowing": [{element, right | scrolls}], "images":
    [{alt, natural, shown} (px)]}``; ``screenshot``: also write a PNG of the whole page there."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium; or set XRAYFED_CHROMIUM)")
    text = Path(html).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="xrayfed-render-") as tmp:
        page = Path(tmp) / "page.html"
        probe = text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE
        page.write_text(probe, encoding="utf-8")
        r = subprocess.run([chromium, *_flags(width, str(Path(tmp) / "profile")), "--dump-dom", page.as_uri()],
                           capture_output=True, text=True, timeout=timeout_s)
        m = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', r.stdout, re.S)
        if not m:
            raise RuntimeError(f"Chromium did not render {html} (exit {r.returncode}): {r.stderr[-500:]}")
        from html import unescape

        result = json.loads(unescape(m.group(1)))
        if screenshot is not None:
            height = 900
            # the page's height: a second run that prints it would cost as much as the shot itself
            height = max(height, min(20000, 60 * text.count("<tr>") + 700 * text.count("<img") + 1600))
            flags = [f for f in _flags(width, str(Path(tmp) / "profile")) if not f.startswith("--window-size")]
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([chromium, *flags, f"--window-size={width},{height}",
                            f"--screenshot={Path(screenshot).resolve()}", Path(html).resolve().as_uri()],
                           capture_output=True, timeout=timeout_s)
    return result


def verdict(result: dict) -> tuple[bool, str]:
    """``(fits, one line)`` for a :func:`measure` result."""
    fits = result["page_width"] <= result["viewport"] and not result["overflowing"]
    imgs = result["images"]
    scaled = [i for i in imgs if i["natural"] and i["shown"] != i["natural"]]
    line = (f"page {result['page_width']} px wide in a {result['viewport']} px window: "
            + ("no horizontal overflow" if fits else "OVERFLOW: " + ", ".join(
                f"{o['element']} ({'right edge at ' + str(o['right']) + ' px' if 'right' in o else 'scrolls ' + str(o['scrolls']) + ' px'})"
                for o in result["overflowing"][:8]))
            + f"; {len(imgs)} plot(s) shown at "
            + ("100 %" if not scaled else ", ".join(f"{100 * i['shown'] / i['natural']:.0f} %" for i in imgs)))
    return fits, line


def _report_html(path: Path) -> Path:
    if path.is_dir() and (path / "metrics.jsonl").is_file():
        from xrayfed.common import cli

        if cli.main(["report", str(path), "--format", "html"]) != 0:
            raise SystemExit(2)
        return path / "report" / "report.html"
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, metavar="REPORT_HTML|RUN_DIR")
    ap.add_argument("--width", type=int, default=WIDTH, help="window width in px (default 1280)")
    ap.add_argument("--screenshot", type=Path, default=None, metavar="DIR", help="also write a PNG of each page here")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("report_render: no Chromium found (Debian: apt-get install chromium; or set XRAYFED_CHROMIUM)",
              file=sys.stderr)
        return 2
    ok = True
    for i, p in enumerate(args.paths):
        html = _report_html(p)
        if not html.is_file():
            print(f"report_render: {html}: no such file", file=sys.stderr)
            return 2
        shot = args.screenshot / f"{html.parent.name or 'report'}-{i}.png" if args.screenshot else None
        fits, line = verdict(measure(html, args.width, chromium, shot))
        ok &= fits
        print(f"{html}: {line}" + (f"; screenshot {shot}" if shot else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
