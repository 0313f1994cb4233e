"""The KD view in a real browser: headless Debian Chromium (/usr/bin/chromium, installed by
`make browser`) driven by Playwright (the PyPI package, with executable_path; no
downloaded browser), against the real API server of tests/test_ui_plugin.py's fixture.

Logs in through the Airflow UI's SimpleAuthManager login form, opens the KD tab of the
kd_daily run (an iframe of the plugin page), checks the figures shown equal the stored
report and gate record, opens the KD dashboard, a plot and a Data Docs page, and saves
screenshots to docs/ui/."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.airflow_helpers import DAG_ID
from tests.pipeline_fixtures import kd_base  # noqa: F401
from tests.test_ui_plugin import PREFIX, kd_ui_server  # noqa: F401

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "ui"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run `make browser` (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright  # a requirement: missing is a failure, not a skip

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


def login(page, s) -> None:
    """Log in as admin through the Airflow UI's form (SimpleAuthManager): the session cookie
    the UI's iframes send."""
    password = json.loads((s.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
    page.goto(f"{s.base}/")
    page.locator("input[name='username'], input[type='text']").first.fill("admin")
    page.locator("input[type='password']").first.fill(password)
    page.locator("input[type='password']").first.press("Enter")
    page.wait_for_function("() => document.cookie !== undefined && !location.pathname.includes('login')")
    page.wait_for_url(lambda url: "login" not in url)
    assert any(c["name"] == "_token" for c in page.context.cookies()), page.context.cookies()


def test_kd_tab_and_dashboard_in_the_ui(kd_ui_server, browser, tmp_path):  # noqa: F811
    s = kd_ui_server
    from kdcore.storage import partition as part

    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    try:
        login(page, s)

        # -- the KD tab of the run: the UI embeds the plugin page in an iframe
        page.goto(f"{s.base}/dags/{DAG_ID}/runs/{s.run_id}/plugin/kd_run")
        frame = page.frame_locator("iframe[title='KD']")
        frame.locator("[data-kd='date']").wait_for()
        day = s.days[-1].isoformat()
        assert frame.locator("[data-kd='date']").inner_text() == day
        decision = json.loads(part.read_blob(s.store.as_uri() + f"/quality/movielens/date={day}", "decision.json"))
        assert frame.locator("[data-kd='teacher:version']").inner_text() == decision["teacher_version"]
        assert frame.locator("[data-kd='teacher:staleness']").inner_text() == str(decision["staleness_days"])
        assert frame.locator("[data-kd='gate:status']").inner_text() == decision["status"]
        checks = {c["name"]: c["value"] for c in decision["checks"]}
        for name in ("psi", "js", "calibration:like", "label_drift:like"):
            assert frame.locator(f"[data-kd='check:{name}']").inner_text() == f"{checks[name]:.4f}", name
        metrics = list(csv.DictReader(io.StringIO(part.read_blob(s.report["uri"], "metrics.csv").decode())))
        rows = {(r["model"], r["task"]): r for r in metrics if r["date"] == day}
        for student in ("student_aux", "student_direct"):
            for task, metric in (("like", "auc"), ("like", "ne"), ("rating", "rmse")):
                shown = frame.locator(f"[data-kd='student:{student}:{task}:{metric}']").inner_text()
                assert shown == f"{float(rows[(student, task)][metric]):.4f}", (student, metric)
                shown = frame.locator(f"[data-kd='control:{student}:{task}:{metric}']").inner_text()
                assert shown == f"{float(rows[('control', task)][metric]):.4f}", (student, metric)
        page.screenshot(path=str(SHOTS / "run_tab.png"), full_page=False)

        # -- the dashboard (nav view): gains as report.md prints them
        page.goto(f"{s.base}/plugin/kd_dashboard")
        dash = page.frame_locator("iframe[title='KD dashboard']")
        dash.locator("#gains").wait_for()
        md = s.report["markdown"]
        gains = list(csv.DictReader(io.StringIO(part.read_blob(s.report["uri"], "kd_gain.csv").decode())))
        for g in gains:
            shown = dash.locator(f"[data-kd='gain:{g['student']}:{g['task']}:{g['metric']}']").inner_text()
            assert f"| {g['student']} | {g['mode']} | {g['task']} | {g['metric']} | {shown} |" in md, shown
        for model in ("teacher", "student_aux", "control"):
            shown = dash.locator(f"[data-kd='mean:{model}:like:auc']").inner_text()
            assert any(ln.startswith(f"| {model} | ") and f" | {shown} | " in ln for ln in md.splitlines()), model
        assert dash.locator(f"[data-kd='lineage:{day}:teacher']").inner_text() == decision["teacher_version"]
        assert dash.locator(f"[data-kd='lineage:{day}:students']").inner_text() == "student_aux, student_direct"
        page.screenshot(path=str(SHOTS / "dashboard.png"), full_page=False)

        # -- a plot and a Data Docs page, served by the plugin (same session cookie)
        plot = page.goto(f"{s.base}{PREFIX}/artifacts/report/metrics_like.png")
        assert plot.status == 200 and plot.headers["content-type"] == "image/png"
        assert plot.body() == part.read_blob(s.report["uri"], "metrics_like.png")
        page.goto(f"{s.base}{PREFIX}/day/{day}")
        page.locator("#docs").wait_for()
        page.screenshot(path=str(SHOTS / "day.png"), full_page=True)
        with page.expect_navigation():
            page.locator("a[href$='data_docs/index.html']").click()
        assert "Great Expectations" in page.title() or "Data documentation" in page.title(), page.title()
        page.screenshot(path=str(SHOTS / "data_docs.png"), full_page=False)
        with page.expect_navigation():  # the index's rows, written out for a page without script
            page.locator("a[href*='validations/']").first.click()
        page.locator("table").first.wait_for()
        page.locator("a", has_text="Table-Level Expectations").first.click()  # past the table of contents
        page.screenshot(path=str(SHOTS / "data_docs_validation.png"), full_page=False)

        # -- logged out (a fresh context): the plugin page is refused
        anon = browser.new_context().new_page()
        assert anon.goto(f"{s.base}{PREFIX}/day/{day}").status == 401
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(f"failure screenshot: {tmp_path / 'failure.png'}; url {page.url}")
        raise
    finally:
        ctx.close()
