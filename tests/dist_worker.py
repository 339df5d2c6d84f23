"""Run under torchrun with 1 or 2 processes by test_distributed.py: one Rechead step, one GRPO step
and one evaluation over an uneven split, each on a fixed global batch; rank 0 saves the results."""
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import grpo
import rechead
import rporec
from plumbing import processes

out_file, data_dir = sys.argv[1], sys.argv[2]
processes.init_distributed("gloo")
cfg = rporec.parse_config(["--data.data_dir", data_dir, "--rechead.dropout", "0", "--limit", "64"])
ds = rporec.data.load_dataset(cfg.data)
train, valid = ds.splits["train"][:64], ds.splits["valid"][:7]  # 7 samples: an uneven split over 2 ranks
reasoning = [(f"maybe {ds.titles[s['history'][-1]]}", ds.titles[s["target"]] if i % 3 else None)
             for i, s in enumerate(train)]
inputs = rporec.data.rechead_inputs(cfg, ds, train, reasoning)

# --- one Rechead step on a global batch of 32 (each rank takes its share, DDP averages)
torch.manual_seed(0)
head = rporec.make_head(cfg, ds)
opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)  # SGD: the step is the gradient
net = torch.nn.parallel.DistributedDataParallel(head, broadcast_buffers=False) if rporec.WORLD > 1 else head
targets = torch.tensor([s["target"] for s in train])
idx = torch.arange(32)
neg = rechead.sample_negatives(targets[idx], ds.n_items, 9, torch.Generator().manual_seed(1))
rporec.rechead_step(net, head, opt, inputs, targets, idx, neg)
metrics = rporec.evaluate_split(cfg, head, rporec.data.rechead_inputs(cfg, ds, valid, reasoning[:7]), valid)

# --- one GRPO step on a fixed global rollout batch: 4 prompts x G=2, different lengths
torch.manual_seed(0)
model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8))
ref = Qwen3ForCausalLM(model.config).requires_grad_(False)
ref.load_state_dict(model.state_dict())
g = torch.Generator().manual_seed(2)
N, Gs, P, T = 4, 2, 5, 6
p_ids = torch.randint(1, 64, (N, P), generator=g)                       # (N, P)
p_mask = (torch.arange(P) >= torch.tensor([0, 1, 2, 0])[:, None]).long()  # left padding
tokens = torch.randint(1, 64, (N * Gs, T), generator=g)                 # (N*G, T)
mask = torch.arange(T) < torch.tensor([6, 3, 5, 2, 6, 4, 1, 6])[:, None]
ro = rporec.decode.Rollout
with torch.no_grad():
    old = grpo.sequence_logprobs(model, torch.cat([p_ids.repeat_interleave(Gs, 0), tokens], 1),
                              torch.cat([p_mask.repeat_interleave(Gs, 0), mask.long()], 1), T)
ent = torch.rand(N * Gs, T, generator=g)
adv = torch.randn(N * Gs, generator=g)
mine = [p for p in range(N) if p % rporec.WORLD == rporec.RANK]  # the same prompt split as rporec.shard
rows = [p * Gs + j for p in mine for j in range(Gs)]
rollout = ro(tokens[rows], mask[rows], old[rows] + 0.05, ent[rows])
batch = grpo.make_batch(p_ids[mine], p_mask[mine], rollout, adv[rows], Gs)
gcfg = grpo.GRPOConfig(group_size=Gs, micro_batch=3, beta=0.01, rho=0.5, old_logp="rollout")  # w != 1: the ratio counts
grpo.update(model, ref, torch.optim.SGD(model.parameters(), lr=0.1), batch, gcfg)

# --- sharded, cached reasoning generation (greedy, so 1 and 2 processes must agree token for token)
cfg.decode.greedy = True
cfg.decode.max_new_tokens = 6
llm, tok = rporec.load_backbone(cfg, ds)
texts = rporec.generate_reasoning(cfg, ds, llm, tok, "valid", ds.splits["valid"][:9])[0]

if rporec.MAIN:
    torch.save({"rechead": head.state_dict(), "grpo": model.state_dict(), "eval": metrics, "reasoning": texts},
               out_file)
if rporec.WORLD > 1:
    torch.distributed.destroy_process_group()
