"""The quickstart in JupyterLab, in headless Debian chromium: what a user sees and clicks.

One scenario, in the order a user meets it: run the ``%%taskapp`` cell → the widget shows
"running", a link to the app and a health figure; the link opens the app; Stop frees the port,
Start serves again; re-running the cell keeps exactly one app; a blocking cell turns the
badge to "kernel busy" and back; a kernel restart frees the port. The browser console must
show no widget or model error throughout. Screenshots of each state land in the screenshot
directory (see conftest.py).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import httpx
import pytest
from labdriver import APP_KEY, JupyterServer, Page, wait_for
from support import port_is_free

pytestmark = [pytest.mark.browser, pytest.mark.kernel, pytest.mark.timeout(420)]

QUICKSTART = "notebooks/quickstart.ipynb"
TASKAPP_CELL = "%%taskapp --tunnel local --name quickstart"


def serves(url: str) -> bool:
    """True when the task app at ``url`` answers ``GET /health`` with 200."""
    with contextlib.suppress(httpx.HTTPError):
        response = httpx.get(f"{url}/health", headers={"X-API-Key": APP_KEY}, timeout=10,
                             trust_env=False)
        return response.status_code == 200
    return False


def running_ports(page: Page) -> list[int]:
    """Ports of the task apps running in the notebook's kernel, asked of the kernel itself."""
    text = page.evaluate_in_kernel(
        "sorted(app.port for app in __import__('taskapp_notebook.registry')"
        ".registry.running())"
    )
    return [int(port) for port in re.findall(r"\d+", text)]


#: Console errors of the frontends themselves, seen before any cell ran; each says whose.
KNOWN_FRONTEND_ERRORS = [
    # Notebook 7.6: its shortcuts plugin reads the schema of a plugin it doesn't know, at
    # page load (reproduced with an empty notebook, no kernel code run)
    re.compile(r"reading 'schema'.*notebook_core", re.DOTALL),
]
_OURS = re.compile(r"widget|model|comm|taskapp", re.IGNORECASE)


def unexpected_errors(errors: list[str]) -> list[str]:
    """Console errors other than the frontends' own known ones; any error that mentions
    widgets, models, comms or this package is never excused."""
    return [
        error for error in errors
        if _OURS.search(error) or not any(known.search(error) for known in KNOWN_FRONTEND_ERRORS)
    ]


def test_quickstart_widget_in_jupyterlab(lab: JupyterServer, page: Page) -> None:
    page.open(lab, QUICKSTART)
    page.run_cell_and_wait("%load_ext taskapp_notebook")
    cell = page.run_cell(TASKAPP_CELL)

    # running, with a link to the app and a health figure
    page.wait_badge(cell, "running")
    widget = page.widget(cell)
    assert widget.locator(".taskapp-gone").is_hidden()
    link = widget.locator("a.taskapp-url")
    url = link.get_attribute("href")
    assert url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
    port = int(url.rsplit(":", 1)[1])
    assert "quickstart" in widget.locator(".taskapp-header").inner_text()
    health = widget.locator(".taskapp-info tr", has_text="health")
    health.filter(has_text=re.compile(r"HTTP 200 · \d+\.\d ms")).wait_for(timeout=30_000)
    assert serves(url)
    assert APP_KEY not in page.page.content()
    assert min(text_contrasts(page, widget).values()) >= 4.5  # WCAG AA for normal text
    page.shoot("widget-running", cell)

    # Copy puts the URL on the clipboard
    widget.locator("button.taskapp-copy").click()
    assert page.page.evaluate("() => navigator.clipboard.readText()") == url

    # the link opens the app in a new tab; from that tab's context the app answers
    with page.page.context.expect_page() as new_tab:
        link.click()
    tab = new_tab.value
    tab.wait_for_load_state()
    assert tab.url.rstrip("/") == url
    assert "quickstart" in tab.inner_text("body")
    answer = tab.evaluate(
        """async (key) => {
            const denied = await fetch('/health');
            const allowed = await fetch('/health', {headers: {'X-API-Key': key}});
            return [denied.status, allowed.status, await allowed.json()];
        }""",
        APP_KEY,
    )
    assert answer[0] == 401 and answer[1] == 200 and answer[2]["healthy"] is True, answer
    tab.close()

    # Stop frees the port; Start serves again on it
    widget.locator("button.taskapp-stop").click()
    page.wait_badge(cell, "stopped")
    wait_for(lambda: port_is_free(port), 30, f"port {port} to be freed by Stop")
    assert not serves(url)
    assert widget.locator("button.taskapp-stop").is_disabled()
    assert widget.locator("button.taskapp-start").is_enabled()
    page.shoot("widget-stopped", cell)
    widget.locator("button.taskapp-start").click()
    page.wait_badge(cell, "running")
    assert serves(url)
    assert running_ports(page) == [port]

    # re-running the cell replaces the app: still exactly one, on the same port
    page.run_cell_and_wait(TASKAPP_CELL)
    page.wait_badge(cell, "running")
    assert running_ports(page) == [port]
    assert page.page.locator(".widget-vbox.taskapp-view").count() == 1
    assert serves(url)

    # a blocking cell: the badge says "kernel busy", then recovers by itself
    page.append_cell("import time\n\ntime.sleep(6)  # blocks the loop the app runs on")
    page.run_cell("import time\n\ntime.sleep(6)")
    page.wait_badge(cell, "kernel busy", timeout=30)
    assert "kernel busy (" in widget.locator(".taskapp-header").inner_text()
    page.shoot("widget-kernel-busy", cell)
    page.wait_badge(cell, "running", timeout=60)

    # restarting the kernel stops the app and frees its port
    page.restart_kernel()
    wait_for(lambda: port_is_free(port), 30, f"port {port} to be freed by the kernel restart")
    assert not serves(url)
    # the old view can't be updated any more: ipywidgets marks it disconnected, and the
    # badge then says "disconnected" rather than the last state it was sent
    widget.locator(".taskapp-gone").wait_for(state="visible", timeout=30_000)
    assert widget.locator(".taskapp-badge").is_hidden()
    assert "disconnected" in widget.locator(".taskapp-header").inner_text()
    page.shoot("widget-disconnected", cell)
    page.shoot("notebook-after-restart")

    assert unexpected_errors(page.console_errors) == [], page.console_errors


def test_synthtunnel_widget_in_jupyterlab(lab: JupyterServer, page: Page) -> None:
    """The quickstart's tunnel section: the default tunnel through a relay in the kernel."""
    page.open(lab, QUICKSTART)
    page.run_cell_and_wait("%load_ext taskapp_notebook")
    page.run_cell_and_wait("import os\n\nfrom taskapp_notebook.relay import RelayServer")
    cell = page.run_cell("%%taskapp --name tunneled")
    page.wait_badge(cell, "running")
    widget = page.widget(cell)
    url = widget.locator("a.taskapp-url").get_attribute("href")
    relay_url = page.evaluate_in_kernel("relay.url").strip("'")
    assert url is not None and url.startswith(relay_url + "/s/rt_"), (url, relay_url)
    widget.locator(".taskapp-info tr", has_text="tunnel").filter(
        has_text="synthtunnel (connected)").wait_for(timeout=30_000)
    token = page.evaluate_in_kernel("tunneled.task_app_worker_token").strip("'")
    assert len(token) >= 16
    info = widget.locator(".taskapp-info").inner_text()
    assert "worker token" in info and "…" + token[-4:] in info
    assert token not in page.page.content() and APP_KEY not in page.page.content()
    response = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"},
                         timeout=10, trust_env=False)
    assert response.status_code == 200 and response.json()["healthy"] is True
    page.shoot("widget-synthtunnel", cell)

    # the notebook's stop cell (app, then relay): the widget says stopped, nothing answers
    page.run_cell_and_wait("%taskapp stop tunneled")
    page.wait_badge(cell, "stopped")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=10, trust_env=False)
    assert running_ports(page) == []
    assert unexpected_errors(page.console_errors) == [], page.console_errors


def _rgb(css_color: str, under: tuple[float, ...] = (255, 255, 255)) -> tuple[float, ...]:
    """``rgb(…)`` / ``rgba(…)`` as opaque RGB, blended over ``under`` when translucent."""
    values = [float(v) for v in re.findall(r"[\d.]+", css_color)]
    alpha = values[3] if len(values) > 3 else 1.0
    return tuple(alpha * c + (1 - alpha) * u for c, u in zip(values[:3], under, strict=True))


def _luminance(rgb: tuple[float, ...]) -> float:
    """Relative luminance (WCAG 2)."""
    linear = [(c / 255) / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4
              for c in rgb]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(foreground: str, background: str) -> float:
    """WCAG 2 contrast ratio (1 to 21) of a CSS colour drawn on an opaque one."""
    under = _rgb(background)
    high, low = sorted((_luminance(_rgb(foreground, under)), _luminance(under)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def text_contrasts(page: Page, widget: Any) -> dict[str, float]:
    """Contrast ratio of the widget's texts (label, value, link, name) on the notebook."""
    background = page.page.evaluate(
        "() => getComputedStyle(document.querySelector('.jp-Notebook')).backgroundColor")
    texts = {
        "label": widget.locator(".taskapp-info td").first,
        "value": widget.locator(".taskapp-info td").nth(3),
        "link": widget.locator("a.taskapp-url"),
        "name": widget.locator(".taskapp-header b"),
    }
    return {
        name: round(contrast(text.evaluate("e => getComputedStyle(e).color"), background), 1)
        for name, text in texts.items()
    }


def test_widget_is_readable_in_the_dark_theme(lab: JupyterServer, page: Page) -> None:
    page.open(lab, QUICKSTART)
    page.page.evaluate(
        "() => window.jupyterapp.commands.execute('apputils:change-theme',"
        " {theme: 'JupyterLab Dark'})")
    try:
        page.page.wait_for_function(
            "() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
        page.run_cell_and_wait("%load_ext taskapp_notebook")
        cell = page.run_cell(TASKAPP_CELL)
        page.wait_badge(cell, "running")
        widget = page.widget(cell)
        ratios = text_contrasts(page, widget)
        print(f"dark theme contrast ratios: {ratios}")
        page.shoot("widget-dark-theme", cell)
        assert min(ratios.values()) >= 4.5, ratios  # WCAG AA for normal text
        page.run_cell_and_wait("%taskapp stop quickstart")
    finally:
        page.page.evaluate(
            "() => window.jupyterapp.commands.execute('apputils:change-theme',"
            " {theme: 'JupyterLab Light'})")
