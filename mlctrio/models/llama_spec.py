"""The exported functions of LlamaForCausalLM and their signatures (mlc-llm's names).

Every library has embed, prefill, batch_prefill, batch_decode, decode, batch_verify,
batch_prefill_to_last_hidden_states and create_paged_kv_cache; a config with `hidden_outputs`
adds batch_prefill_hidden, batch_decode_hidden and decode_hidden (the same steps, also
returning the final hidden states: Medusa and EAGLE drafts read them); a model whose layers
decode with the float group kernel adds batch_decode_r2 and batch_decode_r8 (and their `_hidden`
forms): batch_decode with row blocks of 2 and 8 instead of 4, for steps of 2 and of 5 or more
rows (quantization.decode_row_block).
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from mlctrio.models.quantization import DECODE_ROW_BLOCKS


def default_spec(model: Any) -> nn.spec.ModuleSpec:
    """The signatures of every exported function (what TVM's export_tvm compiles)."""
    h, dt = model.config.hidden_size, model.act_dtype
    packed = {"param_mode": "packed", "effect_mode": "none"}
    kv = nn.spec.Object(object_type=PagedKVCache)
    mod_spec = {
        "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
        "prefill": {
            "input_embed": nn.spec.Tensor([1, "seq_len", h], dt),
            "paged_kv_cache": kv,
            "$": packed,
        },
        "batch_prefill": {
            "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
            "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
            "paged_kv_cache": kv,
            "$": packed,
        },
        "batch_decode": {
            "input_embeds": nn.spec.Tensor(["batch_size", 1, h], dt),
            "paged_kv_cache": kv,
            "$": packed,
        },
        "decode": {
            "input_embed": nn.spec.Tensor([1, 1, h], dt),
            "paged_kv_cache": kv,
            "$": packed,
        },
        "batch_verify": {
            "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
            "paged_kv_cache": kv,
            "$": packed,
        },
        "batch_prefill_to_last_hidden_states": {
            "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
            "paged_kv_cache": kv,
            "$": packed,
        },
        "create_paged_kv_cache": {
            "max_batch_size": int,
            "max_total_seq_len": int,
            "prefill_chunk_size": int,
            "page_size": int,
            "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        },
    }
    if model.config.hidden_outputs:  # the same signatures as the steps they extend
        for name in ("batch_prefill", "batch_decode", "decode"):
            mod_spec[f"{name}_hidden"] = dict(mod_spec[name])  # from_raw pops "$"
    if model.row_block_forms:  # batch_decode with other row blocks in the float group kernels
        bases = ["batch_decode", *(["batch_decode_hidden"] if model.config.hidden_outputs else [])]
        for base in bases:
            for rows in DECODE_ROW_BLOCKS:
                mod_spec[f"{base}_r{rows}"] = dict(mod_spec["batch_decode"])
    return nn.spec.ModuleSpec.from_raw(mod_spec, model)
