"""server/formatting.py in-process: hand-built RequestOutputs in, OpenAI bodies and chunks out
(no server, no model), for the echo / prompt-logprobs shapes that evaluation clients parse."""
from engine import RequestOutput
from engine.outputs import CompletionOutput, Logprob
from server.formatting import Formatter, sse_event
from server.protocol import CompletionRequest


class Pieces:
    """A tokenizer stub: token id i decodes to chr(ord('a') + i - 10)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 10) for i in ids)


PROMPT = [10, 11, 12]  # "abc"
PROMPT_LP = [None,
             {11: Logprob(-1.0, 2, "b"), 35: Logprob(-0.5, 1, "z")},
             {12: Logprob(-2.0, 1, "c")}]


def output(finished=True) -> RequestOutput:
    done = CompletionOutput(0, "d", [13], -0.1, [{13: Logprob(-0.1, 1, "d")}],
                            "length" if finished else None)
    return RequestOutput("r", "abc", PROMPT, [done], finished, PROMPT_LP)


def formatter(**body) -> Formatter:
    req = CompletionRequest(prompt=PROMPT, **body)
    return Formatter("cmpl-x", "m", False, req, [(PROMPT, None)], Pieces())


def test_echo_logprobs_put_the_prompt_first():
    body = formatter(echo=True, logprobs=1, max_tokens=1).full([output()])
    c = body["choices"][0]
    assert c["text"] == "abcd"
    assert c["logprobs"] == {"tokens": ["a", "b", "c", "d"],
                             "token_logprobs": [None, -1.0, -2.0, -0.1],
                             "top_logprobs": [None, {"b": -1.0, "z": -0.5}, {"c": -2.0},
                                              {"d": -0.1}],
                             "text_offset": [0, 1, 2, 3]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_max_tokens_0_shows_only_the_prompt():
    body = formatter(echo=True, logprobs=0, max_tokens=0).full([output()])
    c = body["choices"][0]
    assert c["text"] == "abc" and c["logprobs"]["tokens"] == ["a", "b", "c"]
    assert c["logprobs"]["top_logprobs"] == [None, {"b": -1.0}, {"c": -2.0}]
    assert body["usage"]["completion_tokens"] == 0


def test_vllm_prompt_logprobs_field():
    c = formatter(prompt_logprobs=0, max_tokens=1).full([output()])["choices"][0]
    assert c["text"] == "d" and c["logprobs"] is None
    assert c["prompt_logprobs"] == [
        None, {"11": {"logprob": -1.0, "rank": 2, "decoded_token": "b"}},
        {"12": {"logprob": -2.0, "rank": 1, "decoded_token": "c"}}]


def test_streamed_echo_sends_the_prompt_once_then_deltas():
    fmt = formatter(echo=True, logprobs=0, max_tokens=2, stream=True)
    first = list(fmt.delta_chunks(0, output(finished=False)))
    assert len(first) == 1
    c = first[0]["choices"][0]
    assert c["text"] == "abcd" and c["finish_reason"] is None
    assert c["logprobs"]["tokens"] == ["a", "b", "c", "d"]
    out = output()
    out.outputs[0] = CompletionOutput(0, "de", [13, 14], -0.3,
                                      [{13: Logprob(-0.1, 1, "d")}, {14: Logprob(-0.2, 1, "e")}],
                                      "length")
    c = list(fmt.delta_chunks(0, out))[0]["choices"][0]
    assert c["text"] == "e" and c["finish_reason"] == "length"
    assert c["logprobs"]["tokens"] == ["e"] and c["logprobs"]["text_offset"] == [4]
    assert sse_event({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()
