#!/usr/bin/env python3
"""The baseline for `cohort bench step`: transformers' DeepseekV2 at DeepSeek-V2-Lite's shapes.

Random weights on the GPU (bf16), batch-1 and batch-32 decode with transformers' own KV cache after a
prefill of --context tokens, timed with CUDA events (median of --iterations steps). Prints one JSON
object. Runs where torch and transformers are installed (the GPU machine), not in CI.

  python3 scripts/bench_transformers_baseline.py --layers 27 --context 1024 --batches 1,32 --out base.json
"""
import argparse
import json
import os
import statistics
import tempfile

import torch
from transformers import AutoConfig, DeepseekV2ForCausalLM

# DeepSeek-V2-Lite's published config.json (the same shapes as synthetic:deepseek-v2-lite).
V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    moe_layer_freq=1, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
    routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=163840, rope_theta=10000,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=0.707, mscale_all_dim=0.707),
    attention_bias=False, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001, torch_dtype="bfloat16")


def time_decode(model, batch, context, iterations):
    torch.manual_seed(batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(iterations + 3):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            stop.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(stop) / 1e3)
    step = statistics.median(times)
    return {"batch": batch, "context": context, "step_ms": step * 1e3, "tokens_per_s": batch / step}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    config = dict(V2_LITE, num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        hf_config = AutoConfig.from_pretrained(folder)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = DeepseekV2ForCausalLM(hf_config).eval()
    results = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
               "layers": args.layers, "decode": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        results["decode"].append(time_decode(model, batch, args.context, args.iterations))
        print(json.dumps(results["decode"][-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
