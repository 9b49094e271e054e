"""bench/quality.py: its metrics on hand-made distributions, and its two ways of reading the
engine's logits (prefill capture, forced decode) agreeing on the real model."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "bench", "quality.py")
_spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_parse_kwargs():
    assert quality.parse_kwargs("dtype=bfloat16,quantization=int4") == \
        {"dtype": "bfloat16", "quantization": "int4"}
    assert quality.parse_kwargs("enforce_eager=true, block_size=32,quantization=none") == \
        {"enforce_eager": True, "block_size": 32, "quantization": None}
    with pytest.raises(SystemExit):
        quality.parse_kwargs("bfloat16")


def test_compare_distributions_on_known_values():
    passages = {"a": [5, 0, 1]}  # 2 scored positions, targets 0 then 1
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]]))
    cand = torch.log(torch.tensor([[0.25, 0.75, 0.0], [0.9, 0.05, 0.05]]))
    d = quality.compare_distributions({"a": ref}, {"a": cand}, passages)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert d["positions"] == 2
    assert d["kl_mean"] == pytest.approx(kl0 / 2) and d["kl_max"] == pytest.approx(kl0)
    assert d["top1"] == 0.5  # position 0: argmax 0 (tie -> first) vs 1
    assert d["nll_ref"] == pytest.approx((math.log(2) - math.log(0.05)) / 2)
    assert d["nll"] == pytest.approx((math.log(4) - math.log(0.05)) / 2)
    same = quality.compare_distributions({"a": ref}, {"a": ref}, passages)
    assert same["kl_mean"] == 0 and same["top1"] == 1


def test_compare_greedy():
    g = quality.compare_greedy([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 6]])
    assert g["identical"] == 0.5 and g["prefixes"] == [3, 1] and g["prefix_mean"] == 2


def test_prefill_and_forced_decode_agree_on_the_reference():
    # One float32 engine: the captured prefill rows and the forced decode rows are the same
    # distributions, and the forced decode really fed the passage back.
    passages, prompts = quality.encode_inputs(None)
    passages = {k: passages[k][:16] for k in ("prose", "chat")}
    res = quality.run_setting(quality.default_reference(), passages, prompts[:2], 2)
    for name, ids in passages.items():
        assert res["prefill"][name].shape == res["decode"][name].shape == \
            (len(ids) - 1, res["prefill"][name].shape[1])
    d = quality.compare_distributions(res["prefill"], res["decode"], passages)
    assert d["top1"] == 1 and d["kl_max"] < 1e-5
    assert [len(g) for g in res["greedy"]] == [2, 2]
