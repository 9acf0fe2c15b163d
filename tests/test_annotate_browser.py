"""`alignkit annotate` end to end in a real browser (headless Chromium driven by Selenium; Debian's `chromium` and
`chromium-driver`, which .ci/run installs where missing): two annotators rank the same 10 items, one by keyboard
only and one partly by dragging; `annotate stats` reports their agreement (checked against a count made here);
`annotate export` writes ranked rows on which `alignkit reward` trains. A response holding HTML and <script> shows
as text. The page's screenshot goes to ALIGNKIT_SCREENSHOT_DIR (docs/annotate.png was made so) when it is set."""

import json
import os
import shutil
import threading
import time

import pytest

pytest.importorskip("selenium")
pytest.importorskip("sqlalchemy")
pytest.importorskip("uvicorn")

from alignkit.annotate.app import bind, build_app, uvicorn_server  # noqa: E402
from alignkit.annotate.candidates import read_candidates  # noqa: E402
from alignkit.annotate.db import open_store  # noqa: E402
from alignkit.cli import main  # noqa: E402
from alignkit.examples import ANIMALS, COLORS, GOOD, ranked_rows, write_jsonl  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")

HTML = " <script>window.pwned = 1</script><b>bold</b>"
SIZES = [4, 4, 4, 4, 3, 3, 3, 2, 2, 2]  # responses per item
BOB_SWAPS = {1, 4}        # items where bob puts the second-best first
BOB_TIES = {2}            # ... and where he ties the best two
BOB_DRAGS = {1, 2, 5, 7}  # ... and where he drags instead of typing


def quality(text: str) -> int:
    return sum(word in GOOD for word in text.split())


def candidate_rows() -> list[dict]:
    """10 items of 2-4 responses, best first (strictly more good words), with label 0; unique prompts; the worst
    response of item 0 ends with HTML and a script."""
    rows = []
    for i, k in enumerate(SIZES):
        row = ranked_rows(1, k=k, seed=100 + i)[0]
        rows.append({"prompt": f"describe the {COLORS[i % len(COLORS)]} {ANIMALS[i]} ->",
                     "responses": row["responses"], "label": 0})
    rows[0]["responses"][-1] += HTML
    return rows


class ThreadedServer:
    def __init__(self, store, overlap: int):
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn_server(build_app(store, overlap))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1700",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


# -------------------------------------------------------------------------------------------- the page
def on_screen(driver) -> tuple[str, list[str]]:
    return driver.execute_script(
        "return [document.getElementById('prompt').textContent,"
        " Array.from(document.querySelectorAll('.card .text')).map(e => e.textContent)]")


def wait_done(driver, n: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.find_element("id", "progress").text.startswith(f"{n} done"),
                                    message=f"the page did not reach {n} done")


def intended(prompt: str, texts: list[str], who: str, rows: list[dict]) -> list[list[int]]:
    """Groups of display positions, best first: by quality; bob swaps or ties the best two on some items."""
    index = [r["prompt"] for r in rows].index(prompt)
    by_quality = sorted(range(len(texts)), key=lambda p: -quality(texts[p]))
    groups = [[p] for p in by_quality]
    if who == "bob" and index in BOB_SWAPS:
        groups[0], groups[1] = groups[1], groups[0]
    if who == "bob" and index in BOB_TIES:
        groups[:2] = [groups[0] + groups[1]]
    return groups


def rank_by_keys(driver, groups: list[list[int]], leave_last: bool = False) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    keys = "".join("=".join(str(p + 1) for p in group) for group in groups)
    if leave_last and len(groups[-1]) == 1:
        keys = keys[:-1]  # Enter places the one response left last
    ActionChains(driver).send_keys(keys + Keys.ENTER).perform()


def rank_by_drag(driver, groups: list[list[int]]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for place, group in enumerate(groups):
        for pos in group:
            card = driver.find_element("css selector", f'.card[data-pos="{pos}"] .card-title')
            target = driver.find_element("css selector", f'.place[data-place="{place}"]')
            ActionChains(driver).click_and_hold(card).move_to_element(target).release().perform()
    badges = [b.text for b in driver.find_elements("css selector", ".card .badge")]
    assert "not ranked" not in badges, badges
    driver.find_element("id", "submit").click()


def annotate_all(driver, url: str, token: str, who: str, rows: list[dict], screenshot=None) -> dict:
    """Rank every item of the queue as `who`; returns {prompt: groups of response texts} as ranked."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/?token={token}")
    ranked = {}
    for n in range(len(rows)):
        wait_done(driver, n)
        prompt, texts = on_screen(driver)
        groups = intended(prompt, texts, who, rows)
        index = [r["prompt"] for r in rows].index(prompt)
        if screenshot and len(texts) == 4 and who == "alice" and n == 0:
            ActionChains(driver).send_keys(f"{groups[0][0] + 1}={groups[1][0] + 1}{groups[2][0] + 1}").perform()
            screenshot(driver)
            ActionChains(driver).send_keys(Keys.BACKSPACE * 3).perform()
        if who == "alice" and index == 3:  # a comment and the unsafe flag, by keys only
            ActionChains(driver).send_keys("c").send_keys("needs a source").send_keys(Keys.ESCAPE).send_keys("f").perform()
        if who == "bob" and n == 1:  # the revise key: back to the first judgement, shown as it was submitted
            ActionChains(driver).send_keys("u").perform()
            WebDriverWait(driver, 10).until(lambda d: d.find_element("id", "revising").is_displayed())
            assert "not ranked" not in [b.text for b in driver.find_elements("css selector", ".card .badge")]
            ActionChains(driver).send_keys(Keys.ENTER).perform()
            WebDriverWait(driver, 10).until(lambda d: d.find_element("id", "message").text == "Revised.")
            assert on_screen(driver) == [prompt, texts]  # back on the item it left
        if who == "bob" and index in BOB_DRAGS:
            rank_by_drag(driver, groups)
        else:
            rank_by_keys(driver, groups, leave_last=(who == "bob"))
        ranked[prompt] = [[texts[p] for p in group] for group in groups]
    wait_done(driver, len(rows))
    assert driver.find_element("id", "empty").is_displayed()
    return ranked


def save_screenshot(tmp_path):
    def take(driver):
        driver.set_window_size(1280, 800)
        path = tmp_path / "annotate.png"
        driver.save_screenshot(str(path))
        if os.environ.get("ALIGNKIT_SCREENSHOT_DIR"):
            shutil.copy(path, os.path.join(os.environ["ALIGNKIT_SCREENSHOT_DIR"], "annotate.png"))
        driver.set_window_size(1280, 1700)
    return take


# ------------------------------------------------------------------------------------------------ tests
def test_two_annotators_rank_in_the_browser_then_stats_export_and_reward(tmp_path, browser, tiny_model_dir,
                                                                          capsys):
    rows = candidate_rows()
    data = write_jsonl(tmp_path / "candidates.jsonl", rows)
    db = str(tmp_path / "feedback.sqlite")
    store = open_store(db)
    store.add_items(read_candidates([str(data)]))
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob")}
    server = ThreadedServer(store, overlap=2)
    try:
        # the response with HTML in it is text on the page, and nothing of it ran
        browser.get(f"{server.url}/?token={tokens['alice']}")
        _, texts = on_screen(browser)
        if any(HTML in t for t in texts):
            assert browser.execute_script("return window.pwned") is None
            assert browser.execute_script("return document.querySelectorAll('.card b, .card script').length") == 0
        ranked = {"alice": annotate_all(browser, server.url, tokens["alice"], "alice", rows, save_screenshot(tmp_path))}
        assert (tmp_path / "annotate.png").stat().st_size > 10_000
        ranked["bob"] = annotate_all(browser, server.url, tokens["bob"], "bob", rows)
        logs = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not logs, logs
    finally:
        server.stop()

    # every judgement is in the database as the page showed it: the texts in each group, in order
    items = store.all_items()
    names = {a.id: a.name for a in store.all_annotators().values()}
    judgements = store.judgements_of()
    assert len(judgements) == 20
    for j in judgements:
        item = items[j.item_id]
        stored = [[item.responses[i] for i in range(len(j.ranks)) if j.ranks[i] == r] for r in sorted(set(j.ranks))]
        assert [sorted(g) for g in stored] == [sorted(g) for g in ranked[names[j.annotator_id]][item.prompt]]
    assert [names[j.annotator_id] for j in judgements if j.revised_at is not None] == ["bob"]
    flagged = [j for j in judgements if j.unsafe]
    assert [(names[j.annotator_id], j.comment) for j in flagged] == [("alice", "needs a source")]
    assert any(HTML in r for item in items.values() for r in item.responses)  # stored as it came

    # stats: agreement counted here — bob differs from alice on one response pair per swapped or tied item
    pairs = sum(k * (k - 1) // 2 for k in SIZES)
    expected = 1 - (len(BOB_SWAPS) + len(BOB_TIES)) / pairs
    capsys.readouterr()
    assert main(["annotate", "stats", "--db", db]) == 0
    text = capsys.readouterr().out
    assert f"pairwise agreement    {expected:.3f}" in text, text
    assert main(["annotate", "stats", "--db", db, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    agreement = report["agreement"]
    assert agreement["items"] == 10 and agreement["comparisons"] == pairs
    assert agreement["pairwise_agreement"] == pytest.approx(expected)
    assert agreement["cohen_kappa"][0]["annotators"] == ["alice", "bob"]
    # κ over both orientations of each pair: alice answers "better" and "worse" half each, never "tie"; bob
    # ties one pair: p_bob(tie) = 1/36, p_bob(better) = p_bob(worse) = 35/72; p_e = 2 · ½ · 35/72 = 35/72;
    # p_o = 33/36 = 66/72; κ = (66/72 − 35/72) / (1 − 35/72) = 31/37
    assert pairs == 36 and agreement["cohen_kappa"][0]["kappa"] == pytest.approx(31 / 37)
    assert 0.5 < agreement["krippendorff_alpha"] < 1
    assert 0.5 < agreement["kendall_tau_b"] < 1
    # label 0 is the best response: alice always agrees; bob not on the swaps and half on the tie
    assert report["label"]["per_annotator"] == {"alice": 1.0, "bob": pytest.approx(1 - (2 + 0.5) / 10)}
    assert [a["done"] for a in report["annotators"]] == [10, 10]
    assert 0 <= report["position_bias"]["first_shown_best"] <= 1

    # export → reward
    out = tmp_path / "ranked.jsonl"
    assert main(["annotate", "export", "--db", db, "--kind", "ranked", "--output", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(exported) == 20 and all(r["scores"] == sorted(r["scores"], reverse=True) for r in exported)
    run = tmp_path / "rm"
    assert main(["reward", "--model", tiny_model_dir, "--data", str(out), "--output-dir", str(run), "--max-steps", "3",
                 "--batch-size", "4", "--eval-fraction", "0", "--log-every", "1", "--save-every", "0"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in metrics if "loss" in m)
    assert (run / "final" / "model.safetensors").is_file()
