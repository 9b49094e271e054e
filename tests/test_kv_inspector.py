"""The KV inspector page (GET /kv) in a real browser: headless Debian chromium driven by
Playwright's client library against real servers. The grid has a cell per block; two
requests sharing a long prefix show shared blocks, and the page's counts and cells equal
the /v1/kv/state answer it drew; a request's blocks are outlined on hover; a window model's
long generation shows evicted (null) table entries; screenshots are written to
test-artifacts/ and must not be blank. Without chromium or playwright the browser tests
skip (`make setup` installs both)."""
from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_utils import REPO_ROOT, InProcessServer, start_server  # tests/ is on sys.path
from test_kv_state import check_state
from test_models_hf import make_model

KEY = "inspector-key"
ARTIFACTS = Path(os.environ.get("KVSERVE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# headless and quiet: nothing but the page under test touches the network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PREFIX = [(11 * j) % 500 + 1 for j in range(96)]  # 6 full blocks of 16
CELL_CLASS = {"n": "cell null", "f": "cell free", "c": "cell cached", "u": "cell used"}


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (`make setup` installs it)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (`make setup` installs Debian's chromium "
                    f"where it can run apt-get as root)")
    # launch() gives the browser a fresh temporary profile (--user-data-dir) and removes it
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """A real `kvserve serve` process with a tiny Llama, an API key and 400 blocks (two
    sequences of 2500 tokens fit without preemption)."""
    path = tmp_path_factory.mktemp("inspector-llama")
    make_model("llama", path, max_position_embeddings=4096)
    with start_server("--model", str(path), "--num-kv-blocks", "400", "--max-num-seqs", "4",
                      "--api-key", KEY) as srv:
        yield srv


def state(url: str, key: str | None = KEY) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(url + "/v1/kv/state", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    check_state(body)
    return body


def wait_for_state(url: str, condition, what: str, key: str | None = KEY,
                   timeout: float = 60.0) -> dict:
    """Poll /v1/kv/state until condition(body) holds, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = state(url, key)
        if condition(body):
            return body
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last state: {body['sequences']}")


class Stream:
    """A streamed completion read on a thread until close() hangs up (an abort). The tiny
    models have no tokenizer, hence no text deltas: logprobs make every token a chunk, so
    the reader sees each step and can hang up at once."""

    def __init__(self, url: str, prompt: list[int], max_tokens: int, key: str | None = KEY):
        self._client = httpx.Client(base_url=url, timeout=120, headers={
            "Authorization": f"Bearer {key}"} if key else {})
        self._stop = threading.Event()
        self.error: BaseException | None = None
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "logprobs": 0}
        self._thread = threading.Thread(target=self._run, args=(body,), daemon=True)
        self._thread.start()

    def _run(self, body: dict) -> None:
        try:
            with self._client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    if self._stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - reported by close()
            if not self._stop.is_set():
                self.error = e

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.close()
        assert self.error is None, self.error


def save_screenshot(page, name: str) -> Path:
    """Write the page to test-artifacts/<name> and check it is not blank."""
    from PIL import Image, ImageStat
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    png = page.screenshot(path=str(path), full_page=True)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, f"{path}: {len(colours)} colours"
    assert max(ImageStat.Stat(image.convert("L")).stddev) > 10, f"{path} is blank"
    return path


def page_counts(page) -> dict[str, int]:
    return {k: int(page.inner_text(f"#count-{k}").replace(",", ""))
            for k in ("total", "used", "shared", "cached_free", "free")}


def cell_classes(page) -> list[str]:
    """Each grid cell's state classes, in block order (the selection outline left out)."""
    return page.eval_on_selector_all(
        "#grid .cell", "cells => cells.map(c => [...c.classList].filter(x => x !== 'hl')"
                       ".join(' '))")


def expected_classes(body: dict) -> list[str]:
    """The cell classes the page must draw for this state (kv.html's drawGrid)."""
    blocks = body["blocks"]
    out = []
    for b, s in enumerate(blocks["state"]):
        cls = CELL_CLASS[s]
        if s == "u":
            cls += " shared" * (str(b) in blocks["shared"])
            cls += " hashed" * (blocks["hashed"][b] == "1")
        out.append(cls)
    return out


def test_serve_prints_the_page_url(llama_server):
    assert f"KV inspector: http://127.0.0.1:{llama_server.port}/kv (the page asks for the " \
           f"API key)" in llama_server.log()


def test_page_draws_the_pool_shared_prefixes_and_cached_blocks(llama_server, browser):
    url = llama_server.url
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    answers = []  # every /v1/kv/state response the page got
    page.on("response", lambda r: answers.append(r) if "/v1/kv/state" in r.url else None)
    streams = []
    try:
        page.goto(url + "/kv?interval=150")
        # the server has a key: the page asks for it, then draws
        page.wait_for_selector("#keybox:not([hidden])")
        assert answers and answers[0].status == 401
        page.fill("#key", KEY)
        page.click("#keybox button[type=submit]")
        page.wait_for_function("() => document.body.dataset.status === 'live'")
        assert page.locator("#grid .cell").count() == 400 == state(url)["num_blocks"]

        # two requests sharing a 96-token prefix: the second finds its 6 blocks cached
        streams.append(Stream(url, PREFIX + [1], 2400))
        wait_for_state(url, lambda s: any(q["num_computed_tokens"] > len(PREFIX)
                                          for q in s["sequences"]), "the first prompt")
        streams.append(Stream(url, PREFIX + [2], 2400))
        wait_for_state(url, lambda s: s["counts"]["shared"] >= 6, "shared prefix blocks")
        page.wait_for_function("() => document.querySelectorAll('#grid .cell.shared').length >= 6",
                               timeout=30_000)

        # frozen, the page shows one answer: its counts and every cell are that answer's
        page.click("#pause")
        page.wait_for_function("() => document.body.dataset.status === 'paused'")
        shown = int(page.get_attribute("body", "data-snapshot"))
        drawn = next(r.json() for r in reversed(answers)
                     if r.ok and r.json()["snapshot"] == shown)
        check_state(drawn)
        assert drawn["counts"]["shared"] >= 6
        assert page_counts(page) == drawn["counts"]
        assert cell_classes(page) == expected_classes(drawn)
        rows = page.locator("#seqs tr")
        assert rows.count() == len(drawn["sequences"]) == 2

        # hovering the second request outlines exactly its blocks, the shared prefix first
        second = drawn["sequences"][1]
        rows.nth(1).hover()
        outlined = page.eval_on_selector_all("#grid .cell.hl",
                                             "cells => cells.map(c => Number(c.dataset.i))")
        table = [b for b in second["block_table"] if b is not None]
        assert sorted(outlined) == sorted(table)
        assert all(str(b) in drawn["blocks"]["shared"] for b in table[:6])
        save_screenshot(page, "kv-inspector-shared.png")

        # both hang up: their blocks go back, the full ones cached for reuse
        for s in streams:
            s.close()
        streams.clear()
        idle = wait_for_state(url, lambda s: not s["sequences"], "the aborts")
        page.click("#pause")  # resume
        page.wait_for_function(f"() => Number(document.body.dataset.snapshot) > {idle['snapshot']}"
                               f" && document.body.dataset.status === 'live'")
        now = state(url)  # nothing runs: the state stands still
        assert now["counts"] == idle["counts"] and now["counts"]["cached_free"] >= 6
        assert page_counts(page) == now["counts"]
        assert page.locator("#grid .cell.cached").count() == now["counts"]["cached_free"]
        assert page.locator("#seqs tr").count() == 0
        save_screenshot(page, "kv-inspector-cached.png")
        assert not errors, errors
    finally:
        for s in streams:
            s.close()
        page.close()


def test_page_shows_window_evicted_entries(tmp_path, browser):
    """A sliding-window model (W = 32, blocks of 8) generating long: the blocks behind the
    window go back to the pool and its table's first entries are shown as null (∅)."""
    make_model("mistral-window", tmp_path, max_position_embeddings=4096, sliding_window=32)
    with InProcessServer("--model", str(tmp_path), "--num-kv-blocks", "64",
                         "--block-size", "8") as srv, srv.listening() as url:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        stream = Stream(url, list(range(1, 60)), 4000, key=None)
        try:
            page.goto(url + "/kv?interval=150")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#seqs tr')].some(tr => tr.dataset.null > 8)",
                timeout=60_000)
            page.click("#pause")
            page.wait_for_function("() => document.body.dataset.status === 'paused'")
            row = page.locator("#seqs tr").first
            nulls = int(row.get_attribute("data-null"))
            assert row.locator(".tnull").first.inner_text() == f"∅×{nulls}"
            held = int(row.get_attribute("data-blocks"))
            assert held <= 5  # ceil((32 - 1) / 8) + 1: the window's bound
            body = state(url, key=None)  # later than the page's: evictions only grow
            (seq,) = body["sequences"]
            assert body["sliding_window"] == 32 and seq["num_evicted_blocks"] >= nulls
            assert seq["block_table"][:nulls] == [None] * nulls
            row.click()  # pinned: its live blocks outlined
            assert page.locator("#grid .cell.hl").count() == held
            assert "sliding window" in page.inner_text("#plan")
            save_screenshot(page, "kv-inspector-window.png")
        finally:
            stream.close()
            page.close()
