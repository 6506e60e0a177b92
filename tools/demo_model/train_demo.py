#!/usr/bin/env python3
"""Trains Cohort's demo model and its tokenizer, and records the references tests compare against.

Runs on the GPU machine (PyTorch, transformers and tokenizers are installed there):

    python3 tools/demo_model/train_demo.py --corpus .corpus/fortunes.txt --out OUT [--minutes 4]

The corpus is the English text of Debian's `fortunes` package (/usr/share/games/fortunes, every
file but the ASCII-art ones, fortunes separated by '%' lines); README.md says how to rebuild it.

Writes under OUT:
  demo/                   the model in DeepSeek's published layout: config.json, model.safetensors
                          (bf16), tokenizer.json, tokenizer_config.json (DeepSeek-V3 chat template),
                          generation_config.json
  demo.json, demo.logits.f32   greedy continuations and float32 logits from transformers, as the
                          fixtures have (tests/fixtures/make_fixtures.py)
  tokenizer_reference.json     Hugging Face `tokenizers` ids for a corpus of hard strings, with and
                          without special tokens, for the C++ tokenizer's equality test
  samples.txt             what the model writes for a few prompts
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
from make_fixtures import greedy, to_published_state_dict, write_checkpoint  # noqa: E402

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
VOCAB = 2048

# DeepSeek-V3's published pre-tokenizer: digits in runs of at most three, CJK runs, then words,
# punctuation and whitespace, then byte-level mapping.
PRE_TOKENIZER = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated", invert=False),
    pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated", invert=False),
    pre_tokenizers.Split(Regex(
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
        behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])

# DeepSeek-V3's chat template as tokenizer_config.json publishes it (system, user, assistant turns).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

HARD_STRINGS = [
    "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\r\n", "\n\n\n", "    ",
    "1234567890 12 345 6789", "3.14159 and 2,718,281", "x1y22z333w4444", "version 2.0.1-rc3",
    "Größe, Übermaß, façade, naïve café", "Ελληνικά γράμματα", "Русский текст, ёлка", "עברית מימין לשמאל",
    "العربية من اليمين", "हिन्दी देवनागरी", "தமிழ் எழுத்து", "ภาษาไทยไม่มีช่องว่าง", "한국어 문장입니다",
    "日本語のテキストとカタカナ", "中文汉字混合English和123数字", "👍 thumbs", "👨‍👩‍👧‍👦 family with joiners",
    "🏳️‍🌈 flag and 🇫🇷 regional indicators", "e\u0301 combining acute, a\u0308\u0304 stacked", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚o̸",
    "mixed\u00a0no-break\u2009thin\u200bzero-width", "emoji🙂inside🙃words", "CamelCaseWordsHere and snake_case_here",
    "don't can't won't I'm you're", "!!!???...,,,;;;", "#hashtag @mention $100 %50 ^caret &amp;",
    "<｜begin▁of▁sentence｜>special in text<｜end▁of▁sentence｜>", "<｜User｜>hi<｜Assistant｜>hello",
    "<think>reasoning</think>answer", "\u0000nul and \u007f del", "\ufeffbyte order mark", "a" * 300,
    " ".join(["word"] * 50), "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝓂𝒶𝓉𝒽 ∑∫√∞ ≠ ≤", "tab\t\t\tand  multiple   spaces",
    "Line1\nLine2\n\nLine4 ", "The quick brown fox jumps over the lazy dog.", "",
]


def read_corpus(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    return [f.strip("\n") for f in text.split("\n%\n") if f.strip()]


def train_tokenizer(fortunes):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZER
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS, PAD, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(fortunes, trainer)
    tok.add_tokens(["<think>", "</think>"])  # added but not special, as in DeepSeek-R1
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def tokenizer_reference(tok):
    cases = []
    for s in HARD_STRINGS:
        plain = tok.encode(s, add_special_tokens=False).ids
        cases.append({"text": s, "ids": plain, "ids_with_special": tok.encode(s).ids,
                      "decoded": tok.decode(plain, skip_special_tokens=False),
                      "decoded_skip_special": tok.decode(plain, skip_special_tokens=True)})
    return {"tokenizer": "demo/tokenizer.json", "cases": cases}


def model_config(vocab_size):
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=vocab_size,
        hidden_size=192, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        n_group=1, topk_group=1, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, topk_method="noaux_tc", scoring_func="sigmoid", rope_theta=10000.0,
        rope_interleave=True, max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02, torch_dtype="bfloat16")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=4.0)
    args = ap.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    folder = os.path.join(args.out, "demo")
    os.makedirs(folder, exist_ok=True)

    fortunes = read_corpus(args.corpus)
    tok = train_tokenizer(fortunes)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": True,
                   "add_eos_token": False, "model_max_length": 1024, "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False},
                  f, indent=2, ensure_ascii=False)
    with open(os.path.join(args.out, "tokenizer_reference.json"), "w") as f:
        json.dump(tokenizer_reference(tok), f, indent=1, ensure_ascii=False)
    print(f"tokenizer: {tok.get_vocab_size()} tokens", flush=True)

    cfg = model_config(tok.get_vocab_size())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    model = DeepseekV3ForCausalLM(AutoConfig.from_pretrained(folder)).cuda().train()

    eos = tok.token_to_id(EOS)
    stream = []
    for text in fortunes:
        stream += tok.encode(text).ids + [eos]  # BOS comes from the post-processor
    data = torch.tensor(stream, dtype=torch.long)
    print(f"corpus: {len(fortunes)} fortunes, {len(stream)} tokens", flush=True)
    seq, batch = 256, 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))
    budget = args.minutes * 60
    start, step = time.time(), 0
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, step / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[i:i + seq] for i in idx]).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
        step += 1
    print(f"trained {step} steps, final loss {loss.item():.3f}", flush=True)

    model = model.float().cpu().eval()
    state = to_published_state_dict(model, cfg)
    write_checkpoint(folder, dict(state), cfg, shards=1, mtp=False)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.8, "top_p": 0.95}, f)

    # The oracle, as for the fixtures: transformers on the bf16 weights, in float32, greedy.
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = ["The meaning of life is", "A computer is", "Love"]
    cases, rows = [], []
    samples = []
    with torch.no_grad():
        for p in prompts:
            ids = tok.encode(p).ids
            gen, logits, margins = greedy(ref, ids, 16)
            cases.append({"prompt_ids": ids, "generated_ids": gen, "min_margin": min(margins), "prompt": p})
            rows.append(logits)
            samples.append(f"greedy  | {p}{tok.decode(gen)}")
            torch.manual_seed(1)
            sampled = ref.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=True, temperature=0.8,
                                   top_p=0.95)[0, len(ids):].tolist()
            samples.append(f"sampled | {p}{tok.decode(sampled, skip_special_tokens=True)}")
    torch.cat(rows).numpy().astype("<f4").tofile(os.path.join(args.out, "demo.logits.f32"))
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"model": "models/demo", "vocab_size": cfg["vocab_size"], "cases": cases,
                   "logits": {"file": "demo.logits.f32", "dtype": "float32",
                              "shape": [len(prompts) * 16, cfg["vocab_size"]]},
                   "min_logit_margin": min(c["min_margin"] for c in cases),
                   "training": {"steps": step, "final_loss": loss.item(), "minutes": args.minutes}}, f, indent=1)
    with open(os.path.join(args.out, "samples.txt"), "w") as f:
        f.write("\n".join(samples) + "\n")
    print("\n".join(samples), flush=True)


if __name__ == "__main__":
    main()
