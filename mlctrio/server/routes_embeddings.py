"""POST /v1/embeddings: each input becomes one engine request that computes its prompt and pools
the final hidden states (runtime/prompt_outputs.py); the vectors are normalised and encoded here.

Rules:

- Any served model embeds (`model` names it; the main model when absent): the pooling is the
  model's own (models/pooling.py). Embedding requests go through the engine's scheduler like any
  prompt: chunked, batched with the prefills and decodes of generating requests, taking KV pages
  only while they compute and never leaving them in the prefix cache.
- Inputs are submitted in waves of at most `WAVE` requests (one wave at a time), so a request
  of OpenAI's maximum of 2048 inputs neither fills the engine's queue nor holds 2048 prompts'
  pages; all inputs are checked (tokenized, sized) before the first wave starts.
- `dimensions` must be the model's hidden size (no model served here is trained for shorter,
  Matryoshka-style vectors, and truncating others gives poor vectors: vLLM refuses too).
- `normalize` (default true): each vector is divided by its L2 norm, as OpenAI's are.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt
from quart import Response

from ..engine.types import GenerationRequest, SamplingParams
from ..errors import InvalidRequestError
from ..protocol.embeddings import embedding_response
from ..protocol.openai import parse_embedding_request
from . import generation as g
from . import prompts
from .state import json_response, read_request
from .streaming import collect, deadline_for, in_thread

#: Engine requests in flight per HTTP request.
WAVE = 64

_PARAMS = SamplingParams(max_tokens=1, temperature=0.0)


async def embeddings() -> Response:
    arrival = time.monotonic()
    state, req, info = await read_request(parse_embedding_request)
    if info.hidden_size is None:
        raise InvalidRequestError(
            f"The model `{state.model_name}` does not compute embeddings.", param="model"
        )
    if req.dimensions is not None and req.dimensions != info.hidden_size:
        raise InvalidRequestError(
            f"The model `{state.model_name}` returns {info.hidden_size}-dimensional embeddings "
            f"and was not trained for shorter ones; `dimensions` may only be {info.hidden_size}.",
            param="dimensions",
        )
    window = info.context_window_size
    keep = req.truncate_prompt_tokens
    if keep is not None and (keep == -1 or keep >= window):
        keep = window - 1  # -1: as many as the model takes (one position stays for the engine)
    prompt_ids: list[list[int]] = await in_thread(
        lambda: prompts.prompt_token_lists(
            req, info.tokenizer, window, keep_last=keep, param="input"
        )
    )
    request_id = g.new_id("embd")
    deadline = deadline_for(state)
    vectors: list[npt.NDArray[np.float32]] = []
    for start in range(0, len(prompt_ids), WAVE):
        wave = [
            GenerationRequest(
                f"{request_id}-{start + k}", tuple(ids), _PARAMS, arrival, pooling=info.pooling
            )
            for k, ids in enumerate(prompt_ids[start : start + WAVE])
        ]
        finals = {o.request_id: o for o in await collect(state, wave, deadline) if o.finished}
        for request in wave:
            embedding = finals[request.request_id].embedding
            assert embedding is not None, "an embedding request ends with its embedding"
            vectors.append(embedding)
    if req.normalize is not False:
        vectors = [v / max(float(np.linalg.norm(v)), 1e-12) for v in vectors]
    num_tokens = sum(len(ids) for ids in prompt_ids)
    return json_response(
        embedding_response(state.model_name, vectors, req.encoding_format, num_tokens)
    )
