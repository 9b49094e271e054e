"""The KV inspector: `GET /v1/kv/state` (JSON, behind the API key like the other /v1 routes)
and `GET /kv`, the page that draws it (server/static/kv.html: HTML, CSS and JS in one file,
nothing loaded from elsewhere; open, its script asks for the key when the JSON answers 401).

The state is a KVSnapshot (engine/kv_state.py) that the engine thread copies between two
steps (AsyncEngine.kv_state); it is turned into JSON here, off the engine thread, with the
capacity plan (engine/capacity.py) of the running engine added.
"""
from __future__ import annotations

import functools
from importlib import resources
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from server.async_engine import EngineDead
from server.errors import APIError, api_error
from server.protocol import error_responses
from server.state import server_state

router = APIRouter()       # behind the API key, like /v1/models
page_router = APIRouter()  # /kv is static: no key (server/middleware.py's OPEN_PATHS)

# The page may run its own inline script and style and talk to this origin, nothing else:
# a browser then refuses any resource from the net, so it works offline by construction.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")


class KVCounts(BaseModel):
    total: int        # usable blocks (block 0, the null block, is never handed out)
    free: int
    cached_free: int  # free but holding a prefix-cached block's KV until the pool needs it
    used: int
    shared: int       # used blocks with more than one holder


class KVBlocks(BaseModel):
    state: str                # one character per block id: n null, f free, c cached-free, u used
    hashed: str               # one character per block id: "1" if in the prefix cache
    shared: dict[str, int]    # block id -> ref count where above 1 (other used blocks: 1)


class KVSequence(BaseModel):
    request_id: str
    index: int
    status: Literal["prefill", "decode", "waiting"]
    num_prompt_tokens: int
    num_tokens: int
    num_computed_tokens: int
    num_cached_blocks: int
    num_evicted_blocks: int
    num_preemptions: int
    block_table: list[int | None]  # null: evicted by the sliding window


class KVPrefixCache(BaseModel):
    queries: int  # tokens looked up at admission
    hits: int     # of which found in the cache
    hit_rate: float | None
    evictions: int


class KVStateResponse(BaseModel):
    """GET /v1/kv/state; `capacity` is `kvserve info --json` for the running engine."""
    model_config = ConfigDict(extra="allow")
    object: Literal["kv.state"]
    model: str
    snapshot: int
    time: float
    num_steps: int
    block_size: int
    sliding_window: int | None
    enable_prefix_caching: bool
    num_blocks: int
    counts: KVCounts
    usage: float
    blocks: KVBlocks
    states: dict[str, str]
    sequences: list[KVSequence]
    num_running: int
    num_waiting: int
    prefix_cache: KVPrefixCache
    num_preemptions: int
    capacity: dict


@router.get("/v1/kv/state", response_model=None,
            responses={200: {"model": KVStateResponse}, **error_responses(400, 503)})
async def kv_state(request: Request,
                   seq_len: int | None = Query(None, ge=1, description=(
                       "the sequence length the capacity plan's `seqs_at_once` is for "
                       "(default: max_model_len)"))):
    state = server_state(request)
    if seq_len is not None and seq_len > state.max_model_len:
        raise APIError(400, f"seq_len must be <= max_model_len ({state.max_model_len}), "
                            f"got {seq_len}", param="seq_len")
    try:
        snapshot = await state.aengine.kv_state()
    except EngineDead as e:
        raise api_error(e) from None
    body = snapshot.to_dict()
    body["model"] = state.model_name
    # the plan is arithmetic on the engine's frozen config: safe off the engine thread
    body["capacity"] = state.aengine.engine.capacity(seq_len).to_dict()
    # a JSONResponse as is: FastAPI's encoder would walk every element of the block arrays
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@functools.cache
def page_html() -> str:
    """server/static/kv.html, read once (package data: an installed kvserve has it)."""
    return (resources.files("server") / "static" / "kv.html").read_text(encoding="utf-8")


@page_router.get("/kv", response_class=HTMLResponse, include_in_schema=False)
async def kv_page():
    return HTMLResponse(page_html(), headers={"Content-Security-Policy": PAGE_POLICY,
                                              "Cache-Control": "no-cache"})
