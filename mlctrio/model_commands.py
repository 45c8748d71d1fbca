"""`mlctrio demo-model | convert-weight | gen-config | compile`: the model tools mirroring
`mlc_llm`'s, their sub-parsers and what each runs (tvm and the model code are imported only when
a command needs them). `mlctrio serve` is cli.py's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import HEAD_MODES, SPECULATIVE_MODES
from .errors import ConfigError

# Mirrors models.quantization.HF_QUANTIZATIONS (the CLI does not import tvm-side modules at
# startup; tests/runtime check that the lists agree).
HF_QUANTIZATIONS = ("q0f32", "q0f16", "q4f16_1", "q4f32_1", "q8f16_1", "q8f32_1")
QUANT_CHOICES = list(HF_QUANTIZATIONS)


def add_model_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = sub.add_parser("demo-model", help="write the demo Llama checkpoint (HF format)")
    demo.add_argument("out", type=Path)
    demo.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    demo.add_argument("--seed", type=int, default=0)
    convert = sub.add_parser("convert-weight", help="HF checkpoint or GGUF file -> MLC weights")
    convert.add_argument("model", help="HF checkpoint directory, HF://org/name or a GGUF file")
    convert.add_argument(
        "--quantization", default=None, choices=QUANT_CHOICES, help="required for HF checkpoints"
    )
    convert.add_argument("-o", "--output", type=Path, required=True)
    convert.add_argument("--conv-template", default=None)
    gen = sub.add_parser("gen-config", help="write mlc-chat-config.json for an HF checkpoint")
    gen.add_argument("model")
    gen.add_argument("--quantization", required=True, choices=QUANT_CHOICES)
    gen.add_argument("--conv-template", default=None)
    gen.add_argument("--context-window-size", type=int, default=None)
    gen.add_argument("--prefill-chunk-size", type=int, default=None)
    gen.add_argument("-o", "--output", type=Path, required=True)
    comp = sub.add_parser("compile", help="compile a model library ahead of time")
    comp.add_argument("model", help="model directory (HF or MLC), HF://org/name or demo://...")
    comp.add_argument("--quantization", default=None, choices=QUANT_CHOICES)
    comp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    comp.add_argument(
        "--speculative-mode",
        default="disable",
        choices=SPECULATIVE_MODES,
        help="the library `serve --speculative-mode` loads: medusa and eagle need the one that "
        "also returns hidden states",
    )
    comp.add_argument("-o", "--output", type=Path, required=True)


def run_model_command(args: argparse.Namespace) -> int:
    """demo-model, convert-weight, gen-config, compile (imports tvm only when needed)."""
    if args.command == "demo-model":
        from .models.demo import write_demo_model

        print(write_demo_model(args.out, preset=args.preset, seed=args.seed))
        return 0
    from .models.artifact import convert_weight, gen_config, open_artifact
    from .models.formats import write_mlc_chat_config
    from .runtime.model_loader import resolve_model_dir

    path = resolve_model_dir(args.model)
    if args.command == "convert-weight":
        from .models.gguf_file import find_gguf

        if find_gguf(path) is not None:
            if args.quantization is not None:
                raise ConfigError("a GGUF file keeps its own formats: drop --quantization")
            from .runtime.gguf_export import convert_gguf

            print(convert_gguf(path, args.output))
            return 0
        if args.quantization is None:
            raise ConfigError("convert-weight: --quantization is required for HF checkpoints")
        print(
            convert_weight(path, args.quantization, args.output, conv_template=args.conv_template)
        )
        return 0
    if args.command == "gen-config":
        art = open_artifact(path, args.quantization)
        config = gen_config(
            art,
            conv_template=args.conv_template,
            context_window_size=args.context_window_size,
            prefill_chunk_size=args.prefill_chunk_size,
        )
        print(write_mlc_chat_config(args.output, config))
        return 0
    import shutil

    from .models.compile import compile_model

    art = open_artifact(path, args.quantization)
    config = art.config
    if args.speculative_mode in HEAD_MODES:  # as runtime/model_loader.served_artifact
        config = config.with_hidden_outputs()
    compiled = compile_model(config, art.quantization, target=args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(compiled.lib_path, args.output)
    print(args.output)
    return 0
