import os

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


def engine_logits(engine, ids: list[int]) -> torch.Tensor:
    """All-position logits of one prompt through the engine's paged path: [len(ids), vocab]."""
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    seq = Sequence("logits", 0, ids, SamplingParams())
    engine.kv.allocate(seq, len(ids))
    try:
        runner = engine.runner
        with torch.inference_mode():
            input_ids, positions, meta, _ = runner.prepare([seq], [len(ids)])
            hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
            return runner.model.compute_logits(hidden)
    finally:
        engine.kv.free(seq)


@pytest.fixture(scope="session")
def smollm_path():
    from engine.loader import default_gguf_path
    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from engine import LLM
    return LLM(dtype="float32", device="cpu", kv_cache_memory="512MiB")


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm_path), gguf_file=os.path.basename(smollm_path),
        dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(smollm_path),
                                         gguf_file=os.path.basename(smollm_path))


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers' own KV cache (no logits processors, EOS kept)."""
    out, past, x = [], None, torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            res = model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            x = torch.tensor([[token]])
    return out


@pytest.fixture(scope="session")
def server():
    """`kvserve serve --max-num-seqs 16 --max-model-len 1024` in this process (server_utils'
    InProcessServer), built once for the API test modules that need nothing of their own
    (scoring, structured output, tool calls; none reads the server's counters). A module
    that needs another server defines its own `server` (and `client`), which wins."""
    from server_utils import InProcessServer
    with InProcessServer("--max-num-seqs", "16", "--max-model-len", "1024") as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    with server.client(timeout=120.0) as c:
        yield c
