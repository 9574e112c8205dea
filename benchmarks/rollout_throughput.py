"""Rollout throughput: our engine path (VLLMEngine.generate) against raw vLLM `LLM.generate`, side by side.

Both sides use the same vLLM engine object, prompts (the quickstart task's problems through the chat template) and
sampling settings (n samples per prompt, temperature, max new tokens, the sampled tokens' log-probs, which the
trainer needs). Runs alternate (ours, raw, ours, raw, ...) after one warm-up call each, so drift in the machine's
speed hits both. Prints generated tokens per second for each and the ratio ours / raw (target >= 0.9).

    python benchmarks/rollout_throughput.py [--prompts 16] [--n 8] [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model (default: the embedded one)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=3.0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from cipo_lightning.data import ReasoningGymTask
    from cipo_lightning.data.tasks import prompt_token_ids
    from cipo_lightning.models import resolve_model_path
    from cipo_lightning.rewards import ReasoningGymReward
    from cipo_lightning.rollout import SamplingSettings, VLLMEngine

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = ReasoningGymTask(train_size=args.prompts, val_size=1, reward=ReasoningGymReward("basic_arithmetic"))
    prompts = [prompt_token_ids(tokenizer, row["prompt"]) for row in task.load()[0]]
    engine = VLLMEngine(dtype=args.dtype, kv_cache_memory_gb=args.kv_cache_memory_gb, max_model_len=1024)
    engine.start(path, seed=0, device=torch.device("cpu"))
    settings = SamplingSettings(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    raw_params = SamplingParams(
        n=args.n, temperature=args.temperature, max_tokens=args.max_new_tokens, logprobs=0, top_p=1.0
    )

    def ours() -> int:
        return sum(len(s.token_ids) for samples in engine.generate(prompts, settings) for s in samples)

    def raw() -> int:
        outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], raw_params, use_tqdm=False)
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)

    sides = {"ours (VLLMEngine.generate)": ours, "raw vLLM LLM.generate": raw}
    for run in sides.values():
        run()  # warm-up
    tokens = dict.fromkeys(sides, 0)
    seconds = dict.fromkeys(sides, 0.0)
    for _ in range(args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            tokens[name] += run()
            seconds[name] += time.perf_counter() - start
    engine.shutdown()

    print(f"{args.prompts} prompts x {args.n} samples x <= {args.max_new_tokens} tokens, T {args.temperature}, "
          f"{args.model} in {args.dtype}, {args.repeats} timed runs each")  # fmt: skip
    rates = {name: tokens[name] / seconds[name] for name in sides}
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:8.1f} generated tokens/s ({tokens[name]} tokens in {seconds[name]:.1f} s)")
    ours_rate, raw_rate = rates.values()
    print(f"ratio ours / raw: {ours_rate / raw_rate:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
