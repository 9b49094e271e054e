"""What the routes read from `request.app.state.server`: the engine and the facts about the
model they answer with. build_app sets it; a test can build an app around any state."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from fastapi import Request

from engine.tokenizer import Tokenizer
from server.async_engine import AsyncEngine
from server.errors import APIError, api_error
from server.tools import template_tool_format


@dataclass
class ServerState:
    aengine: AsyncEngine
    model_name: str            # the name clients use (--served-model-name)
    root_model_name: str       # the engine's own name for the model
    tokenizer: Tokenizer | None  # the server's copy (see from_engine); None: token ids only
    max_model_len: int
    vocab_size: int
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_engine(cls, aengine: AsyncEngine, served_model_name: str | None = None
                    ) -> "ServerState":
        eng = aengine.engine
        # the engine thread detokenizes with its own tokenizer; a transformers tokenizer
        # object used from two threads at once can fail ("Already borrowed")
        tokenizer = copy.deepcopy(eng.tokenizer) if eng.tokenizer is not None else None
        return cls(aengine, served_model_name or eng.model_name, eng.model_name, tokenizer,
                   eng.config.max_model_len, eng.config.model.vocab_size)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:  # "" too: no such model
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error",
                           "model")

    def need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
        return self.tokenizer

    def prompt_ids(self, prompt) -> list[list[int]]:
        """A completions prompt (text, ids, or a batch of either) as token ids, per prompt."""
        if isinstance(prompt, str):
            return [self.need_tokenizer().encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], str):
            tokenizer = self.need_tokenizer()
            return [tokenizer.encode(p) for p in prompt]
        return [list(p) for p in prompt]

    @property
    def tool_format(self) -> str | None:
        """The tool-call format of the model's chat template, where kvserve reads it
        (server/tools.py): what tool_choice "auto" needs."""
        return template_tool_format(self.tokenizer.hf.chat_template) if self.tokenizer else None

    def chat_ids(self, messages, add_generation_prompt: bool,
                 tools: list[dict] | None = None) -> list[int]:
        """Chat messages (and the tools a call may use, where the template shows them to
        the model) through the model's template, as token ids."""
        tokenizer = self.need_tokenizer()
        try:
            tools_aware = self.tool_format is not None
            conv = [m.template_message(tools_aware) for m in messages]
            return tokenizer.apply_chat_template(conv, add_generation_prompt, tools)
        except ValueError as e:  # a content part we don't take, or no template
            raise api_error(e, "messages") from None
        except Exception as e:  # a template that rejects the conversation (e.g. roles)
            raise APIError(400, f"messages: the chat template failed: {e}",
                           param="messages") from None


def server_state(request: Request) -> ServerState:
    return request.app.state.server
