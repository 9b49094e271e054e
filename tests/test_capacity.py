"""Capacity planning: the numbers follow the lecture's KV formula, and the engine allocates and
runs exactly what the plan says (blocks for a budget, sequences that fit at once)."""
import json
import math
import time

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.block_manager import blocks_spanning
from engine.capacity import (CapacityPlan, GGUFHeader, blocks_for_budget, count_parameters,
                             format_bytes, plan_capacity, plan_for_config, read_model_config)
from engine.loader import GGUFFile
from server.cli import main
from test_models_hf import ARCHS, COMMON, make_model

GiB = 2**30


@pytest.fixture(scope="module")
def smollm_cfg():
    return read_model_config(None)[1]


def _save_tiny(path, config_cls: str, model_cls: str, **extra) -> str:
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    getattr(transformers, model_cls)(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("llama"), "LlamaConfig", "LlamaForCausalLM")


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):  # window 32 over blocks of 8
    return _save_tiny(tmp_path_factory.mktemp("mistral"), "MistralConfig", "MistralForCausalLM",
                      sliding_window=32)


# ---------------------------------------------------------------- the formula

def test_smollm2_kv_bytes_follow_the_formula(smollm_cfg):
    m = smollm_cfg
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (30, 9, 3, 64)
    for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        plan = plan_capacity(m, dtype, "cpu", kv_cache_memory="2GiB", seq_len=2048)
        assert plan.kv_bytes_per_token == 2 * 64 * 3 * 30 * nbytes == 11_520 * nbytes
        assert plan.mha_kv_bytes_per_token == 2 * 64 * 9 * 30 * nbytes
        assert plan.mha_kv_bytes_per_token == 3 * plan.kv_bytes_per_token
        assert plan.gqa_saving == 3
        assert plan.bytes_per_block == 16 * plan.kv_bytes_per_token
        assert plan.num_kv_blocks == 2 * GiB // plan.bytes_per_block
        assert plan.usable_blocks == plan.num_kv_blocks - 1
        assert plan.blocks_per_seq == plan.prefill_blocks_per_seq == 2048 // 16
        assert plan.seqs_at_once == plan.usable_blocks // 128
        assert plan.kv_bytes_per_seq == 2048 * plan.kv_bytes_per_token
        assert plan.weight_bytes == plan.num_params * nbytes
    fp32 = plan_capacity(m, "float32", "cpu", kv_cache_memory="2GiB", seq_len=2048)
    assert fp32 == plan_capacity(m, torch.float32, "cpu", kv_cache_memory=2 * GiB, seq_len=2048)
    assert (fp32.kv_bytes_per_token, fp32.num_kv_blocks, fp32.seqs_at_once) == (46_080, 2912, 22)
    bf16 = plan_capacity(m, "bfloat16", "cpu", kv_cache_memory="2GiB", seq_len=2048)
    assert (bf16.kv_bytes_per_token, bf16.num_kv_blocks, bf16.seqs_at_once) == (23_040, 5825, 45)
    # defaults: the CPU budget is 1GiB, max_model_len the model's 8192, seq_len max_model_len
    default = plan_capacity(m, "float32", "cpu")
    assert default.kv_budget == GiB and default.max_model_len == default.seq_len == 8192


def test_sliding_window_bounds_the_blocks_per_sequence(tiny_mistral):
    cfg = read_model_config(tiny_mistral)[1]
    assert cfg.sliding_window == 32
    plan = plan_capacity(cfg, "float32", "cpu", block_size=8, num_kv_blocks=24, seq_len=128)
    assert plan.kept_tokens == 32 and plan.kv_bytes_per_seq == 32 * plan.kv_bytes_per_token
    assert plan.blocks_per_seq == math.ceil(31 / 8) + 1 == 5      # not ceil(128 / 8) = 16
    assert plan.seqs_at_once == 23 // 5 == 4
    assert plan.prefill_blocks_per_seq == 16                      # a 128-token chunk: all of it
    chunked = plan_capacity(cfg, "float32", "cpu", block_size=8, num_kv_blocks=24, seq_len=128,
                            max_num_batched_tokens=16)
    assert chunked.prefill_blocks_per_seq == math.ceil((32 + 16 - 2) / 8) + 1 == 7
    assert plan.max_model_len == cfg.max_position_embeddings == 512  # > the pool's 184 tokens
    with pytest.raises(ValueError, match="sliding window of 32 tokens needs 5 KV blocks"):
        plan_capacity(cfg, "float32", "cpu", block_size=8, num_kv_blocks=5)
    short = plan_capacity(cfg, "float32", "cpu", block_size=8, num_kv_blocks=24, seq_len=20)
    assert short.blocks_per_seq == 3 and short.kept_tokens == 20
    # the window's bound holds however the window falls on the blocks
    for window in range(1, 40):
        bound = blocks_spanning(window, 8)
        spans = {len({p // 8 for p in range(s, s + window)}) for s in range(16)}
        assert bound == max(spans)


def test_bad_plans_are_refused(smollm_cfg):
    with pytest.raises(ValueError, match="max_model_len"):
        plan_capacity(smollm_cfg, "float32", "cpu", kv_cache_memory="2GiB", seq_len=9000)
    with pytest.raises(ValueError, match="needs more KV cache"):
        plan_capacity(smollm_cfg, "float32", "cpu", num_kv_blocks=10, max_model_len=1000)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        plan_capacity(smollm_cfg, "float32", "cpu", num_kv_blocks=1)
    with pytest.raises(ValueError, match="cannot parse"):
        plan_capacity(smollm_cfg, "float32", "cpu", kv_cache_memory="lots")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            plan_capacity(smollm_cfg, "auto", "cuda")


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 46_080, 2 * GiB, 737_280)] == \
        ["0 B", "1,023 B", "45.00 KiB", "2.00 GiB", "720.00 KiB"]


# ---------------------------------------------------------------- parameters

def test_gguf_header_reads_the_same_config_without_the_tensors(smollm_cfg):
    path = read_model_config(None)[0].path
    header = GGUFHeader(path)
    assert smollm_cfg == GGUFFile(path).config()
    weights = sum(math.prod(shape) for name, shape in header.tensor_shapes.items()
                  if name != "rope_freqs.weight")
    assert count_parameters(smollm_cfg) == weights == 134_515_008


@pytest.mark.parametrize("kind", list(ARCHS))
def test_parameters_match_the_loaded_model(kind, tmp_path):
    hf = make_model(kind, tmp_path)
    engine = LLMEngine.from_args(model=str(tmp_path), dtype="bfloat16", device="cpu",
                                 num_kv_blocks=8)
    model = engine.runner.model
    plan = plan_for_config(engine.config)
    assert plan.num_params == sum(p.numel() for p in model.parameters()) \
        == sum(p.numel() for p in hf.parameters())
    assert plan.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------- against the engine

@pytest.fixture(scope="module")
def smollm_dummy():
    return LLMEngine.from_args(dtype="float32", device="cpu", kv_cache_memory="64MiB",
                               load_format="dummy")


def test_smollm2_blocks_and_parameters_match_the_engine(smollm_dummy, smollm_cfg):
    engine = smollm_dummy
    plan = plan_capacity(smollm_cfg, "float32", "cpu", kv_cache_memory="64MiB", seq_len=1024)
    cache = engine.runner.kv_cache
    assert engine.config.num_kv_blocks == plan.num_kv_blocks == 64 * 2**20 // (46_080 * 16) == 91
    assert cache.numel() * cache.element_size() == plan.kv_cache_bytes
    assert plan.kv_cache_bytes == engine.config.kv_cache_bytes
    assert engine.config.max_model_len == plan.max_model_len == 90 * 16
    assert engine.kv.pool.num_usable == plan.usable_blocks
    assert sum(p.numel() for p in engine.runner.model.parameters()) == plan.num_params
    same = plan_for_config(engine.config, seq_len=1024)
    for name in ("num_kv_blocks", "kv_cache_bytes", "blocks_per_seq", "seqs_at_once",
                 "prefill_blocks_per_seq", "max_model_len"):
        assert getattr(same, name) == getattr(plan, name), name
    if not hasattr(engine, "capacity"):
        pytest.skip("LLMEngine.capacity(seq_len) is not added yet")
    got = engine.capacity(1024).to_dict()
    assert {k: v for k, v in got.items() if k != "model"} == \
        {k: v for k, v in same.to_dict().items() if k != "model"}


@pytest.mark.parametrize("budget,dtype", [("1MiB", "bfloat16"), (1_000_003, "float32"),
                                          ("1KiB", "float32"), ("3.5MiB", "float16")])
def test_blocks_for_a_budget_match_the_engine(tiny_llama, budget, dtype):
    engine = LLMEngine.from_args(model=tiny_llama, dtype=dtype, device="cpu",
                                 kv_cache_memory=budget, max_num_seqs=4)
    cfg = engine.config
    plan = plan_capacity(cfg.model, dtype, "cpu", kv_cache_memory=budget)
    assert cfg.num_kv_blocks == plan.num_kv_blocks == blocks_for_budget(
        cfg.model, cfg.dtype, cfg.device, 16, budget)
    assert cfg.num_kv_blocks == max(2, plan.kv_budget // plan.bytes_per_block)
    cache = engine.runner.kv_cache
    assert cache.numel() * cache.element_size() == plan.kv_cache_bytes
    assert cfg.max_model_len == plan.max_model_len
    assert engine.kv.watermark_blocks == plan.watermark_blocks


def _run_at_capacity(engine, num_requests: int, prompt_len: int, max_tokens: int):
    """Submit more same-length requests than fit; returns (max running, max used blocks per
    running sequence after any step). Every request must finish whole."""
    vocab = engine.config.model.vocab_size
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(num_requests):  # distinct prompts: no prefix sharing
        engine.add_request(f"r{i}", [(i * prompt_len + j) % (vocab - 1) + 1
                                     for j in range(prompt_len)], params)
    max_running, max_used_per_seq, done = 0, 0.0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        running = len(engine.scheduler.running)
        max_running = max(max_running, running)
        if running:
            max_used_per_seq = max(max_used_per_seq, engine.kv.pool.num_used / running)
    assert len(done) == num_requests
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in done.values())
    assert engine.kv.pool.num_used == 0
    return max_running, max_used_per_seq


@pytest.mark.parametrize("num_kv_blocks", [46, 105])  # 105: the watermark keeps 1 block
def test_sequences_that_fit_at_once_match_the_engine(tiny_llama, num_kv_blocks):
    # L = 64 tokens = 8 blocks of 8; the prompt (60) already claims all 8 at admission
    engine = LLMEngine.from_args(model=tiny_llama, dtype="float32", device="cpu", block_size=8,
                                 num_kv_blocks=num_kv_blocks, max_num_seqs=256,
                                 max_num_batched_tokens=8192, enable_prefix_caching=False)
    plan = plan_for_config(engine.config, 64)
    assert plan.blocks_per_seq == 8
    assert plan.seqs_at_once == (num_kv_blocks - 1) // 8
    max_running, per_seq = _run_at_capacity(engine, 2 * plan.seqs_at_once + 1, 60, 4)
    assert max_running == plan.seqs_admitted_at_once
    assert engine.scheduler.num_preemptions == 0
    assert per_seq == plan.blocks_per_seq
    if num_kv_blocks == 105:  # 13 fit the pool, 12 are admitted past the watermark
        assert (plan.seqs_at_once, plan.seqs_admitted_at_once) == (13, 12)


def test_sequences_that_fit_at_once_with_a_window(tiny_mistral):
    # L = 128 = 4 windows; a 40-token prompt holds 5 blocks, the window's bound
    engine = LLMEngine.from_args(model=tiny_mistral, dtype="float32", device="cpu",
                                 block_size=8, num_kv_blocks=24, max_num_seqs=256,
                                 max_num_batched_tokens=8192, enable_prefix_caching=False)
    plan = plan_for_config(engine.config, 128)
    assert (plan.blocks_per_seq, plan.seqs_at_once) == (5, 4)
    max_running, per_seq = _run_at_capacity(engine, 2 * plan.seqs_at_once + 1, 40, 88)
    assert engine.scheduler.num_preemptions == 0
    assert max_running == plan.seqs_at_once
    assert per_seq <= plan.blocks_per_seq


# ---------------------------------------------------------------- `kvserve info`

def test_cli_info_prints_the_plan(capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("kvserve info must not open the weights")
    monkeypatch.setattr(GGUFFile, "__init__", no_weights)
    start = time.perf_counter()
    assert main(["info", "--device", "cpu", "--dtype", "float32", "--memory", "2GiB",
                 "--seq-len", "2048"]) == 0
    assert time.perf_counter() - start < 3
    out = capsys.readouterr().out
    for text in ("SmolLM2-135M-Instruct", "134,515,008",
                 "2 (K,V) × 64 head_dim × 3 kv heads × 30 layers × 4 B = 46,080 B",
                 "138,240 B: GQA saves 3×", "2,912 = floor(2.00 GiB / 720.00 KiB)",
                 "2,911 usable", "2,048 tokens × 46,080 B = 90.00 MiB = 128 blocks",
                 "22 sequences of 2,048 tokens = floor(2,911 / 128)"):
        assert text in out, text
    assert main(["info", "--device", "cpu", "--dtype", "bf16", "--memory", "2GiB",
                 "--seq-len", "2048", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["kv_bytes_per_token"] == 23_040 and numbers["num_kv_blocks"] == 5825
    assert numbers["seqs_at_once"] == 45 and numbers["num_params"] == 134_515_008


def test_cli_info_on_a_windowed_hf_model(capsys, tiny_mistral):
    assert main(["info", "--model", tiny_mistral, "--device", "cpu", "--num-kv-blocks", "24",
                 "--block-size", "8", "--seq-len", "128", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["window"] == 32 and numbers["blocks_per_seq"] == 5
    assert numbers["seqs_at_once"] == 4 and numbers["kv_budget"] is None
    assert main(["info", "--model", tiny_mistral, "--device", "cpu", "--num-kv-blocks", "24",
                 "--block-size", "8", "--seq-len", "128"]) == 0
    assert "min(128, W=32)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--memory", "abc"], "cannot parse memory size 'abc'"),
    (["--seq-len", "0"], "seq_len must be >= 1"),
    (["--memory", "2GiB", "--seq-len", "9000"], "exceeds max_model_len 8192"),
    (["--num-kv-blocks", "1"], "at least 2 blocks"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--model", "/no/such/model"], "neither a .gguf file"),
])
def test_cli_info_bad_input_exits_2(capsys, argv, message):
    assert main(["info", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvserve: error:") and message in err
