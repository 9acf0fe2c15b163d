"""The HTML reports in a real browser (headless Chromium, Debian's `chromium` + `chromium-driver`, which `.ci/run`
installs where missing): every plot is drawn with data in it, and no text in a plot is drawn over another —
the lab's report (a shrunken lab run) and `alignkit report` on runs with a detector flag."""

import json
import shutil

import pytest

selenium = pytest.importorskip("selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")

# per <svg>: its drawn size, its data marks (curves and points), and every pair of texts whose boxes on screen
# intersect (by more than a pixel: adjacent text touching at the edge is fine)
MEASURE = """
return Array.from(document.querySelectorAll('svg')).map(svg => {
  const box = svg.getBoundingClientRect();
  const marks = svg.querySelectorAll('polyline, circle').length;
  const texts = Array.from(svg.querySelectorAll('text')).filter(t => t.textContent.trim())
      .map(t => [t.textContent, t.getBoundingClientRect()]);
  const overlaps = [];
  for (let i = 0; i < texts.length; i++) for (let j = i + 1; j < texts.length; j++) {
    const a = texts[i][1], b = texts[j][1];
    const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
    const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    if (w > 1 && h > 1) overlaps.push([texts[i][0], texts[j][0]]);
  }
  return {title: (svg.querySelector('text') || {}).textContent, width: box.width, height: box.height,
          marks: marks, overlaps: overlaps};
});
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def drawn(browser, path) -> list[dict]:
    browser.get(path.resolve().as_uri())
    plots = browser.execute_script(MEASURE)
    assert plots, f"{path}: no plot"
    for p in plots:
        assert p["width"] > 100 and p["height"] > 100, p
        assert p["marks"] > 0, f"{p['title']}: nothing drawn"
        assert not p["overlaps"], f"{p['title']}: text drawn over text: {p['overlaps']}"
    return plots


def test_the_lab_report_draws_every_plot_with_named_points(tmp_path, monkeypatch, browser):
    from tests.test_lab_run import TINY

    import alignkit.lab.base as base
    import alignkit.lab.run as lab_run
    from alignkit.cli import main

    monkeypatch.setitem(base.PRETRAIN, "lines", 400)
    monkeypatch.setitem(lab_run.PRESETS, "quick", TINY)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    assert main(["lab", "--seed", "1", "--output-dir", str(tmp_path / "lab")]) == 0
    plots = drawn(browser, tmp_path / "lab" / "report.html")
    summary = json.loads((tmp_path / "lab" / "summary.json").read_text())
    # every method, the frontier, three online runs, best-of-n, the RL-form fit (when it fits), length, flattery,
    # the experts' spot check
    assert len(plots) == 9 + bool(summary["rl_fit"]["ppo_no_kl"])
    assert any("spot check" in (p["title"] or "") for p in plots)
    assert any("frontier" in (p["title"] or "") for p in plots)
    scatter = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg')[0].querySelectorAll('text')).map(t => t.textContent)")
    methods = summary["methods"]
    # each method: its legend entry and its point's label, or named below the plot as off the chart
    page = browser.execute_script("return document.body.innerText")
    assert all(scatter.count(name) == 2 or f"{name} off the chart" in page for name in methods), scatter


def test_alignkit_report_draws_every_plot_and_the_flag(tmp_path, browser):
    from tests.test_report import write_online_run

    from alignkit.report import write_report

    runs = [write_online_run(tmp_path / "a", flag_at=7), write_online_run(tmp_path / "b", flag_at=5)]
    out = write_report(runs, tmp_path / "report.html")
    plots = drawn(browser, out)
    hacking = [p for p in plots if p["title"] and p["title"].startswith("hacking/")]
    assert hacking
