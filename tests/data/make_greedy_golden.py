"""Write greedy_golden_<name>.json: llama-server's greedy continuations of a GGUF, to compare with.

Run by hand against a running llama-server (bench/llama_cpp.py builds one; no GPU needed):

    llama-server -m ~/.cache/mlctrio/models/gemma-3-270m-q4_k_m.gguf --port 8012 -t 2 \\
        -ctk f32 -ctv f32 &
    python tests/data/make_greedy_golden.py --url http://127.0.0.1:8012 \\
        --out tests/data/greedy_golden_gemma3.json

For each prompt of bench/gguf_parity.py's GREEDY_PROMPTS: llama-server's token ids (with BOS,
as its completion adds it), then `--tokens` greedy tokens (temperature 0, ignore_eos) with the
top-2 log probabilities at each step, so a test can tell a near-tie from a real difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gguf_parity import GREEDY_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    cases = []
    with httpx.Client(base_url=args.url, timeout=120) as client:
        props = client.get("/props").json()
        for text in GREEDY_PROMPTS:
            ids = client.post("/tokenize", json={"content": text, "add_special": True}).json()
            body = {
                "prompt": ids["tokens"], "n_predict": args.tokens, "temperature": 0,
                "ignore_eos": True, "n_probs": 2, "cache_prompt": False,
            }  # fmt: skip
            reply = client.post("/completion", json=body).json()
            steps = reply["completion_probabilities"]
            cases.append({
                "prompt": text,
                "prompt_ids": ids["tokens"],
                "ids": [s["id"] for s in steps],
                "top2_gap": [
                    s["top_logprobs"][0]["logprob"] - s["top_logprobs"][1]["logprob"] for s in steps
                ],
            })  # fmt: skip
    golden = {
        "source": f"llama-server {props.get('build_info', '')}, greedy, ignore_eos, n_probs 2",
        "model": Path(props.get("model_path", "")).name,
        "cases": cases,
    }
    cases = golden.pop("cases")
    text = json.dumps(golden, ensure_ascii=False)[:-1] + ', "cases": [\n'
    text += ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]}\n"
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
