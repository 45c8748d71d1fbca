"""The model's building blocks in `tvm.relax.frontend.nn`: quantized linear layers and embedding,
RMSNorm, the per-head q/k norm and RoPE of the families that need them (models/llama.py composes
them into the decoder).

Linear layers are our own `te.compute` (see te_ops.matmul_te) rather than `nn.Linear`: the
dequantization sits inside the reduction, which the CPU schedules in schedules.py recognise. On the
CPU the weights of layers whose output features split into tiles of 16 take the "tile16" layout
(quantization.pack_tile_np; the param carries `attrs[LAYOUT_ATTR]`), which the loader produces.
Every op here is a TE op whose blocks carry an `mlctrio.kind`, so schedules.py schedules it.
"""

from __future__ import annotations

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from mlctrio.models import int8_cpu
from mlctrio.models.quantization import GROUP_ROWS, TILE, TILE16, QuantSpec, uses_int8
from mlctrio.models.te_heads import head_rms_norm_te, rope_te
from mlctrio.models.te_ops import embedding_te, matmul_te, matmul_tile16_te, rms_norm_te

LAYOUT_ATTR = "mlctrio.layout"  # nn.Parameter attr: TILE16 when the weight is stored tile16


# pylint: disable=missing-docstring,invalid-name


class QLinear(nn.Module):
    """y = x @ W.T (+ b) with W stored as `weight` (q0) or `q_weight` + `q_scale` (q4)."""

    def __init__(self, in_f: int, out_f: int, spec: QuantSpec, act_dtype: str, bias: bool = False):
        super().__init__()
        self.spec, self.act_dtype, self.in_f, self.out_f = spec, act_dtype, in_f, out_f
        self.cpu_layout = False  # set by LlamaForCausalLM for llvm targets
        self.tile16 = False  # weights in the tile16 layout (use_cpu_layout)
        self.int8 = False  # int8 activations, int8_cpu's VNNI kernels (use_cpu_layout)
        # rows per block of the float group decode kernel; LlamaForCausalLM's batch_decode_r2
        # and _r8 trace with 2 and 8 (te_ops.matmul_tile16_te)
        self.group_rows = GROUP_ROWS
        # Every Parameter gets an explicit dtype: Module.to() would also cast packed uint32 weights.
        if spec.is_group:
            groups = -(-in_f // spec.group_size)  # a partial last group is padded, as in mlc-llm
            words = groups * spec.group_size // spec.elems_per_word
            self.q_weight = nn.Parameter((out_f, words), "uint32")
            self.q_scale = nn.Parameter((out_f, groups * spec.scales_per_group), spec.scale_dtype)
        else:
            self.weight = nn.Parameter((out_f, in_f), spec.weight_dtype)
        self.bias = nn.Parameter((out_f,), act_dtype) if bias else None

    @property
    def group_decode(self) -> bool:
        """Whether one-token steps run te_ops' float group kernel (`group_rows` applies)."""
        s = self.spec
        return self.tile16 and not self.int8 and s.is_group and self.in_f % s.group_size == 0

    def stored(self) -> list[nn.Parameter]:
        return [self.q_weight, self.q_scale] if self.spec.is_group else [self.weight]

    def use_cpu_layout(self, tile16: bool, vnni: bool = False) -> None:
        """CPU kernels; with `tile16` (needs out features % 16 == 0) the tile16 weight layout;
        with `vnni` too, int8 activations for group-quantized weights (int8_cpu.py)."""
        self.cpu_layout = True
        if not tile16 or self.out_f % TILE:
            return
        self.tile16 = True
        self.int8 = vnni and uses_int8(self.spec, self.out_f, self.in_f)
        names = ("q_weight", "q_scale") if self.spec.is_group else ("weight",)
        for name in names:
            old: nn.Parameter = getattr(self, name)
            out_f, cols = (int(d) for d in old.shape)
            new = nn.Parameter((out_f // TILE, cols, TILE), old.dtype)
            new.attrs[LAYOUT_ATTR] = TILE16
            setattr(self, name, new)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        if self.int8:
            one_row = isinstance(b, int) and isinstance(s, int) and b * s == 1
            rows = x if isinstance(s, int) and s == 1 else op.reshape(x, (b * s, 1, self.in_f))
            y = op.reshape(self._int8_matmul(rows, one_row), (b, s, self.out_f))
        elif self.tile16:
            y4 = op.tensor_expr_op(
                matmul_tile16_te(self.spec, self.act_dtype, self.group_rows),
                "matmul",
                [x, *self.stored()],
            )
            y = op.reshape(y4, (b, s, self.out_f))
        else:
            y = op.tensor_expr_op(
                matmul_te(self.spec, self.act_dtype, self.out_f, self.cpu_layout),
                "matmul",
                [x, *self.stored()],
            )
        return y + self.bias if self.bias is not None else y

    def _int8_matmul(self, x: Tensor, one_row: bool) -> Tensor:
        """x (rows, 1, K) -> (rows, 1, N / 16, 16) by int8_cpu's kernels."""
        rows = x.shape[0]
        k, tiles = self.in_f, self.out_f // TILE
        xq, xd = op.tensor_ir_op(
            int8_cpu.q8_quantize_func(k, self.spec.f16_act_scales),
            "q8_quantize",
            [x],
            [
                Tensor.placeholder((rows, k // 8, 2), "int32"),
                Tensor.placeholder((rows, k // int8_cpu.GROUP, int8_cpu.XD), "float32"),
            ],
        )
        rows_block = 1 if one_row else int8_cpu.ROWS_BLOCK
        s = self.spec
        return op.tensor_ir_op(
            int8_cpu.group_q8_matmul_func(
                tiles, k, rows_block, s.scale_dtype, s.bits, s.zero, s.has_min
            ),
            "group_q8_matmul",
            [xq, xd, *self.stored()],
            Tensor.placeholder((rows, 1, tiles, TILE), "float32"),
        )


class QEmbedding(QLinear):
    """Token embedding table in the same storage as QLinear, so a tied lm_head reuses it."""

    def __init__(
        self, vocab: int, hidden: int, spec: QuantSpec, act_dtype: str, scale: float = 1.0
    ):
        super().__init__(hidden, vocab, spec, act_dtype, bias=False)
        self.hidden, self.scale = hidden, scale

    def embed(self, ids: Tensor) -> Tensor:
        """Rows of the table for `ids`, times `scale` (Gemma); the lm_head reads it unscaled."""
        f = embedding_te(self.spec, self.act_dtype, self.hidden, self.tile16, self.scale)
        return op.tensor_expr_op(f, "embedding", [ids, *self.stored()])


class RMSNorm(nn.Module):
    """RMSNorm as our own two-stage TE op (sum of squares, then scale) that schedules.py can
    parallelise over rows; relax's rms_norm legalises to seven serial blocks."""

    def __init__(self, hidden: int, eps: float, act_dtype: str):
        self.weight = nn.Parameter((hidden,), act_dtype)
        self.eps, self.hidden = eps, hidden

    def forward(self, x: Tensor) -> Tensor:
        return op.tensor_expr_op(rms_norm_te(self.hidden, self.eps), "rms_norm", [x, self.weight])


def norm_qk_heads(qkv: Tensor, q_norm: RMSNorm, k_norm: RMSNorm, h_q: int, h_kv: int) -> Tensor:
    """RMSNorm over each q head (weights of `q_norm`) and each k head (`k_norm`) of a fused qkv
    (b, s, h_q + 2 h_kv, d); v passes through (Qwen3, Gemma 3)."""
    b, s, heads, d = qkv.shape
    rows = op.reshape(qkv, (b, s * heads, d))
    f = head_rms_norm_te(h_q, h_kv, int(d), q_norm.eps)
    out = op.tensor_expr_op(f, "head_rms_norm", [rows, q_norm.weight, k_norm.weight])
    return op.reshape(out, (b, s, heads, d))


def rope_inv_freq(
    rotary_dim: int, theta: float, linear_factor: float = 1.0, factors: list[float] | None = None
) -> np.ndarray:
    """Inverse frequencies as transformers computes them in float32: `1 / base ** (2i / d)`
    (divided by a linear scaling factor), or with LongRoPE's per-pair `factors`
    `1 / (factor_i * base ** (2i / d))`."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
        rotary_dim
    )
    power = np.power(np.float32(theta), exponent, dtype=np.float32)
    if factors is not None:
        return (np.float32(1.0) / (np.asarray(factors, np.float32) * power)).astype(np.float32)
    inv = np.float32(1.0) / power
    return (inv / np.float32(linear_factor)).astype(np.float32)


def rotate_qk(
    qkv: Tensor,
    positions: Tensor,
    h_q: int,
    h_kv: int,
    inv_freq: np.ndarray,
    scale: float = 1.0,
) -> Tensor:
    """Rotate-half RoPE of the q and k heads of a fused qkv (b, s, h_q + 2 h_kv, d) at the
    tokens' positions (b * s,), in the model (the KV cache then stores keys as given). The first
    2 * len(inv_freq) dims of each head rotate, the rest pass; cos and sin are times `scale`."""
    b, s, heads, d = qkv.shape
    rows = op.reshape(qkv, (b, s * heads, d))
    freqs = Tensor.from_const(inv_freq)
    f = rope_te(h_q, h_kv, int(d), rotary_dim=2 * len(inv_freq), scale=scale)
    out = op.tensor_expr_op(f, "rope", [rows, positions, freqs])
    return op.reshape(out, (b, s, heads, d))
