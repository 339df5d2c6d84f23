"""Manual check on a real chat checkpoint (not collected by pytest: it needs real weights).

1. Greedy equivalence: the fast backend (fastdecode.py) against HF `generate` in fp32 on 4 chat prompts of
   different lengths, EOS on (rows stop mid-batch): identical tokens, logp/entropy differences.
2. The same in bf16 (fast decoding fp32 weights in bf16, HF on a bf16 copy): common prefixes.
3. Decode-vs-train log-prob mismatch: G sampled completions per prompt, the decoder's own log-probs
   against grpo.sequence_logprobs (fp32 vs fp32, and bf16 decoding vs bf16 autocast, the GPU setup).
   This is what would enter w = pi_theta / pi_old with --grpo.old_logp rollout.

  python -m tools.real_model_check PATH_OR_HUB_ID [--new-tokens 64] [--group 4]
"""
import argparse
import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo
from plumbing import decode

QUESTIONS = ["Recommend one movie for someone who liked Toy Story and Babe. Explain why.",
             "Name a film.",
             "A user watched Star Wars (1977), Fargo (1996), Contact (1997), Return of the Jedi (1983) and "
             "Liar Liar (1997). Which movie should they watch next? Think step by step.",
             "What is 2+2? Answer briefly."]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    a = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    enc = tok(texts, return_tensors="pt", padding=True)
    eos = decode.eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    print(f"{a.model}: prompt lengths {enc.attention_mask.sum(1).tolist()}, eos {eos}")

    def greedy(m, backend, dtype="auto"):
        cfg = decode.DecodeConfig(max_new_tokens=a.new_tokens, backend=backend, greedy=True, dtype=dtype)
        return decode.generate(m, enc.input_ids, enc.attention_mask, cfg, eos, pad, stats=True)

    hf = greedy(model, "hf")
    fast = greedy(model, "fast")
    same = [torch.equal(hf.tokens[i][hf.mask[i]], fast.tokens[i][fast.mask[i]]) for i in range(len(QUESTIONS))]
    print(f"fp32 greedy: lengths hf {hf.mask.sum(1).tolist()} fast {fast.mask.sum(1).tolist()}, "
          f"rows identical {sum(same)}/{len(same)}, max |dlogp| {(hf.logp - fast.logp).abs().max():.2e}, "
          f"max |dentropy| {(hf.entropy - fast.entropy).abs().max():.2e}")
    hf16 = greedy(copy.deepcopy(model).to(torch.bfloat16), "hf")
    fast16 = greedy(model, "fast", "bfloat16")
    T = min(hf16.tokens.shape[1], fast16.tokens.shape[1])
    prefix = (hf16.tokens[:, :T] == fast16.tokens[:, :T]).long().cumprod(1).sum(1).tolist()
    print(f"bf16 greedy: lengths hf {hf16.mask.sum(1).tolist()} fast {fast16.mask.sum(1).tolist()}, "
          f"common prefix {prefix} (of at most {T})")

    for dec_dtype, amp in (("float32", None), ("bfloat16", torch.bfloat16)):
        torch.manual_seed(0)
        cfg = decode.DecodeConfig(max_new_tokens=a.new_tokens, backend="fast", dtype=dec_dtype)
        ro = grpo.rollout(model, enc.input_ids, enc.attention_mask, a.group, cfg, eos, pad)
        ids = torch.cat([enc.input_ids.repeat_interleave(a.group, 0), ro.tokens], 1)
        am = torch.cat([enc.attention_mask.repeat_interleave(a.group, 0), ro.mask.long()], 1)
        ctx = torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), ctx:
            logp = grpo.sequence_logprobs(model, ids, am, ro.tokens.shape[1])
        d = (logp.float() - ro.logp)[ro.mask]
        w = d.exp()
        print(f"mismatch, decode {dec_dtype} vs train {'bf16 autocast' if amp else 'fp32'}: {d.numel()} tokens, "
              f"mean |dlogp| {d.abs().mean():.4f}, max {d.abs().max():.3f}, |w-1| > 0.05 on "
              f"{((w - 1).abs() > 0.05).float().mean():.2%}, > 0.2 on {((w - 1).abs() > 0.2).float().mean():.2%}")


if __name__ == "__main__":
    main()
