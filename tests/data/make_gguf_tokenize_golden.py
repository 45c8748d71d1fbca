"""Write gguf_tokenize_golden.json: llama.cpp's own token ids for a GGUF's vocabulary (SmolLM2;
gguf_tokenize_golden_gemma3.json for Gemma 3 270M, with `--specials`) on a varied text set.

Run by hand where a llama.cpp build with its static libraries exists (no GPU needed):

    python tests/data/make_gguf_tokenize_golden.py \\
        --llama-src ~/.cache/mlctrio/llama.cpp/0.3.36/src \\
        --llama-build ~/.cache/mlctrio/llama.cpp/0.3.36/build \\
        --model ~/.cache/mlctrio/models/SmolLM2-135M-Instruct.Q4_1.gguf

It compiles the small C++ program below against libllama.a / libggml*.a, which loads the vocab
only and calls `llama_tokenize(vocab, text, add_special=false, parse_special=true)` (what
llama-server's /tokenize and its chat prompt use), and records bos, eos, add_bos and the EOG set.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
from pathlib import Path

PROGRAM = r"""
#include "llama.h"
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>
static void quiet(ggml_log_level, const char *, void *) {}
int main(int argc, char ** argv) {
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    auto mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    int n = llama_vocab_n_tokens(vocab);
    printf("bos %d\neos %d\nadd_bos %d\neog", llama_vocab_bos(vocab), llama_vocab_eos(vocab),
           (int) llama_vocab_get_add_bos(vocab));
    for (int i = 0; i < n; i++) if (llama_vocab_is_eog(vocab, i)) printf(" %d", i);
    printf("\n");
    std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    size_t start = 0;
    while (start < all.size()) {
        size_t end = all.find('\0', start);
        if (end == std::string::npos) end = all.size();
        std::string text = all.substr(start, end - start);
        std::vector<llama_token> toks(text.size() * 4 + 16);
        int k = llama_tokenize(vocab, text.data(), (int) text.size(), toks.data(),
                               (int) toks.size(), false, true);
        printf("ids");
        for (int i = 0; i < k; i++) printf(" %d", toks[i]);
        printf("\n");
        start = end + 1;
    }
    llama_model_free(model);
    return 0;
}
"""

TEXTS = [
    "Hello world",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n\tif (x != y) return -1;",
    "日本語のテキスト、中文字符 and 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "   leading, trailing and   inner   spaces   ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "numbers 12345 and 3.14159 and ١٢٣ and ½ ² Ⅻ",
    "I'm sure they'll say it's fine, we've done what I'd DON'T SHE'S it’s",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_start|><|endoftext|><reponame>x<file_sep>",
    "<|im_start partial <|im_end and <|endoftext|",
    "mixed ascii 日本 and € signs ünïcödé Ωμέγα",
    "non\u00a0breaking\u3000ideographic\u2003em\u0085nel\x1cfs",
    "combining e\u0301 a\u0308 हिन्दी العربية עברית",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "$100 + 200 = <300> ^ ~ | ` @#%&*()[]{}",
    "       \n\n\n        \t\t  x",
    "a" * 50 + " " + "9" * 30,
    "",
    " ",
    "\n",
]


def _fuzz(seed: int, count: int, specials: list[str]) -> list[str]:
    pool = [
        *"abcXYZ019 '\n\t.,!?-_<>|",
        *["<|im_start|>", "<|im_end|>", "'s", "'LL", "  "],
        *specials,
        *"éßøΩжदि日本語한😀🏽\u00a0\u3000\u200d١",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--llama-src", type=Path, required=True)
    parser.add_argument("--llama-build", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("gguf_tokenize_golden.json")
    )
    parser.add_argument(
        "--specials",
        nargs="*",
        default=[],
        help="the model's own special-token strings, mixed into the texts (Gemma: "
        "<start_of_turn> <end_of_turn> <bos> <eos>)",
    )
    args = parser.parse_args()
    texts = TEXTS + _fuzz(seed=1234, count=200, specials=args.specials)
    if args.specials:
        texts.append("".join(f"{s}user\nhi {s}" for s in args.specials))
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "tok.cpp", Path(tmp) / "tok"
        src.write_text(PROGRAM)
        build = args.llama_build
        libs = ["src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a"]
        libs.append("ggml/src/libggml-base.a")
        subprocess.run(
            [
                *["g++", "-O1", "-std=c++17", str(src), f"-I{args.llama_src / 'include'}"],
                *[f"-I{args.llama_src / 'ggml/include'}", *(str(build / lib) for lib in libs)],
                *["-fopenmp", "-lpthread", "-ldl", "-lm", "-o", str(exe)],
            ],
            check=True,
        )
        out = subprocess.run(
            [str(exe), str(args.model)],
            input="\0".join(texts).encode(),
            capture_output=True,
            check=True,
        ).stdout.decode()
    lines = out.splitlines()
    head = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines[:4]}
    ids = [[int(v) for v in line.split()[1:]] for line in lines[4:]]
    # An empty text adds nothing to the NUL-joined input when it is last; keep the pairs aligned.
    assert len(ids) == len(texts), (len(ids), len(texts))
    golden = {
        "source": "llama.cpp (llama-cpp-python 0.3.36 vendor) llama_tokenize, "
        "add_special=false, parse_special=true",
        "model": args.model.name,
        "bos": head["bos"][0],
        "eos": head["eos"][0],
        "add_bos": bool(head["add_bos"][0]),
        "eog": head["eog"],
        "cases": [{"text": t, "ids": i} for t, i in zip(texts, ids, strict=True)],
    }
    cases = golden.pop("cases")
    text = json.dumps(golden, ensure_ascii=False)[:-1] + ', "cases": [\n'
    text += ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]}\n"
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
