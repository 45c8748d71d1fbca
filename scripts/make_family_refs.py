"""Make tiny random-weight reference checkpoints for several model families.

What
----
For each model family below this script builds a tiny (vocab 512, hidden 64,
4 query heads / 2 KV heads of head_dim 16) fp32 model with Hugging Face
``transformers`` -- the reference implementation -- re-initialises its weights
deterministically, saves it with ``save_pretrained(..., safe_serialization=True)``
and records reference outputs computed with ``attn_implementation="eager"``::

    tests/data/families/<family>/config.json              (as transformers writes it)
    tests/data/families/<family>/generation_config.json   (as transformers writes it)
    tests/data/families/<family>/model.safetensors        (fp32, as transformers writes it)
    tests/data/families/<family>/reference.json           (prompts, top-5 logprobs, greedy, ...)

Families: qwen3, gemma3_text, phi3 (longrope), mistral (sliding window 16),
mixtral (4 experts, top-2), qwen3_moe (4 experts, top-2, one dense layer).

For every family but mistral it also writes (unless ``--gguf skip``, or the
converter is missing) a tiny byte-level BPE tokenizer (tokenizer.json,
tokenizer_config.json; exactly 512 ids) and ``gguf/model.gguf`` (F32) made by
llama.cpp's ``convert_hf_to_gguf.py``; the GGUF tensors are checked to equal
the safetensors ones.  llama.cpp reads gemma3 GGUFs with fixed rules (every 6th
layer global, q scaled by head_dim ** -0.5) that differ from this config, so
gemma3_text also gets ``gguf_reference.json``: the same weights under those rules.
llama.cpp cannot hold Qwen3-MoE's dense layer, so qwen3_moe's GGUF is made of an
all-sparse variant with weights of its own, whose outputs are its ``gguf_reference.json``.
phi3's tokenizer_config.json names GPT2Tokenizer (the converter's phi3 vocabulary
path for a BPE, as Phi-4-mini's files do), and its reference.json also holds
``served_long``: the outputs with long factors at every position, which is what
llama.cpp (and mlctrio, vLLM) compute when serving a context above
original_max_position_embeddings.

Why
---
The project's tests compare its own compiled models against these files
without needing torch or transformers at test time.  transformers' default
init (std 0.02) gives almost uniform logits, hence top-1 ties and brittle
greedy tests; so every weight is re-drawn at a larger scale (matrices
N(0, 0.2 * sqrt(64 / fan_in)), embeddings and lm_head N(0, 0.3), norms
1 +- 0.2; Gemma, whose RMSNorm multiplies by (1 + w), gets w = 0 +- 0.2 except
the final norm (1 +- 0.2) and post-feed-forward norms (3 +- 0.2), and embeddings
N(0, 0.15): with tied embeddings the default recipe makes greedy output repeat
the last token).  Each prompt is the first (in a fixed seed order) whose greedy
run is a good test: top1 - top2 >= 0.2 at every step, >= 4 distinct new ids,
none of 0/1/2, and for MoE every routing decision clear (router logit gap at the
top-k boundary >= 0.01).

reference.json keys
-------------------
prompts       token ids, all in [3, vocab) (0/1/2 are pad/bos/eos); lengths 1,
              7, 23, 53 (phi3 also 29, which crosses the longrope switch while
              generating, and 100)
top5          at the LAST prompt position: [[token_id, logprob], ...5] where
              logprob = log_softmax in float64 of the float32 logits the model
              returns (after any final-logit soft-capping)
greedy        8 new tokens from model.generate(do_sample=False,
              max_new_tokens=8, use_cache=True), with eos stopping disabled
greedy_nocache  the same, recomputing the whole sequence each step
              (always stored; greedy_cache_equals_nocache says if it differs)
greedy_min_margin  smallest top1 - top2 logprob gap over every greedy step of
              every prompt (cache and no-cache runs)
full_logits_check  extra checks (see its "description"): full last-position
              log-probs of one prompt, per-position prefill argmax, feature
              sensitivity, longrope / sliding-window / router diagnostics
gguf          (all but mistral) what the GGUF holds and which reference it matches
served_long   (phi3) top5 / greedy / margins of the same prompts with long factors throughout
partial_rotary  (phi3) the same for partial_rotary_factor 0.75 (Phi-4-mini's), with the
              rope_parameters that config.json then holds

How to regenerate
-----------------
Needs torch + transformers (a venv separate from the project's; for the GGUF
step also sentencepiece, which the converter imports)::

    /work/refvenv/bin/python scripts/make_family_refs.py [--out tests/data/families]
        [--only qwen3 phi3 ...] [--gguf auto|skip|require] [--converter PATH/convert_hf_to_gguf.py]

Everything is seeded; re-running with the same torch / transformers / llama.cpp
versions reproduces every file byte for byte.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 512
FIRST_ID = 3  # 0 pad, 1 bos, 2 eos; prompts never use them
SPECIAL_IDS = (0, 1, 2)
NEW_TOKENS = 8
PROMPT_LENGTHS = [1, 7, 23, 3 * 16 + 5]  # 53: three sliding windows (16) and then some
MARGIN_TARGET = 0.2  # wanted top1 - top2 logprob gap at every greedy step
MAX_PROMPT_TRIES = 400
MIN_DISTINCT = 4  # distinct ids among the 8 greedy tokens (avoid "repeat one token" runs)
ROUTER_GAP_TARGET = 0.01  # MoE: min gap between k-th and (k+1)-th router logit

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

LONGROPE_SHORT = [1.0, 1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 1.7]
LONGROPE_LONG = [1.0, 1.3, 1.8, 2.4, 3.0, 3.6, 4.0, 4.5]


def family_specs():
    """name -> (config class, model class, config kwargs, extra info)."""
    return {
        "qwen3": (
            Qwen3Config,
            Qwen3ForCausalLM,
            dict(
                COMMON,
                num_hidden_layers=2,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            {},
        ),
        "gemma3_text": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            dict(
                COMMON,
                num_hidden_layers=4,
                layer_types=[
                    "sliding_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention",
                ],
                sliding_window=16,
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                },
                query_pre_attn_scalar=24,
                final_logit_softcapping=30.0,
                attn_logit_softcapping=None,
                tie_word_embeddings=True,
                hidden_activation="gelu_pytorch_tanh",
            ),
            {},
        ),
        "phi3": (
            Phi3Config,
            Phi3ForCausalLM,
            dict(
                COMMON,
                num_hidden_layers=2,
                max_position_embeddings=128,
                original_max_position_embeddings=32,
                tie_word_embeddings=False,
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10_000.0,
                    "short_factor": LONGROPE_SHORT,
                    "long_factor": LONGROPE_LONG,
                    "original_max_position_embeddings": 32,
                },
            ),
            # 29 + 8 crosses original_max_position_embeddings=32 during generation;
            # 100 + 8 stays below max_position_embeddings=128.
            {"extra_prompt_lengths": [29, 100]},
        ),
        "mistral": (
            MistralConfig,
            MistralForCausalLM,
            dict(
                COMMON,
                num_hidden_layers=2,
                sliding_window=16,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            ),
            {},
        ),
        "mixtral": (
            MixtralConfig,
            MixtralForCausalLM,
            dict(
                COMMON,
                num_hidden_layers=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=None,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            {},
        ),
        "qwen3_moe": (
            Qwen3MoeConfig,
            Qwen3MoeForCausalLM,
            dict(
                COMMON,
                num_hidden_layers=3,
                num_experts=4,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                moe_intermediate_size=64,
                decoder_sparse_step=1,
                mlp_only_layers=[1],  # layer 1 is a dense MLP (intermediate_size=128)
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            ),
            {},
        ),
    }


FAMILY_SEEDS = {
    "qwen3": 1001,
    "gemma3_text": 1002,
    "phi3": 1003,
    "mistral": 1004,
    "mixtral": 1005,
    "qwen3_moe": 1006,
}


# --------------------------------------------------------------------------- weights


# Gemma-specific init.  With tied embeddings the default recipe makes the final
# hidden state point at the current token's own embedding (greedy output just
# repeats the last token), and with post-sublayer norms every sublayer adds a
# unit-RMS vector, so context averaging dominates (again: repetition).  A
# smaller embedding, a final-norm scale of ~2 and a post-feed-forward-norm
# scale of ~4 give varied, well-separated greedy continuations.
GEMMA_EMBED_STD = 0.15
GEMMA_NORM_CENTERS = {"model.norm.weight": 1.0, "post_feedforward_layernorm": 3.0}


def reinit_weights(model: torch.nn.Module, seed: int, gemma_norms: bool) -> dict:
    """Redraw every parameter with a scale that gives well-spread logits."""
    gen = torch.Generator().manual_seed(seed)
    rules = {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name:
                if gemma_norms:  # Gemma RMSNorm multiplies by (1 + w)
                    c = next((v for k, v in GEMMA_NORM_CENTERS.items() if k in name), 0.0)
                    new = c + (torch.rand(p.shape, generator=gen) * 2 - 1) * 0.2
                    rule = f"{name.split('.')[-2]}: {c} + uniform(-0.2, 0.2) [gemma: scale = 1 + w]"
                    if ".layers." in name:
                        rule = "layers.*." + rule
                else:
                    new = 1.0 + (torch.rand(p.shape, generator=gen) * 2 - 1) * 0.2
                    rule = "norms: 1 + uniform(-0.2, 0.2)"
            elif p.ndim == 1:  # biases (none in these configs, kept for safety)
                new = torch.randn(p.shape, generator=gen) * 0.1
                rule = "vectors: normal(0, 0.1)"
            elif "embed_tokens" in name:
                std = GEMMA_EMBED_STD if gemma_norms else 0.3
                new = torch.randn(p.shape, generator=gen) * std
                rule = f"embed_tokens: normal(0, {std})"
            elif name == "lm_head.weight":  # untied output head: a bit wider logits
                new = torch.randn(p.shape, generator=gen) * 0.3
                rule = "lm_head: normal(0, 0.3)"
            else:
                fan_in = p.shape[-1]
                std = 0.2 * math.sqrt(64 / fan_in)
                new = torch.randn(p.shape, generator=gen) * std
                rule = (
                    f"matrices with fan_in {fan_in}: normal(0, 0.2*sqrt(64/fan_in)) "
                    f"= normal(0, {std:.4f})"
                )
            p.copy_(new.to(p.dtype))
            rules[name] = rule
    return rules


# --------------------------------------------------------------------------- reference computations


def logprobs64(logits_row: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_row.detach().to(torch.float64), dim=-1)


def margin_of(lp: torch.Tensor) -> float:
    top2 = torch.topk(lp, 2).values
    return float(top2[0] - top2[1])


def no_eos_generation_config() -> GenerationConfig:
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=None,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=1,
        use_cache=True,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        return_dict_in_generate=True,
        output_logits=True,
    )


@torch.no_grad()
def greedy_cached(model, prompt: list[int]):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        generation_config=no_eos_generation_config(),
    )
    new = out.sequences[0, len(prompt) :].tolist()
    assert len(new) == NEW_TOKENS, new
    margins = [margin_of(logprobs64(step[0])) for step in out.logits]
    # generate's own logits must agree with its own choices
    assert [int(step[0].argmax()) for step in out.logits] == new
    return new, margins


@torch.no_grad()
def greedy_nocache(model, prompt: list[int]):
    seq = list(prompt)
    margins = []
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
        lp = logprobs64(logits)
        margins.append(margin_of(lp))
        seq.append(int(lp.argmax()))
    return seq[len(prompt) :], margins


def make_prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ID, VOCAB, (length,), generator=g).tolist()


class RouterProbe:
    """Records, for every MoE layer call, the smallest gap between the k-th and (k+1)-th
    router logit over the tokens of that call (k = num_experts_per_tok).  Expert choice
    depends only on the logit order, so a tiny gap means a fragile routing decision."""

    def __init__(self, model):
        self.handles = []
        self.gaps = []
        self.k = getattr(model.config, "num_experts_per_tok", None)
        for name, mod in model.named_modules():
            if self.k and name.endswith("mlp.gate") and hasattr(mod, "top_k"):
                self.handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, mod, inputs, output):
        s = torch.sort(output[0].to(torch.float64), dim=-1, descending=True).values
        self.gaps.append(float((s[:, self.k - 1] - s[:, self.k]).min()))

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def router_gap(model, seq: list[int]) -> float | None:
    """Smallest top-k boundary router-logit gap over all positions of seq and all MoE layers."""
    probe = RouterProbe(model)
    if not probe.active:
        probe.close()
        return None
    model(torch.tensor([seq]), use_cache=False)
    probe.close()
    return min(probe.gaps)


def choose_prompt(model, length: int, base_seed: int):
    """First prompt (in seed order) whose greedy run is a good test: every greedy step has a
    top1-top2 log-prob gap >= MARGIN_TARGET, the 8 new tokens contain >= MIN_DISTINCT
    distinct ids and none of 0/1/2, and (MoE) every routing decision over prompt + greedy
    has a router-logit gap >= ROUTER_GAP_TARGET."""
    best, best_score = None, -1.0
    for t in range(MAX_PROMPT_TRIES):
        seed = base_seed + t
        prompt = make_prompt(length, seed)
        g_c, m_c = greedy_cached(model, prompt)
        g_n, m_n = greedy_nocache(model, prompt)
        m = min(m_c + m_n)
        ok = not any(i in SPECIAL_IDS for i in g_c + g_n) and len(set(g_c)) >= MIN_DISTINCT
        rg = router_gap(model, prompt + g_c)
        score = min(m / MARGIN_TARGET, 1e9 if rg is None else rg / ROUTER_GAP_TARGET)
        rec = dict(
            seed=seed,
            prompt=prompt,
            greedy=g_c,
            greedy_nocache=g_n,
            margins=m_c,
            margins_nocache=m_n,
            margin=m,
            router_gap=rg,
        )
        if ok and score > best_score:
            best, best_score = rec, score
        if ok and score >= 1.0:
            return rec, t + 1
    print(
        f"  warning: no prompt of length {length} met the targets; best score {best_score:.3f}",
        file=sys.stderr,
    )
    return best, MAX_PROMPT_TRIES


@torch.no_grad()
def compute_reference(name: str, model, extra: dict, seed: int) -> dict:
    lengths = PROMPT_LENGTHS + list(extra.get("extra_prompt_lengths", []))
    prompts, greedy, greedy_nc, prompt_seeds, per_prompt_margin, tries, rgaps = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    all_margins = []
    for i, n in enumerate(lengths):
        rec, t = choose_prompt(model, n, seed * 1000 + i * 100_000)
        prompts.append(rec["prompt"])
        greedy.append(rec["greedy"])
        greedy_nc.append(rec["greedy_nocache"])
        prompt_seeds.append(rec["seed"])
        per_prompt_margin.append(rec["margin"])
        tries.append(t)
        rgaps.append(rec["router_gap"])
        all_margins += rec["margins"] + rec["margins_nocache"]

    top5, top5_raw, per_pos_argmax, per_pos_margin = [], [], [], []
    for p in prompts:
        logits = model(torch.tensor([p]), use_cache=False).logits[0]  # float32 [T, V]
        lp = logprobs64(logits[-1])
        v, ix = torch.topk(lp, 5)
        top5.append([[int(a), float(b)] for a, b in zip(ix, v, strict=True)])
        top5_raw.append([float(logits[-1, int(a)]) for a in ix])
        lp_all = torch.log_softmax(logits.to(torch.float64), dim=-1)
        t2 = torch.topk(lp_all, 2, dim=-1)
        per_pos_argmax.append(t2.indices[:, 0].tolist())
        per_pos_margin.append(
            [round(float(a - b), 6) for a, b in zip(t2.values[:, 0], t2.values[:, 1], strict=True)]
        )

    # full last-position log-probabilities for the 7-token prompt
    full_idx = 1
    full_lp = logprobs64(model(torch.tensor([prompts[full_idx]]), use_cache=False).logits[0, -1])

    check = {
        "description": (
            "last_logprobs: all VOCAB log-probs (float64 log_softmax of float32 logits) at the "
            "last position of prompts[prompt_index]. top5_raw_logits: the float32 logits (after "
            "any final soft-capping) of the top5 entries. "
            "per_position_argmax/per_position_margin: prefill argmax and top1-top2 log-prob gap "
            "at EVERY position of every prompt (no cache); compare only positions whose margin "
            "is comfortably above your tolerance. logit_std_last: std of the last-position "
            "float32 logits per prompt. top5_min_adjacent_gap: smallest log-prob gap between "
            "consecutive top5 entries (match top5 by id with a tolerance, not only by order)."
        ),
        "prompt_index": full_idx,
        "last_logprobs": [float(x) for x in full_lp],
        "top5_raw_logits": top5_raw,
        "per_position_argmax": per_pos_argmax,
        "per_position_margin": per_pos_margin,
        "top5_min_adjacent_gap": [min(a[1] - b[1] for a, b in itertools.pairwise(t)) for t in top5],
        "logit_std_last": [
            float(model(torch.tensor([p]), use_cache=False).logits[0, -1].to(torch.float64).std())
            for p in prompts
        ],
    }
    if rgaps[0] is not None:
        check["router_min_logit_gap_per_prompt"] = rgaps
        check["router_note"] = (
            "per prompt: smallest gap, over every position of prompt + greedy tokens (one no-cache "
            "forward) and every MoE layer, between the k-th and (k+1)-th largest router logit "
            "(k = num_experts_per_tok); prompts were chosen so that it is >= ROUTER_GAP_TARGET"
        )
        check["router_gap_target"] = ROUTER_GAP_TARGET
    if name == "gemma3_text":
        cap = model.config.final_logit_softcapping
        model.config.final_logit_softcapping = None
        nocap = logprobs64(model(torch.tensor([prompts[full_idx]]), use_cache=False).logits[0, -1])
        model.config.final_logit_softcapping = cap
        check["softcap_effect_max_abs_logprob_diff"] = float((nocap - full_lp).abs().max())
        check["softcap_note"] = (
            "max |logprob(with softcap 30) - logprob(without)| at the last position of "
            "prompts[prompt_index]"
        )

    sens = feature_sensitivity(name, model, prompts)
    if sens:
        check["feature_sensitivity"] = sens
    if name == "phi3":
        check["longrope"] = longrope_checks(model, prompts, greedy)
    if getattr(model.config, "sliding_window", None) and name == "mistral":
        check["sliding_window_receptive_field"] = receptive_field_check(model, prompts[-1])

    same = greedy == greedy_nc
    ref = {
        "family": name,
        "selection": {
            "margin_target": MARGIN_TARGET,
            "min_distinct_greedy_ids": MIN_DISTINCT,
            "prompt_tries": tries,
        },
        "model_class": type(model).__name__,
        "config_class": type(model.config).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "attn_implementation": "eager",
        "dtype": "float32",
        "prompt_lengths": [len(p) for p in prompts],
        "prompt_seeds": prompt_seeds,
        "prompts": prompts,
        "top5": top5,
        "greedy": greedy,
        "greedy_nocache": greedy_nc,
        "greedy_cache_equals_nocache": same,
        "greedy_min_margin": min(all_margins),
        "greedy_min_margin_per_prompt": per_prompt_margin,
        "full_logits_check": check,
    }
    return ref


@torch.no_grad()
def variant_logprobs(model, prompt: list[int], **changes) -> torch.Tensor:
    """Last-position log-probs of the same weights under a modified config."""
    cfg = copy.deepcopy(model.config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    m2 = type(model)(cfg).to(torch.float32).eval()
    m2.load_state_dict(model.state_dict())
    return logprobs64(m2(torch.tensor([prompt]), use_cache=False).logits[0, -1])


@torch.no_grad()
def feature_sensitivity(name: str, model, prompts) -> dict:
    """How much the last-position log-probs of the longest prompt move if a feature is
    dropped -- i.e. how loudly these references catch an implementation that ignores it."""
    p = max(prompts, key=len)
    ref = logprobs64(model(torch.tensor([p]), use_cache=False).logits[0, -1])
    cfg = model.config
    variants = {}
    if name == "gemma3_text":
        rp = copy.deepcopy(cfg.rope_parameters)
        rp["sliding_attention"]["rope_theta"] = rp["full_attention"]["rope_theta"]
        variants["no_sliding_window"] = dict(sliding_window=10_000)
        variants["local_rope_theta_equals_global"] = dict(rope_parameters=rp)
        variants["query_pre_attn_scalar_equals_head_dim"] = dict(query_pre_attn_scalar=cfg.head_dim)
        variants["no_final_logit_softcapping"] = dict(final_logit_softcapping=None)
    if name == "mistral":
        variants["no_sliding_window"] = dict(sliding_window=None)
    if name == "phi3":
        rp = copy.deepcopy(cfg.rope_parameters)
        rp["long_factor"] = list(rp["short_factor"])
        variants["short_factors_always"] = dict(rope_parameters=rp)
        rp2 = copy.deepcopy(cfg.rope_parameters)
        rp2["attention_factor"] = 1.0
        variants["attention_factor_1"] = dict(rope_parameters=rp2)
    if name == "qwen3_moe":
        variants["norm_topk_prob_false"] = dict(norm_topk_prob=False)
    out = {}
    for vname, changes in variants.items():
        lp = variant_logprobs(model, p, **changes)
        out[vname] = {
            "max_abs_logprob_diff": float((lp - ref).abs().max()),
            "argmax_changes": int(lp.argmax()) != int(ref.argmax()),
        }
    if out:
        out["note"] = (
            f"last position of the {len(p)}-token prompt, same weights, config changed as named"
        )
    return out


@torch.no_grad()
def naive_cached_greedy(model, prompt: list[int]) -> list[int]:
    """Greedy decode that keeps the KV cache across the longrope short->long switch (what
    Phi3ForCausalLM.prepare_inputs_for_generation deliberately avoids)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    cache = out.cache
    nxt = int(out.logits[0, -1].argmax())
    new = [nxt]
    pos = len(prompt)
    for _ in range(NEW_TOKENS - 1):
        out = model(
            torch.tensor([[nxt]]), cache=cache, position_ids=torch.tensor([[pos]]), use_cache=True
        )
        cache = out.cache
        nxt = int(out.logits[0, -1].argmax())
        new.append(nxt)
        pos += 1
    return new


@torch.no_grad()
def longrope_checks(model, prompts, greedy) -> dict:
    rp = model.config.rope_parameters
    orig = rp["original_max_position_embeddings"]
    rot = model.model.rotary_emb
    base, dim = rp["rope_theta"], model.config.head_dim
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short_inv = 1.0 / (torch.tensor(rp["short_factor"]) * base**exps)
    long_inv = 1.0 / (torch.tensor(rp["long_factor"]) * base**exps)
    res = {
        "rule": (
            "transformers picks ONE factor set per forward call: seq_len = max(position_ids) + "
            "1; long_factor if seq_len > original_max_position_embeddings else short_factor, for "
            "every position of that call.  inv_freq[i] = 1 / (factor[i] * rope_theta ** (2i / "
            "head_dim)); cos and sin are both multiplied by attention_factor = sqrt(1 + "
            "ln(max_position_embeddings / original_max_position_embeddings) / "
            "ln(original_max_position_embeddings)) whichever set is used. During generate(), "
            "Phi3ForCausalLM.prepare_inputs_for_generation drops the KV cache once, when the "
            "sequence first reaches original_max_position_embeddings + 1 tokens, and recomputes "
            "everything with long factors, so cached greedy == recompute-every-step greedy."
        ),
        "original_max_position_embeddings": orig,
        "attention_factor": float(rot.attention_scaling),
        "attention_factor_formula": math.sqrt(
            1 + math.log(model.config.max_position_embeddings / orig) / math.log(orig)
        ),
        "short_inv_freq": [float(x) for x in short_inv],
        "long_inv_freq": [float(x) for x in long_inv],
        "factor_set_for_prefill": ["long" if len(p) > orig else "short" for p in prompts],
        "factor_set_for_last_greedy_step": [
            "long" if len(p) + NEW_TOKENS - 1 > orig else "short" for p in prompts
        ],
    }
    cross = [i for i, p in enumerate(prompts) if len(p) <= orig < len(p) + NEW_TOKENS - 1]
    res["crossing_prompt_indices"] = cross
    res["naive_cache_greedy"] = {str(i): naive_cached_greedy(model, prompts[i]) for i in cross}
    res["naive_cache_differs"] = {
        str(i): res["naive_cache_greedy"][str(i)] != greedy[i] for i in cross
    }
    res["naive_cache_note"] = (
        "naive_cache_greedy: decoding that keeps the short-factor K cache after the switch (new "
        "queries/keys rotated with long factors, old keys with short); NOT the reference"
    )
    return res


# phi3 with Phi-4-mini's partial rotary factor: 12 of the 16 dims of a head rotate, so each
# factor set has 6 entries (the first 6 of the full sets).
PARTIAL_ROTARY = 0.75


def _long_everywhere(model, cfg):
    """The model's weights under `cfg` with its short factors replaced by its long ones: long
    factors at every position of every forward (the attention factor does not depend on them)."""
    cfg = copy.deepcopy(cfg)
    cfg.rope_parameters["short_factor"] = list(cfg.rope_parameters["long_factor"])
    cfg._attn_implementation = "eager"
    m2 = type(model)(cfg).to(torch.float32).eval()
    m2.load_state_dict(model.state_dict())
    m2.generation_config.eos_token_id = None
    return m2


@torch.no_grad()
def _outputs(model, prompts) -> dict:
    top5, greedy, greedy_nc, margins = [], [], [], []
    for p in prompts:
        lp = logprobs64(model(torch.tensor([p]), use_cache=False).logits[0, -1])
        v, ix = torch.topk(lp, 5)
        top5.append([[int(a), float(b)] for a, b in zip(ix, v, strict=True)])
        g_c, m_c = greedy_cached(model, p)
        g_n, m_n = greedy_nocache(model, p)
        greedy.append(g_c)
        greedy_nc.append(g_n)
        margins.append(min(m_c + m_n))
    return {
        "top5": top5,
        "greedy": greedy,
        "greedy_nocache": greedy_nc,
        "greedy_cache_equals_nocache": greedy == greedy_nc,
        "greedy_min_margin_per_prompt": margins,
    }


def served_long_reference(model, prompts) -> dict:
    """phi3: what a server that picks the factor set once, from its context window (llama.cpp:
    n_ctx > original_max_position_embeddings; vLLM: max_model_len > it), computes with a window
    above original_max_position_embeddings: long factors at every position of every step.
    Same prompts as `prompts` (not re-chosen for their margins)."""
    return {
        "semantics": (
            "long_factor for every position of every forward call (a context window above "
            "original_max_position_embeddings); everything else as config.json. Prompts are "
            "`prompts`, not re-chosen: check greedy_min_margin_per_prompt before comparing tokens"
        ),
        **_outputs(_long_everywhere(model, model.config), prompts),
    }


def partial_rotary_reference(model, prompts) -> dict:
    """phi3 with partial_rotary_factor PARTIAL_ROTARY (Phi-4-mini's), long factors throughout
    as in served_long: config.json with `rope_parameters` replaced by the one recorded here."""
    cfg = copy.deepcopy(model.config)
    rp = cfg.rope_parameters
    rp["partial_rotary_factor"] = PARTIAL_ROTARY
    n = int(cfg.head_dim * PARTIAL_ROTARY) // 2
    rp["short_factor"], rp["long_factor"] = LONGROPE_SHORT[:n], LONGROPE_LONG[:n]
    return {
        "semantics": (
            "config.json with rope_parameters as below (partial_rotary_factor: the first "
            f"{2 * n} of {cfg.head_dim} dims of each head rotate; rotate_half over those), same "
            "weights, long_factor for every position of every forward call"
        ),
        "rope_parameters": copy.deepcopy(rp),
        **_outputs(_long_everywhere(model, cfg), prompts),
    }


@torch.no_grad()
def receptive_field_check(model, prompt: list[int]) -> dict:
    """Which earlier tokens can change the last position's logits, given the sliding window."""
    w, n_layers = model.config.sliding_window, model.config.num_hidden_layers
    base = model(torch.tensor([prompt]), use_cache=False).logits[0, -1]
    last = len(prompt) - 1
    influences = []
    for j in range(len(prompt)):
        q = list(prompt)
        q[j] = FIRST_ID + (q[j] - FIRST_ID + 1) % (VOCAB - FIRST_ID)
        d = float((model(torch.tensor([q]), use_cache=False).logits[0, -1] - base).abs().max())
        influences.append(d > 0)
    earliest = influences.index(True)
    return {
        "rule": (
            "a query at position i attends to key positions j with i - sliding_window < j <= i "
            "(itself and the sliding_window - 1 before it); through num_hidden_layers layers the "
            "last position therefore sees back num_hidden_layers * (sliding_window - 1) positions"
        ),
        "prompt_index": -1,
        "last_position": last,
        "earliest_influencing_position": earliest,
        "expected_earliest": last - n_layers * (w - 1),
    }


# --------------------------------------------------------------------------- driver


def build_family(name: str, out_root: Path) -> dict:
    cfg_cls, model_cls, kwargs, extra = family_specs()[name]
    seed = FAMILY_SEEDS[name]
    torch.manual_seed(seed)
    config = cfg_cls(**kwargs)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    rules = reinit_weights(model, seed, gemma_norms=name.startswith("gemma"))

    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "config.json", "generation_config.json"):
        (out / stale).unlink(missing_ok=True)
    model.save_pretrained(out, safe_serialization=True)

    # References come from the re-loaded files, so they describe exactly what is on disk.
    loaded = model_cls.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    probe = torch.tensor([make_prompt(23, 7)])
    with torch.no_grad():
        a = model(probe, use_cache=False).logits
        b = loaded(probe, use_cache=False).logits
    assert torch.equal(a, b), f"{name}: reloaded model differs ({(a - b).abs().max()})"

    # Disable eos stopping for the reference runs only (config.json keeps eos_token_id=2).
    loaded.generation_config.eos_token_id = None
    ref = compute_reference(name, loaded, extra, seed)
    ref["weight_seed"] = seed
    ref["weight_init"] = sorted(set(rules.values()))
    if name == "phi3":
        ref["served_long"] = served_long_reference(loaded, ref["prompts"])
        ref["partial_rotary"] = partial_rotary_reference(loaded, ref["prompts"])
    with open(out / "reference.json", "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    return ref


# --------------------------------------------------------------------------- GGUF (stretch)

GGUF_FAMILIES = ("qwen3", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
DEFAULT_CONVERTER = "/root/.cache/mlctrio/llama.cpp/0.3.36/src/convert_hf_to_gguf.py"
# tokenizer.ggml.pre written for our tiny tokenizer, whose pre-tokenizer is Qwen2's regex split
GGUF_PRE = "qwen2"
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Runs llama.cpp's converter unmodified except for one thing: its pre-tokenizer check
# hashes how the tokenizer splits a fixed text and only knows the hashes of published
# tokenizers, so for our tiny one it raises NotImplementedError; we answer GGUF_PRE instead.
_CONVERTER_WRAPPER = """
import sys
conv_dir, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, conv_dir)
sys.argv = [conv_dir + "/convert_hf_to_gguf.py"] + sys.argv[3:]
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = _pre
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def make_tokenizer(out: Path) -> None:
    """A byte-level BPE of exactly VOCAB ids (0 <pad>, 1 <s>, 2 </s>, 256 bytes, 253 merges)
    trained on the Zen of Python, with Qwen2's pre-tokenizer; writes tokenizer.json and
    tokenizer_config.json (what transformers writes)."""
    import codecs
    import contextlib
    import io

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    corpus = codecs.decode(this.s, "rot13")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 3, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)


def mark_gpt2_tokenizer(out: Path) -> None:
    """phi3: the converter reads a tokenizer.model (SentencePiece) unless tokenizer_config.json
    names GPT2Tokenizer (as Phi-4-mini's does), which takes the byte-level BPE of
    make_tokenizer."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def run_converter(converter: Path, model_dir: Path, name: str) -> Path:
    import subprocess

    # In a subfolder: a folder holding a .gguf is served as that GGUF, so the HF checkpoint
    # beside it would be unreachable.
    out_file = model_dir / "gguf" / "model.gguf"
    out_file.parent.mkdir(exist_ok=True)
    out_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-c", _CONVERTER_WRAPPER, str(converter.parent), GGUF_PRE,
        str(model_dir), "--outtype", "f32", "--outfile", str(out_file), "--model-name", name,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not out_file.is_file():
        raise RuntimeError(
            f"converter failed for {name}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return out_file


def check_gguf(name: str, gguf_path: Path, model_dir: Path, converter: Path) -> dict:
    """GGUF tensors must be the safetensors tensors (Gemma norms: 1 + w), all F32."""
    sys.path.insert(0, str(converter.parent / "gguf-py"))
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    st = load_file(str(model_dir / "model.safetensors"))
    r = gguf.GGUFReader(str(gguf_path))
    gemma = name.startswith("gemma")
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "ffn_norm": "pre_feedforward_layernorm" if gemma else "post_attention_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }  # fmt: skip
    extra = {}
    moe = MOE_BLOCKS.get(name)
    if moe:  # routers and stacked experts (E, rows, cols); Mixtral's q/k rows permuted
        block, (w_gate, w_up, w_down) = moe
        per_layer.update(ffn_gate_inp=f"{block}.gate")
        stacked = {"ffn_gate_exps": w_gate, "ffn_up_exps": w_up, "ffn_down_exps": w_down}
        cfg = json.loads((model_dir / "config.json").read_text())
        experts = cfg.get("num_local_experts") or cfg["num_experts"]
        for (key, proj), i in itertools.product(stacked.items(), range(cfg["num_hidden_layers"])):
            hf_names = [
                f"model.layers.{i}.{block}.experts.{e}.{proj}.weight" for e in range(experts)
            ]
            if hf_names[0] in st:  # an MoE layer
                extra[f"blk.{i}.{key}"] = (np.stack([st[n] for n in hf_names]), hf_names)
    permuted = name == "mixtral"  # llama architecture: LlamaModel.permute on q and k
    seen = set()
    if name == "phi3":  # fused qkv and gate+up (llama.cpp's ffn_up), factors as tensors
        per_layer.update(attn_qkv="self_attn.qkv_proj", ffn_up="mlp.gate_up_proj")
        rp = json.loads((model_dir / "config.json").read_text())["rope_parameters"]
        extra = {
            f"rope_factors_{k}": (np.asarray(rp[f"{k}_factor"], np.float32), [])
            for k in ("long", "short")
        }
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, (t.name, t.tensor_type)
        base, _, suffix = t.name.rpartition(".")
        if base in extra:
            want, hf_names = extra.pop(base)
            assert np.array_equal(np.asarray(t.data), want), f"{name}: {t.name}"
            seen.update(hf_names)
            continue
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            hf = f"model.layers.{layer}.{per_layer[part]}.{suffix}"
        else:
            hf = f"{names[base]}.{suffix}"
        want = st[hf].astype(np.float32)
        if gemma and hf.endswith("norm.weight"):
            want = want + np.float32(1.0)
        if permuted and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads" if "q_proj" in hf else "num_key_value_heads"]
            want = permute_rows(want, heads)
        got = np.asarray(t.data).reshape(want.shape)
        assert np.array_equal(got, want), f"{name}: GGUF {t.name} != {hf}"
        seen.add(hf)
    missing = set(st) - seen
    assert not missing and not extra, f"{name}: not in GGUF: {sorted(missing) + sorted(extra)}"
    meta = {}
    for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre"):
        meta[k] = r.fields[k].contents()
    meta["n_tokens"] = len(r.fields["tokenizer.ggml.tokens"].data)
    keys = sorted(k for k in r.fields if k.startswith(meta["general.architecture"] + "."))
    meta["arch_keys"] = {k: r.fields[k].contents() for k in keys}
    return meta


# HF MoE block and (gate, up, down) expert projections, per family with experts.
MOE_BLOCKS = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def permute_rows(w, heads: int):
    """llama.cpp's LlamaModel.permute (rotate-half rows -> ggml's adjacent pairs per head)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def qwen3_moe_all_sparse(out_root: Path) -> Path:
    """llama.cpp cannot express Qwen3-MoE's dense layers: its qwen3moe tensor list has no
    ffn_gate / ffn_up / ffn_down, so the converter refuses `mlp_only_layers` ("Can not map
    tensor model.layers.1.mlp.down_proj.weight") and the loader requires experts in every
    layer. The GGUF is made of a variant with every layer sparse (mlp_only_layers [], its own
    weights from seed + 50), written beside the family as `gguf_source/` (not kept); its
    outputs are gguf_reference.json."""
    cfg_cls, model_cls, kwargs, _ = family_specs()["qwen3_moe"]
    seed = FAMILY_SEEDS["qwen3_moe"] + 50
    torch.manual_seed(seed)
    config = cfg_cls(**{**kwargs, "mlp_only_layers": []})
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    reinit_weights(model, seed, gemma_norms=False)
    src = out_root / "qwen3_moe" / "gguf_source"
    src.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(src, safe_serialization=True)
    make_tokenizer(src)
    return src


def gguf_semantics_variant(model):
    """gemma3_text as llama.cpp (and a loader that follows it) reads the converted GGUF: the
    converter writes no layer-type list and no query_pre_attn_scalar, and llama.cpp's gemma3
    loader then assumes every 6th layer global (so all 4 of ours are sliding) and scales q by
    head_dim ** -0.5."""
    cfg = copy.deepcopy(model.config)
    cfg.layer_types = [
        "sliding_attention" if (i + 1) % 6 else "full_attention"
        for i in range(cfg.num_hidden_layers)
    ]
    cfg.query_pre_attn_scalar = cfg.head_dim
    cfg._attn_implementation = "eager"
    m2 = type(model)(cfg).to(torch.float32).eval()
    m2.load_state_dict(model.state_dict())
    m2.generation_config.eos_token_id = None
    return m2


def build_gguf(name: str, out_root: Path, converter: Path) -> dict:
    out = out_root / name
    make_tokenizer(out)
    if name == "phi3":
        mark_gpt2_tokenizer(out)
    src = qwen3_moe_all_sparse(out_root) if name == "qwen3_moe" else out
    gguf_path = run_converter(converter, src, name)
    if src != out:
        (out / "gguf").mkdir(exist_ok=True)
        gguf_path = gguf_path.replace(out / "gguf" / "model.gguf")
    info = check_gguf(name, gguf_path, src, converter)
    info["converter"] = str(converter)
    info["outtype"] = "f32"
    ref_path = out / "reference.json"
    ref = json.loads(ref_path.read_text())
    if name == "gemma3_text":
        _, model_cls, _, extra = family_specs()[name]
        loaded = model_cls.from_pretrained(
            out, attn_implementation="eager", dtype=torch.float32
        ).eval()
        variant = gguf_semantics_variant(loaded)
        gref = compute_reference("gemma3_text_gguf", variant, extra, FAMILY_SEEDS[name] + 50)
        gref["semantics"] = (
            "model.gguf as llama.cpp reads it: layer_types "
            + json.dumps(variant.config.layer_types)
            + f", query_pre_attn_scalar {variant.config.query_pre_attn_scalar} (= head_dim); "
            "everything else as config.json. NOT the transformers model: see README.md"
        )
        with open(out / "gguf_reference.json", "w") as f:
            json.dump(gref, f, indent=1)
            f.write("\n")
        info["reference"] = "gguf_reference.json (llama.cpp semantics differ from config.json)"
        info["gguf_greedy_min_margin"] = gref["greedy_min_margin"]
    elif name == "qwen3_moe":
        import shutil

        _, model_cls, _, extra = family_specs()[name]
        variant = model_cls.from_pretrained(
            src, attn_implementation="eager", dtype=torch.float32
        ).eval()
        variant.generation_config.eos_token_id = None
        gref = compute_reference("qwen3_moe_gguf", variant, extra, FAMILY_SEEDS[name] + 50)
        gref["semantics"] = (
            "model.gguf: NOT this family's checkpoint. llama.cpp's converter and loader cannot "
            "express mlp_only_layers, so the GGUF holds a variant with every layer sparse "
            "(mlp_only_layers [], weights from seed + 50); llama.cpp's qwen3moe always "
            "renormalises the top-k (norm_topk_prob true, as here)"
        )
        gref["weight_seed"] = FAMILY_SEEDS[name] + 50
        with open(out / "gguf_reference.json", "w") as f:
            json.dump(gref, f, indent=1)
            f.write("\n")
        shutil.rmtree(src)
        info["reference"] = "gguf_reference.json (an all-sparse variant: see README.md)"
        info["gguf_greedy_min_margin"] = gref["greedy_min_margin"]
    elif name == "phi3":
        info["reference"] = (
            "llama.cpp picks the factor set once, from its context size: served_long for a "
            "context above original_max_position_embeddings (the file's context_length 128 is), "
            "else the short-factor prompts of reference.json"
        )
    else:
        info["reference"] = "reference.json (llama.cpp semantics equal the transformers model)"
    ref["gguf"] = info
    with open(ref_path, "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/data/families")
    ap.add_argument("--only", nargs="*", default=None, help="family names (default: all)")
    ap.add_argument(
        "--gguf",
        choices=("auto", "skip", "require"),
        default="auto",
        help=f"also write model.gguf (F32) + tokenizer for {', '.join(GGUF_FAMILIES)} with "
        "llama.cpp's converter (auto: only if --converter exists)",
    )
    ap.add_argument(
        "--converter", default=DEFAULT_CONVERTER, help="llama.cpp convert_hf_to_gguf.py"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = args.only or list(family_specs())
    unknown = set(names) - set(family_specs())
    if unknown:
        ap.error(f"unknown families: {sorted(unknown)}")
    out_root = Path(args.out)
    for name in names:
        ref = build_family(name, out_root)
        size = os.path.getsize(out_root / name / "model.safetensors")
        margin, same = ref["greedy_min_margin"], ref["greedy_cache_equals_nocache"]
        print(
            f"{name:12s} safetensors={size / 1024:.0f}KiB min_margin={margin:.4f} "
            f"cache==nocache={same} lengths={ref['prompt_lengths']}"
        )
        converter = Path(args.converter)
        if name in GGUF_FAMILIES and args.gguf != "skip":
            if converter.is_file():
                info = build_gguf(name, out_root, converter)
                gsize = os.path.getsize(out_root / name / "gguf" / "model.gguf")
                pre = info["tokenizer.ggml.pre"]
                print(f"{'':12s} model.gguf={gsize / 1024:.0f}KiB pre={pre} -> {info['reference']}")
            elif args.gguf == "require":
                ap.error(f"converter not found: {converter}")
            else:
                print(f"{'':12s} (no GGUF: {converter} not found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
