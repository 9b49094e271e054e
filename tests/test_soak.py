"""bench/soak.py, short: a real server under the random mix passes; a dying one fails it."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVE = "--kv-cache-memory 128MiB --max-num-seqs 8"


def soak(tmp_path, *args: str, env: dict | None = None, timeout: float = 180):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "bench/soak.py", "--json", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_short_soak_passes(tmp_path):
    # 25 s: ~230 requests of every kind, 3 long prompts, 26 samples on this 2-core box
    proc, s = soak(tmp_path, "--duration", "25", "--concurrency", "6", "--long-every", "8",
                   "--long-tokens", "600", "--sample-every", "1", "--serve-args", SERVE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert s["failures"] == [] and s["server_exit"] == 0
    out = s["outcomes"]
    assert out["ok"] > 50 and out["cancelled"] > 0 and out["rejected"] > 0, out
    assert set(out) <= {"ok", "cancelled", "rejected"}, out
    kinds = set(s["kinds"])
    assert {"stream chat", "stream completion", "chat", "completion", "bad input",
            "long prompt"} <= kinds, kinds
    assert s["long_prompts"] >= 2 and s["itl_during_long_prefill_ms"]["n"] > 0
    assert s["blocks_after_drain"]["used"] == 0 and s["blocks_after_drain"]["total"] > 0
    assert s["rss_mib"]["peak"] > 100 and len(s["samples"]) > 10


def test_soak_fails_when_the_engine_dies(tmp_path):
    proc, s = soak(tmp_path, "--duration", "30", "--concurrency", "4", "--long-every", "0",
                   "--serve-args", SERVE, env={"KVSERVE_FAULT_AT_STEP": "40"})
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "SOAK FAILED" in proc.stderr
    assert any("failed" in f for f in s["failures"]), s["failures"]


def test_soak_drives_only_this_machine(tmp_path):
    proc, _ = soak(tmp_path, "--url", "http://10.1.2.3:8000", "--duration", "1")
    assert proc.returncode == 2 and "refusing" in proc.stderr
