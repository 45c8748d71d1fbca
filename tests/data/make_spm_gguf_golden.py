"""Write spm_tiny.gguf (a SentencePiece BPE vocab trained here, "llama" tokenizer model, no
tensors) and spm_tokenize_golden.json: llama.cpp's ids for it. Needs the `tok` program that
make_gguf_tokenize_golden.py compiles (pass its path): python make_spm_gguf_golden.py TOK
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import gguf
import sentencepiece

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository root: `tests` is a package

from tests.spm_training import spm_gguf_meta, train_spm  # noqa: E402

proto = train_spm(topics=60, vocab_size=800, user_defined_symbols=["<tool>"], add_dummy_prefix=True)
sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
meta = spm_gguf_meta(sp)
w = gguf.GGUFWriter(str(HERE / "spm_tiny.gguf"), "llama")
w.add_block_count(1)
w.add_context_length(64)
w.add_embedding_length(8)
w.add_feed_forward_length(8)
w.add_head_count(1)
w.add_layer_norm_rms_eps(1e-5)
w.add_tokenizer_model("llama")
w.add_token_list(meta["tokenizer.ggml.tokens"])
w.add_token_scores(meta["tokenizer.ggml.scores"])
w.add_token_types(meta["tokenizer.ggml.token_type"])
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_unk_token_id(0)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
rng = random.Random(7)
pool = [
    *list("abcXYZ019 '\n\t.,!?-_<>|"),
    "<tool>",
    "</s>",
    "<s>",
    "  ",
    "the",
    "return",
    *list("éßøΩжदि日本語한😀🏽\xa0\u3000"),
]
texts = ["Hello world", "  two  spaces", "</s>Hello<tool>world", "rare 𝔘𝔫𝔦", "x\n\ny"] + [
    "".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(300)
]
out = (
    subprocess.run(
        [sys.argv[1], str(HERE / "spm_tiny.gguf")],
        input="\0".join(texts).encode(),
        capture_output=True,
    )
    .stdout.decode()
    .splitlines()
)
head = {ln.split()[0]: [int(v) for v in ln.split()[1:]] for ln in out[:4]}
cases = [
    {"text": t, "ids": [int(v) for v in ln.split()[1:]]}
    for t, ln in zip(texts, out[4:], strict=True)
]
golden = {"source": "llama.cpp llama_tokenize, add_special=false, parse_special=true", **head}
text = json.dumps(golden, ensure_ascii=False)[:-1] + ', "cases": [\n'
text += ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]}\n"
(HERE / "spm_tokenize_golden.json").write_text(text, encoding="utf-8")
