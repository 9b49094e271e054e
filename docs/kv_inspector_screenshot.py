"""Makes docs/kv-inspector.png, the README's picture of the KV inspector: `kvserve serve` with
the default model and a small pool, a few chat requests sharing a system prompt (prefix
hits), one with n = 2 (a fork), one finished (its blocks cached-free), and headless chromium
(Playwright's client library) hovering one request.

    python docs/kv_inspector_screenshot.py [--out docs/kv-inspector.png]
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = ("You are a patient teacher. Explain ideas step by step, with one small example "
          "each time, and keep every answer under two hundred words. ") * 8
FINISHED = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(16))
QUESTIONS = ["What is a KV cache?", "Why does attention cost grow with the context?",
             "What does grouped-query attention save?", "How does a sliding window work?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(url: str, question: str, n: int = 1, max_tokens: int = 400, stream: bool = True):
    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question}],
            "max_tokens": max_tokens, "n": n, "ignore_eos": True, "temperature": 0.7,
            "stream": stream}
    with httpx.Client(base_url=url, timeout=600) as c:
        if not stream:
            return c.post("/v1/chat/completions", json=body)
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            for _ in r.iter_lines():
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "kv-inspector.png"))
    args = ap.parse_args()
    from PIL import Image
    from playwright.sync_api import sync_playwright
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                               "--num-kv-blocks", "128", "--max-num-seqs", "8"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        # finished before the others start: its full blocks stay behind, cached-free
        httpx.post(url + "/v1/completions", json={"prompt": FINISHED, "max_tokens": 4},
                   timeout=600)
        threads = [threading.Thread(target=chat, args=(url, q, 2 if i == 1 else 1), daemon=True)
                   for i, q in enumerate(QUESTIONS)]
        for t in threads:
            t.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(url + "/kv?interval=250")
            page.wait_for_function("() => document.querySelectorAll('#seqs tr').length >= 5 && "
                                   "[...document.querySelectorAll('#seqs tr')].every("
                                   "tr => tr.classList.contains('decode'))", timeout=300_000)
            page.wait_for_timeout(12_000)  # more tokens, and some history
            page.click("#pause")
            page.hover("#seqs tr:nth-child(3)")
            png = page.screenshot(full_page=True)
            browser.close()
        # a palette image: a fraction of the size, the same picture
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128)
        image.save(args.out, optimize=True)
        print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
