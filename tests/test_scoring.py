"""Teacher-forced scoring over HTTP (issue 14): echo + logprobs cover the prompt's tokens,
prompt_logprobs, max_tokens 0, /tokenizer_info, and lm-evaluation-harness end to end.

A float32 server equals transformers, so the prompt's logprobs are checked against
transformers' log-softmax of the same tokens. The server runs in process
(server_utils.InProcessServer, over httpx.ASGITransport); lm-evaluation-harness reaches the
same app on a real socket.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from clients.sse import iter_sse

PROMPT = "Roses are red, violets are blue"


@pytest.fixture
def socket_url(server):
    """The app's base URL on a real socket, for lm-evaluation-harness (it takes a URL)."""
    with server.listening() as url:
        yield url


def post(client, body: dict, path: str = "/v1/completions") -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(client, text: str) -> list[int]:
    return post(client, {"prompt": text, "add_special_tokens": False}, "/tokenize")["tokens"]


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from transformers (float32)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = logits.log_softmax(-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def check_shape(lp: dict, text: str) -> None:
    """The completions logprobs shape: equal lengths, offsets cumulative over the pieces
    (continuing from the prompt into the completion), the first entry null."""
    n = len(lp["tokens"])
    assert all(len(lp[k]) == n for k in ("token_logprobs", "top_logprobs", "text_offset"))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(n)]
    assert "".join(lp["tokens"]) == text


def test_echo_logprobs_cover_the_prompt_then_the_completion(client, hf_smollm):
    ids = tokenize(client, PROMPT)
    echo = post(client, {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True,
                         "logprobs": 2})["choices"][0]
    plain = post(client, {"prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                          "logprobs": 2})["choices"][0]
    lp = echo["logprobs"]
    assert echo["text"] == PROMPT + plain["text"]
    assert len(lp["tokens"]) == len(ids) + 3
    check_shape(lp, echo["text"])
    # the prompt's part is transformers' teacher-forced log-probability of each token
    want = hf_logprobs(hf_smollm, ids)
    got = torch.tensor(lp["token_logprobs"][1:len(ids)])
    assert (got - want).abs().max().item() < 1e-3
    for tok, top in zip(lp["tokens"][1:len(ids)], lp["top_logprobs"][1:len(ids)]):
        assert tok in top and len(top) <= 3  # the token itself plus the top 2
    # the completion's part is what the request without echo returns
    assert lp["token_logprobs"][len(ids):] == pytest.approx(
        plain["logprobs"]["token_logprobs"], abs=1e-5)
    assert lp["tokens"][len(ids):] == plain["logprobs"]["tokens"]


def test_token_id_prompts_in_a_batch_with_n(client, hf_smollm):
    a, b = tokenize(client, PROMPT), tokenize(client, "The capital of France is")
    r = post(client, {"prompt": [a, b], "max_tokens": 2, "n": 2, "echo": True, "logprobs": 0,
                      "temperature": 0.8, "seed": 1})
    choices = sorted(r["choices"], key=lambda c: c["index"])
    assert len(choices) == 4
    for c, ids in zip(choices, [a, a, b, b]):
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 2
        check_shape(lp, c["text"])
        want = hf_logprobs(hf_smollm, ids)
        assert (torch.tensor(lp["token_logprobs"][1:len(ids)]) - want).abs().max() < 1e-3
    assert r["usage"]["prompt_tokens"] == len(a) + len(b)  # each prompt once, as vLLM


def test_max_tokens_0_with_echo_scores_the_prompt_only(client, hf_smollm):
    ids = tokenize(client, PROMPT)
    r = post(client, {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
                      "temperature": 0})
    c = r["choices"][0]
    assert c["text"] == PROMPT and len(c["logprobs"]["tokens"]) == len(ids)
    check_shape(c["logprobs"], PROMPT)
    assert r["usage"]["completion_tokens"] == 0
    want = hf_logprobs(hf_smollm, ids)
    assert (torch.tensor(c["logprobs"]["token_logprobs"][1:]) - want).abs().max() < 1e-3
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_sends_the_prompt_first(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}
    full = post(client, body)["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(data) for data in iter_sse(r.iter_lines()) if data != "[DONE]"]
    chunks = [c for e in events for c in e["choices"]]
    assert chunks[0]["text"].startswith(PROMPT)
    assert "".join(c["text"] for c in chunks) == full["text"]
    merged = {k: [v for c in chunks if c["logprobs"] for v in c["logprobs"][k]]
              for k in full["logprobs"]}
    assert merged["tokens"] == full["logprobs"]["tokens"]
    assert merged["text_offset"] == full["logprobs"]["text_offset"]
    assert merged["token_logprobs"][0] is None
    assert merged["token_logprobs"][1:] == pytest.approx(full["logprobs"]["token_logprobs"][1:],
                                                         abs=1e-5)
    # scoring only, streamed: the prompt and nothing else
    body = {**body, "max_tokens": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(data) for data in iter_sse(r.iter_lines()) if data != "[DONE]"]
    assert "".join(c["text"] for e in events for c in e["choices"]) == PROMPT


def test_prompt_logprobs_field(client):
    ids = tokenize(client, PROMPT)
    r = post(client, {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 3,
                      "echo": True, "logprobs": 0})
    c = r["choices"][0]
    plp = c["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for t, entry, want in zip(ids[1:], plp[1:], c["logprobs"]["token_logprobs"][1:]):
        assert str(t) in entry and len(entry) in (3, 4)  # the token and the top 3
        assert entry[str(t)]["logprob"] == pytest.approx(want, abs=1e-5)
        assert {1, 2, 3} <= {e["rank"] for e in entry.values()}
    chat = post(client, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                         "prompt_logprobs": 0}, "/v1/chat/completions")
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 3


def test_prefix_cache_does_not_drop_prompt_logprobs(client):
    text = "A prompt long enough to fill a few cache blocks of sixteen tokens each. " * 4
    post(client, {"prompt": text, "max_tokens": 1})  # its blocks are now cached
    a = post(client, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
    b = post(client, {"prompt": text + "x", "max_tokens": 0, "echo": True, "logprobs": 0})
    lp = a["choices"][0]["logprobs"]["token_logprobs"]
    assert lp[0] is None and all(isinstance(x, float) for x in lp[1:])
    assert len(lp) == a["usage"]["prompt_tokens"]
    assert b["choices"][0]["logprobs"]["token_logprobs"][1:len(lp) - 1] == pytest.approx(
        lp[1:-1], abs=1e-4)


def test_tokenizer_info(client, server):
    info = client.get("/tokenizer_info").json()
    assert isinstance(info["tokenizer_class"], str) and info["tokenizer_class"]
    assert info["eos_token"] and info["chat_template"] and info["model_max_length"] == 1024
    assert tokenize(client, info["eos_token"]) == [info["eos_token_id"]]


def test_lm_evaluation_harness_end_to_end(socket_url, client, hf_smollm, tmp_path):
    """lm-evaluation-harness's local-completions model with the remote tokenizer (no local
    tokenizer, no hub) on a small multiple-choice task written here: every choice's
    loglikelihood equals transformers' for the same tokens, and so does the accuracy."""
    import os
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local file; never the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    docs = [("The capital of France is", [" Paris", " Rome", " Berlin"], 0),
            ("Two plus two equals", [" four", " five", " seven"], 0),
            ("The opposite of hot is", [" cold", " warm", " blue"], 0),
            ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin"], 0),
            ("The sun rises in the", [" west", " east", " north"], 1),
            ("A week has seven", [" days", " hours", " years"], 0)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": y}) + "\n"
                            for q, c, y in docs))
    (tmp_path / "mc.yaml").write_text(f"""task: kvserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": socket_url + "/v1/completions", "model": "SmolLM2-135M-Instruct",
                    "tokenizer_backend": "remote", "tokenized_requests": True,
                    "num_concurrent": 4, "max_retries": 1},
        tasks=["kvserve_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    samples = out["samples"]["kvserve_mc"]
    assert len(samples) == len(docs)
    correct = 0
    for s in samples:
        doc = s["doc"]
        ours = [float(r[0]) for r in s["filtered_resps"]]
        ctx = tokenize(client, doc["q"])
        theirs = []
        for choice in doc["choices"]:
            whole = tokenize(client, doc["q"] + choice)
            theirs.append(hf_logprobs(hf_smollm, whole)[len(ctx) - 1:].sum().item())
        assert ours == pytest.approx(theirs, abs=1e-3)
        correct += max(range(len(theirs)), key=theirs.__getitem__) == doc["label"]
    acc = out["results"]["kvserve_mc"]["acc,none"]
    assert math.isclose(acc, correct / len(docs))
