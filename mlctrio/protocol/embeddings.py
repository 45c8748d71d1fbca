"""POST /v1/embeddings: the request and the response, as OpenAI (and vLLM) shape them.

`input` is one text, a list of texts, one list of token ids or a list of them (at most
`MAX_INPUTS` items, none empty); each item is embedded on its own and `data[i]` answers item i.
`encoding_format` "base64" sends each vector as the base64 of its little-endian float32 bytes
(what the official SDK asks for by default, and decodes). `dimensions` is accepted where the
model allows it (the server checks). vLLM's extensions: `truncate_prompt_tokens` (keep the last
k tokens of each input; -1: as many as the model takes), `add_special_tokens` (default true)
and `normalize` (default true: L2-normalised vectors).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Final, Literal

import attrs
import numpy as np
import numpy.typing as npt

from mlctrio.protocol.validate import FieldError, constraints

#: OpenAI's limit on the items of one request.
MAX_INPUTS: Final = 2048

EmbeddingInput = str | tuple[str, ...] | tuple[int, ...] | tuple[tuple[int, ...], ...]


@attrs.frozen(kw_only=True)
class EmbeddingRequest:
    input: EmbeddingInput = attrs.field(
        metadata=constraints(
            minItems=1,
            maxItems=MAX_INPUTS,
            items={"minimum": 0, "minItems": 1, "items": {"minimum": 0}},
        )
    )
    model: str
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = attrs.field(default=None, metadata=constraints(minimum=1))
    user: str | None = None
    truncate_prompt_tokens: int | None = attrs.field(default=None, metadata=constraints(minimum=-1))
    add_special_tokens: bool | None = None
    normalize: bool | None = None

    def _check(self) -> None:  # the converter calls it once the fields are structured
        for k, item in enumerate(self.prompts):
            if isinstance(item, str) and not item:
                where = ("input",) if isinstance(self.input, str) else ("input", k)
                raise FieldError("an input must not be empty", where)
        if self.truncate_prompt_tokens == 0:
            raise FieldError(
                "must be -1 or a positive number of tokens", ("truncate_prompt_tokens",)
            )

    @property
    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        """The inputs, each a string or a tuple of token ids."""
        value = self.input
        if isinstance(value, str):
            return (value,)
        if all(isinstance(v, int) for v in value):
            return (value,)  # type: ignore[return-value]  # one list of token ids
        return value  # type: ignore[return-value]


def encode_vector(
    vector: npt.NDArray[np.float32], encoding_format: str | None
) -> list[float] | str:
    """One embedding as the response carries it: a list of floats, or base64 of float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    result: list[float] = vector.tolist()
    return result


def embedding_response(
    model: str,
    vectors: Sequence[npt.NDArray[np.float32]],
    encoding_format: str | None,
    prompt_tokens: int,
) -> dict[str, Any]:
    """The JSON body of a successful POST /v1/embeddings."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
