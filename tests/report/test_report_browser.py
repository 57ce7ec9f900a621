"""The report opened as a person would: headless Chromium loads it without console errors, and a
screenshot shows the charts drawn where the page laid them out.

The page is loaded twice: once instrumented (a probe script, allowed by a hash in the page's CSP,
records errors and the charts' boxes into the DOM, which ``--dump-dom`` returns) and once as shipped,
for the screenshot. Chromium comes from ``scripts/ensure-chromium.sh`` (Debian's ``chromium``).
"""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.report.test_report import record_fixture_runs, text_of
from torchkiln.report import History, render_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (bash scripts/ensure-chromium.sh installs it)",
)
WIDTH = 1280

PROBE = """(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target || {};
    errors.push(e.message ? "error: " + e.message : "failed to load: " + (t.src || t.href || t.tagName));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("rejection: " + e.reason); });
  document.addEventListener("securitypolicyviolation", function (e) {
    errors.push("CSP blocked " + e.violatedDirective + ": " + e.blockedURI);
  });
  var consoleError = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
  function box(el) {
    var r = el.getBoundingClientRect();
    return {x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height};
  }
  window.addEventListener("load", function () {
    var charts = Array.prototype.map.call(document.querySelectorAll("figure.chart svg"), function (svg) {
      var b = box(svg);
      b.kind = svg.closest("figure").getAttribute("data-chart");
      return b;
    });
    var banner = document.querySelector(".banner");
    var out = document.createElement("pre");
    out.id = "kiln-probe";
    out.textContent = JSON.stringify({
      errors: errors, charts: charts, banner: banner ? box(banner) : null,
      width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight
    });
    document.body.appendChild(out);
  });
})();"""


def _chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def _console_messages(stderr: str) -> list[str]:
    """Lines Chromium logs for the page's console (errors, CSP violations, uncaught exceptions)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _instrument(page: str) -> str:
    digest = base64.b64encode(hashlib.sha256(PROBE.encode()).digest()).decode()
    csp_none = "script-src &#39;none&#39;"
    assert csp_none in page, "the report's CSP should forbid scripts"
    page = page.replace(csp_none, f"script-src &#39;sha256-{digest}&#39;", 1)
    return page.replace("<head>", f"<head>\n<script>{PROBE}</script>", 1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("browser")
    history = History(tmp / "history.sqlite")
    ids = record_fixture_runs(history, bench_name="<b>resnet</b>-tiny")
    report = render_report([history.get(i) for i in ids.values()], tmp / "report.html")
    probe_page = tmp / "probe.html"
    probe_page.write_text(_instrument(report.read_text(encoding="utf-8")), encoding="utf-8")
    proc = _chromium(tmp, probe_page.as_uri(), f"--window-size={WIDTH},1600", "--dump-dom")
    match = re.search(r'<pre id="kiln-probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the probe did not run; chromium rc={proc.returncode}\n{proc.stderr[-3000:]}"
    probe = json.loads(html_lib.unescape(match.group(1)))
    return {"tmp": tmp, "report": report, "proc": proc, "probe": probe}


def test_report_loads_without_console_errors(loaded):
    proc, probe = loaded["proc"], loaded["probe"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe["errors"] == []
    assert _console_messages(proc.stderr) == []
    text = text_of(proc.stdout)
    assert "int8-static is 3.4× faster than fp32" in text
    assert "<b>resnet</b>-tiny" in text  # the run name is shown as text, not markup
    assert probe["width"] <= WIDTH, "the page overflows horizontally"
    kinds = sorted(c["kind"] for c in probe["charts"])
    assert kinds == ["memory", "memory", "sweep", "top-ops", "training", "variants"]


def test_screenshot_shows_the_charts_and_the_banner(loaded):
    from PIL import Image

    tmp, probe = loaded["tmp"], loaded["probe"]
    height = int(min(probe["height"], 14000))
    shot = tmp / "shot.png"
    proc = _chromium(
        tmp, loaded["report"].as_uri(), f"--window-size={WIDTH},{height}", f"--screenshot={shot}"
    )
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-3000:]
    assert _console_messages(proc.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (height, WIDTH)

    def region(box: dict, inset: int = 2) -> np.ndarray:
        x0, y0 = int(box["x"]) + inset, int(box["y"]) + inset
        x1, y1 = int(box["x"] + box["w"]) - inset, int(box["y"] + box["h"]) - inset
        assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= height, box
        return pixels[y0:y1, x0:x1]

    def inked(area: np.ndarray) -> float:  # share of pixels that are not (near) white
        return float((area.min(axis=2) < 235).mean())

    def colored(area: np.ndarray) -> float:  # share of saturated pixels: bars, lines, markers, bands
        return float((area.max(axis=2) - area.min(axis=2) > 60).mean())

    margin = pixels[200 : height - 200, 5:40]  # page margin: blank, so the measures below discriminate
    assert inked(margin) < 0.001 and colored(margin) == 0.0
    for chart in probe["charts"]:
        assert chart["w"] > 600 and chart["h"] > 100, chart
        area = region(chart)
        assert inked(area) > 0.02, f"{chart['kind']} chart looks blank: {chart}"
        assert colored(area) > 0.003, f"{chart['kind']} chart has no colored marks: {chart}"
        assert area.std() > 10
    banner = region(probe["banner"])
    assert probe["banner"]["y"] < 250, "the headline banner should be at the top"
    green = (banner[..., 1] > banner[..., 0] + 40) & (banner[..., 1] > banner[..., 2] + 40)
    assert green.mean() > 0.01, "the winner's ratio should be drawn in green"
