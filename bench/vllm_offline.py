"""vLLM's side of ``bench/vs_vllm.py``'s offline comparison; runs in vLLM's own virtual environment (no k2ray here).

Reads a JSON job on stdin: ``{"model", "prompts": [[token ids], ...], "levels": [1, 8, ...], "rounds": {level: n},
"output_len", "max_num_seqs", "max_model_len"}``. For each level it generates ``level`` prompts at once, ``rounds``
times (after one warm-up round), greedy with EOS ignored, and prints one JSON line per level:
``{"level", "tokens", "seconds", "outputs": the first round's token ids}``.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], dtype="float32", trust_remote_code=True, seed=0,
              max_num_seqs=job["max_num_seqs"], max_model_len=job["max_model_len"])
    params = SamplingParams(temperature=0.0, max_tokens=job["output_len"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    for level in job["levels"]:
        batch = prompts[:level]
        llm.generate(batch, params, use_tqdm=False)  # warm-up
        outputs, tokens, t0 = None, 0, time.perf_counter()
        for _ in range(job["rounds"][str(level)]):
            got = llm.generate(batch, params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in got)
            outputs = outputs or [list(o.outputs[0].token_ids) for o in got]
        print(json.dumps({"level": level, "tokens": tokens, "seconds": time.perf_counter() - t0,
                          "outputs": outputs}), flush=True)


if __name__ == "__main__":
    main()
