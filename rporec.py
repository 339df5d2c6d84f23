"""RPORec, the one train script (arXiv 2605.21967, Algorithm 1).

    python rporec.py                                  # toy preset: tiny random models, CPU, offline
    python rporec.py --dataset cds                    # the paper run (Qwen3-0.6B)
    torchrun --nproc_per_node 4 rporec.py --dataset cds
    python rporec.py --dataset cds --grpo.beta 0.001 --rechead.trainable false

Top to bottom: config, data and backbone, cached reasoning (Alg. 1 line 1), Stage I (Rechead,
eq. 1-6), Stage II (GRPO with Rechead rewards, eq. 7-11), evaluation. Each run folder holds
config.json, log.jsonl, rechead.pt, ckpt/ and metrics.json.
"""
import copy, dataclasses, functools, glob, hashlib, json, os, random, shutil, sys, time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import decode as dec
import evaluate as E
import grpo as G
import rechead as R
import rewards as W

# ----------------------------------------------------------------------------- device and processes, once
RANK, WORLD, LOCAL_RANK = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
WORLD = max(WORLD, 1)
MAIN = RANK == 0  # only rank 0 logs, writes checkpoints and metrics
DEVICE = torch.device("cuda", LOCAL_RANK) if torch.cuda.is_available() else torch.device("cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # backbone weights and autocast


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    dataset: str = "toy"      # preset and data source (PRESETS, data.py)
    model: str = "toy"        # backbone: hub id, local folder, "toy" (tiny random) or "none" (no LLM)
    stage: str = "both"       # 1 | 2 | both (Algorithm 1)
    out: str = ""             # run folder; default runs/<dataset>-<time>
    init: str = ""            # --stage 2: the Stage I run folder holding rechead.pt
    resume: bool = False      # continue Stage II from <out>/ckpt
    ablate: str = ""          # "" | cot | I | II (paper Fig. 2); reward terms: --rewards.drop
    thinking: bool = True     # Qwen3 chat template thinking mode
    prompt_suffix: str = ""   # appended to the paper's prompt, e.g. a <think>/<answer> format hint for
                              # backbones without a thinking mode (SmolLM2); "" = the paper's prompt
    gen_batch: int = 64       # prompts per generation batch (Stage I reasoning, evaluation)
    limit: int = 0            # >0: only the first `limit` samples of each split (quick slices)
    seed: int = 0             # seeds python, numpy and torch
    dist_backend: str = "auto"  # torchrun: auto (nccl on GPUs, else gloo) | nccl | gloo
    official_eval: bool = False  # also the official protocol: valid only, 4 sampled CoTs, metrics averaged


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: D.DataConfig = field(default_factory=D.DataConfig)
    rechead: R.RecheadConfig = field(default_factory=R.RecheadConfig)
    decode: dec.DecodeConfig = field(default_factory=lambda: dec.DecodeConfig(greedy=True))  # Alg. 1 l. 1, eval
    grpo: G.GRPOConfig = field(default_factory=G.GRPOConfig)
    rewards: W.RewardConfig = field(default_factory=W.RewardConfig)
    eval: E.EvalConfig = field(default_factory=E.EvalConfig)  # full ranking: cut-offs, chunk, history masking


QWEN = {"run.model": "Qwen/Qwen3-0.6B"}
PRESETS = {
    # tiny random backbone and encoder built in code: every code path in minutes on a CPU. A random
    # model never writes the <think>/<answer> tags, so the toy drops eq. 7's r_fmt gate (the -fmt
    # ablation): the other rewards then vary and GRPO has something to learn from
    "toy": {"rewards.drop": "fmt", "run.model": "toy", "rechead.encoder": "toy", "decode.greedy": False, "rechead.layers": 1,
            "rechead.heads": 2, "rechead.batch_size": 64, "rechead.epochs": 40, "rechead.patience": 4,
            "decode.max_new_tokens": 24, "grpo.max_new_tokens": 24, "grpo.steps": 6, "grpo.prompts_per_step": 4,
            "grpo.lr": 1e-4, "grpo.save_every": 3, "grpo.sample_every": 2, "rewards.summary_max_new_tokens": 12},
    "cds": QWEN, "instruments": QWEN, "games": QWEN, "ml-100k": QWEN, "ml-1m": QWEN, "custom": QWEN,
}


def parse_config(argv):
    """Defaults < PRESETS[dataset] < flags. Flags are --section.field VALUE (run fields also bare:
    --model, --stage); a bare boolean flag means true."""
    cfg, flags, args = Config(), {}, [p for a in argv for p in (a.split("=", 1) if "=" in a else [a])]
    while args:
        key = args.pop(0)
        if not key.startswith("--"):
            raise SystemExit(f"error: unexpected argument {key!r}; flags look like --grpo.beta 0.001")
        key = key[2:].replace("-", "_")
        sec, _, name = (key if "." in key else f"run.{key}").partition(".")
        if not dataclasses.is_dataclass(getattr(cfg, sec, None)) or not hasattr(getattr(cfg, sec), name):
            raise SystemExit(f"error: unknown flag --{key}; every field is listed in a run's config.json")
        like = getattr(getattr(cfg, sec), name)
        if isinstance(like, bool) and (not args or args[0].startswith("--")):
            flags[f"{sec}.{name}"] = True
            continue
        if not args:
            raise SystemExit(f"error: --{key} needs a value")
        text = args.pop(0)
        if isinstance(like, bool) and text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"error: --{key} takes true/false, got {text!r}")
        try:
            flags[f"{sec}.{name}"] = (text.lower() in ("true", "1") if isinstance(like, bool)
                                      else tuple(int(v) for v in text.split(",")) if isinstance(like, tuple)
                                      else text if like is None else type(like)(text))
        except ValueError:
            raise SystemExit(f"error: --{key} takes a {type(like).__name__}, got {text!r}") from None
    dataset = flags.get("run.dataset", cfg.run.dataset)
    if dataset not in PRESETS:
        raise SystemExit(f"error: unknown dataset {dataset!r}; choose one of {sorted(PRESETS)}")
    for key, value in {**PRESETS[dataset], **flags}.items():
        sec, name = key.split(".")
        setattr(getattr(cfg, sec), name, value)
    cfg.data.dataset, cfg.rechead.use_cot = dataset, cfg.run.ablate != "cot"
    for name, value, choices in (("stage", cfg.run.stage, ("1", "2", "both")),
                                 ("ablate", cfg.run.ablate, ("", "cot", "I", "II"))):
        if value not in choices:
            raise SystemExit(f"error: --{name} must be one of {choices}, got {value!r}")
    if 10 not in cfg.eval.ks:
        raise SystemExit(f"error: --eval.ks {cfg.eval.ks} must include 10: Stage I keeps the best valid NDCG@10")
    cfg.run.out = cfg.run.out or f"runs/{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def save_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class Logger:
    """One fixed-key line per record on stdout, and the same record appended to log.jsonl."""

    def __init__(self, out):
        self.path = os.path.join(out, "log.jsonl")

    def __call__(self, rec):
        if MAIN:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- processes
def init_distributed(backend):
    if WORLD == 1:
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("error: --dist_backend nccl needs CUDA GPUs and none is visible; "
                         "use --dist_backend gloo to run processes on the CPU")
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend)


def shard(items):
    """This rank's strided share of a list (all of it in a single process)."""
    return items[RANK::WORLD]


def unshard(local, n):
    """Inverse of shard for a per-item tensor: every rank's values back in global order, exactly once."""
    if WORLD == 1:
        return local
    parts = [None] * WORLD
    dist.all_gather_object(parts, local.cpu())
    full = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r::WORLD] = part
    return full


def all_sum(*values):
    """Sums of python numbers over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=DEVICE)
    if WORLD > 1:
        dist.all_reduce(t)
    return t.tolist()


def mean_all(t):
    """Mean of a tensor's elements over every rank."""
    t = t.detach().double().reshape(-1)
    s, n = all_sum(float(t.sum()), t.numel())
    return s / max(n, 1)


def barrier():
    if WORLD > 1:
        dist.barrier()


def main_first(fn, *args):
    """fn(*args) on rank 0, then on the other ranks: rank 0 builds a cache, the others read it."""
    out = fn(*args) if MAIN else None
    barrier()
    return out if MAIN else fn(*args)


# ----------------------------------------------------------------------------- data and backbone
TOY_SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
TOY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_toy_backbone(texts, out_dir, seed=0):
    """A 2-layer random Qwen3 with a word-level tokenizer over `texts`, saved as a normal HF folder
    so that the toy run loads it exactly like a real checkpoint."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())})
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOY_SPECIALS + words)}, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer, tk.decoder = normalizers.Lowercase(), pre, decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|im_end|>",
                                  additional_special_tokens=TOY_SPECIALS[2:], chat_template=TOY_TEMPLATE)
    tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])  # not special: kept when decoding, as Qwen3's
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    with torch.no_grad():  # zero (tied) rows: greedy decoding then emits words, not control tokens
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids(TOY_SPECIALS)] = 0
    tmp = f"{out_dir}.tmp{os.getpid()}"
    model.save_pretrained(tmp), tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def load_backbone(cfg, ds):
    """(model, tokenizer) from a hub id or local folder; (None, None) for --model none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = cfg.run.model
    if name == "none":
        return None, None
    if name == "toy":
        name = main_first(build_toy_backbone, ds.texts[1:], os.path.join(cfg.data.data_dir, "toy", "backbone"))
    try:
        tok = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPE).to(DEVICE).eval()
    except OSError as e:
        raise SystemExit(f"error: could not load the backbone {name!r}: {e}\nPass a local folder with "
                         "--model PATH, or check the hub id and the network.") from e
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def eos_ids(model, tok):
    ids = model.generation_config.eos_token_id
    return sorted({*([ids] if isinstance(ids, int) else ids or []), tok.eos_token_id} - {None})


def encode_prompts(tok, messages, thinking):
    """Chat-templated, left-padded prompts: (B, P) ids and mask."""
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
             for m in messages]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(DEVICE), enc.attention_mask.to(DEVICE)


def user_messages(cfg, ds, sample):
    """The paper's prompt for one sample (data.build_messages) plus --prompt_suffix."""
    msgs = D.build_messages(ds, sample, cfg.data)
    if cfg.run.prompt_suffix:
        msgs[-1] = {**msgs[-1], "content": f"{msgs[-1]['content']}\n{cfg.run.prompt_suffix}"}
    return msgs


def complete(model, tok, messages, dcfg, thinking):
    """Completion texts and the Rollout for a batch of chat messages, with the one shared decoder."""
    ids, mask = encode_prompts(tok, messages, thinking)
    out = dec.generate(model, ids, mask, dcfg, eos_ids(model, tok), tok.pad_token_id)
    return tok.batch_decode(out.tokens.masked_fill(~out.mask, tok.pad_token_id), skip_special_tokens=True), out


# ----------------------------------------------------------------------------- reasoning cache (Alg. 1, line 1)
def split_reasoning(text):
    """(y, z): the CoT, and the answer or None when it did not parse (eq. 2 falls back to history)."""
    think, answer = W.parse_completion(text)
    return (think if think is not None else text.split("<answer>")[0].strip()), (answer or None)


def cache_path(cfg, split):
    key = json.dumps([cfg.run.model, cfg.run.thinking, cfg.run.prompt_suffix, D.PROMPT_VERSION, dataclasses.asdict(cfg.decode),
                      cfg.data.max_history_chars, D.cache_key(cfg.data)], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.data.data_dir, "reasoning", f"{cfg.data.dataset}-{digest}", f"{split}.jsonl")


def read_cache(path):
    """{sample index: record}. A last line cut short by a kill is cut off the file first."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb+") as f:
        raw = f.read()
        if raw and not raw.endswith(b"\n"):
            f.truncate(raw.rfind(b"\n") + 1)
    try:
        return {r["i"]: r for r in map(json.loads, raw[:raw.rfind(b"\n") + 1].decode().splitlines())}
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: the reasoning cache {path} is corrupt ({e}); delete it and rerun to "
                         "regenerate it") from None


def fold_shards(path):
    """Rank 0 appends the per-rank shard files of a distributed run to the one cache, once every
    rank has finished writing."""
    barrier()
    if MAIN:
        for part in sorted(glob.glob(f"{path}.rank*")):
            lines = "".join(f"{json.dumps(rec)}\n" for rec in read_cache(part).values())
            with open(path, "a") as f:
                f.write(lines), f.flush(), os.fsync(f.fileno())
            os.remove(part)
    barrier()


def generate_reasoning(cfg, ds, model, tok, split, samples, path=None):
    """Reasoning for every sample of a split, appended batch by batch to a JSONL cache (one write and
    an fsync per batch), so a killed run resumes where it stopped. Returns [(y, z)] in sample order."""
    if model is None:  # --model none: the history-only Rechead
        return [("", None)] * len(samples)
    path = path or cache_path(cfg, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fold_shards(path)
    todo = shard([i for i in range(len(samples)) if i not in read_cache(path)])
    todo.sort(key=lambda i: -len(samples[i]["history"]))  # similar prompt lengths share a batch
    mine = f"{path}.rank{RANK}" if WORLD > 1 else path
    bar = tqdm(total=len(todo), desc=f"reasoning {split}", unit="sample", disable=not MAIN)
    t0, n_tok = time.time(), 0
    for b in range(0, len(todo), cfg.run.gen_batch):
        idx = todo[b:b + cfg.run.gen_batch]
        texts, out = complete(model, tok, [user_messages(cfg, ds, samples[i]) for i in idx],
                              cfg.decode, cfg.run.thinking)
        with open(mine, "a") as f:
            f.write("".join(json.dumps({"i": i, "text": t}) + "\n" for i, t in zip(idx, texts)))
            f.flush(), os.fsync(f.fileno())
        n_tok += int(out.mask.sum())
        bar.update(len(idx)), bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
    bar.close()
    fold_shards(path)
    done = read_cache(path)
    return [split_reasoning(done[i]["text"]) for i in range(len(samples))]


# ----------------------------------------------------------------------------- Stage I: Rechead (eq. 1-6)
def rechead_inputs(cfg, ds, samples, reasoning):
    """The Rechead's three texts per sample: history x, CoT y, answer z (None: not parsed)."""
    budget = cfg.rechead.history_chars or cfg.data.max_history_chars  # short encoders keep the newest items
    x = [D.history_text(ds, s["history"], budget) for s in samples]
    return x, [r[0] for r in reasoning], [r[1] for r in reasoning]


def make_head(cfg, ds):
    if cfg.rechead.encoder == "toy":
        cfg.rechead.encoder = main_first(R.build_toy_encoder, ds.texts[1:],
                                         os.path.join(cfg.data.data_dir, "toy", "encoder"))
    return R.Rechead(cfg.rechead, ds.texts, DEVICE)


EMBED_SAVE_S = 300  # embed_frozen writes its progress to disk at least this often (seconds)


def embed_frozen(cfg, head, inputs):
    """Frozen encoders: embed every distinct text once, up front, and keep the embeddings on disk
    (<data_dir>/embeddings/) so that a rerun with the same encoder skips the work."""
    if head.cfg.trainable:
        return
    key = hashlib.sha1(f"{head.cfg.encoder}|{head.cfg.max_seq_length}".encode()).hexdigest()[:12]
    path = os.path.join(cfg.data.data_dir, "embeddings", f"{key}.pt")
    known = torch.load(path, weights_only=False) if os.path.exists(path) else {"texts": [], "vecs": None}
    head.remember(known["texts"], known["vecs"])
    texts = [t for t in dict.fromkeys(t or "" for x, y, z in inputs for t in (*x, *y, *z)) if not head.knows(t)]

    def save(done):  # atomically, everything embedded so far
        if done and MAIN:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"texts": known["texts"] + done, "vecs": head.encode_frozen(known["texts"] + done).cpu()},
                       f"{path}.tmp")
            os.replace(f"{path}.tmp", path)

    step, saved = 16 * head.cfg.encode_batch, time.time()
    for i in tqdm(range(0, len(texts), step), desc="embedding texts (frozen encoder)", disable=not MAIN):
        head.encode_frozen(texts[i:i + step])
        if time.time() - saved > EMBED_SAVE_S and i + step < len(texts):  # a kill loses minutes, not the lot
            save(texts[:i + step])
            saved = time.time()
    save(texts)


def rechead_step(net, head, opt, inputs, targets, idx, neg):
    """Eq. 6 on one global batch idx (B,) with negatives neg (B, k). Each rank takes a strided share;
    its loss is weighted by its share, so DDP's gradient average equals the global batch mean."""
    x, y, z = inputs
    mine, neg = idx[RANK::WORLD], neg[RANK::WORLD]
    h = net([x[i] for i in mine], [y[i] for i in mine], [z[i] for i in mine])  # (b, d)
    loss = R.rec_loss(h, targets[mine].to(DEVICE), neg.to(DEVICE), head.item_vecs)
    opt.zero_grad(set_to_none=True)
    (loss * len(mine) * WORLD / len(idx)).backward()
    opt.step()
    return loss.item()


def evaluate_split(cfg, head, inputs, samples, ground=False):
    """Full ranking over all items, sharded over ranks and gathered back exactly. ground=True is the -I
    ablation: no Rechead; the answer (else the history) goes to the nearest items by encoder cosine."""
    x, y, z = inputs
    head.eval()

    def scores(chunk):
        idx = [s["i"] for s in chunk]
        if ground:
            return R.ground_scores(head.encode_frozen([z[i] or x[i] for i in idx]), head.item_vecs)
        return head.scores(head.user_vecs([x[i] for i in idx], [y[i] for i in idx], [z[i] for i in idx]))

    ranks = E.full_ranking(scores, shard([dict(s, i=i) for i, s in enumerate(samples)]), cfg.eval.chunk,
                           cfg.eval.mask_history)
    return E.metrics(unshard(ranks, len(samples)), cfg.eval.ks)


def train_rechead(cfg, ds, head, inputs, splits, log, out):
    """Algorithm 1 lines 2-12: fresh uniform negatives per batch; keep the best valid NDCG@10."""
    rc = cfg.rechead
    if rc.batch_size % WORLD:
        raise SystemExit(f"error: --rechead.batch_size {rc.batch_size} does not divide by {WORLD} processes")
    gen = torch.Generator().manual_seed(cfg.run.seed)  # identical on every rank: same batches, same negatives
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=rc.lr)
    net = torch.nn.parallel.DistributedDataParallel(head, broadcast_buffers=False) if WORLD > 1 else head
    targets = torch.tensor([s["target"] for s in splits["train"]])
    best, best_state, bad = -1.0, None, 0
    for epoch in range(rc.epochs):
        head.train()
        t0, losses, perm = time.time(), [], torch.randperm(len(targets), generator=gen)
        for b in tqdm(range(0, len(perm), rc.batch_size), desc=f"rechead epoch {epoch}", leave=False, disable=not MAIN):
            idx = perm[b:b + rc.batch_size]
            neg = R.sample_negatives(targets[idx], ds.n_items, rc.negatives, gen)  # (B, k)
            losses.append(rechead_step(net, head, opt, inputs["train"], targets, idx, neg))
        m = evaluate_split(cfg, head, inputs["valid"], splits["valid"])
        log({"stage": 1, "epoch": epoch, "loss": float(np.mean(losses)), "valid_hr@10": m["hr@10"],
             "valid_ndcg@10": m["ndcg@10"], "epoch_s": round(time.time() - t0, 2)})
        if m["ndcg@10"] > best:
            best, bad, best_state = m["ndcg@10"], 0, copy.deepcopy(head.state_dict())
            if MAIN:
                tmp = os.path.join(out, "rechead.pt.tmp")
                torch.save({"state": best_state, "epoch": epoch, "config": dataclasses.asdict(cfg)}, tmp)
                os.replace(tmp, os.path.join(out, "rechead.pt"))
        elif (bad := bad + 1) >= rc.patience:
            break
    head.load_state_dict(best_state)
    return head


# ----------------------------------------------------------------------------- Stage II: GRPO (eq. 7-11)
def reward_parts(cfg, ds, head, ref, tok, samples, texts, ro):
    """Section 2.2's rewards for B = N*G completions of N samples (groups contiguous): (r (B,), parts
    {name: (B,)}, CoT token counts (B,), summaries)."""
    rw, B = cfg.rewards, len(texts)
    owner = [samples[b // cfg.grpo.group_size] for b in range(B)]
    x, y, z = rechead_inputs(cfg, ds, owner, [split_reasoning(t) for t in texts])
    parts = {"fmt": torch.tensor([W.format_reward(t) for t in texts]),
             "clean": torch.tensor([W.clean_reward(t, rw.kappa) for t in texts]),
             "ndcg": torch.zeros(B), "sim": torch.zeros(B), "comp": torch.zeros(B), "ent": torch.zeros(B)}
    with torch.no_grad():  # r_ndcg: the target among k fixed negatives, scored by the frozen Rechead
        cand = torch.stack([W.candidates(s["i"], s["target"], ds.n_items, rw.negatives, rw.seed)
                            for s in samples]).repeat_interleave(cfg.grpo.group_size, 0)  # (B, k+1), one set per group
        h = head.user_vecs(x, y, z)                                                   # (B, d)
        s = (h[:, None] * head.item_vecs[cand.to(DEVICE)]).sum(-1)                    # (B, k+1)
    cot = torch.stack([W.cot_token_mask(ro.tokens[b], ro.mask[b], tok) for b in range(B)])  # (B, T)
    for b in range(B):
        parts["ndcg"][b] = W.ndcg_reward(W.candidate_rank(s[b]))
        parts["ent"][b] = W.entropy_reward(ro.entropy[b][cot[b]].float().cpu(), rw.rho)
    # r_sim, r_comp: greedy summaries of y by the frozen reference model in one batched call, only
    # where the total can be non-zero (eq. 7 multiplies everything by r_fmt)
    todo = [b for b in range(B) if y[b] and (parts["fmt"][b] > 0 or not rw.gate)]
    summaries = [""] * B
    if todo:
        scfg = dataclasses.replace(cfg.decode, greedy=True, max_new_tokens=rw.summary_max_new_tokens)
        outs, _ = complete(ref, tok, [W.summary_messages(y[b]) for b in todo], scfg, thinking=False)
        cos = torch.nn.functional.cosine_similarity(head.encode_frozen([y[b] for b in todo]),
                                                    head.encode_frozen([o.strip() for o in outs]), dim=-1)
        n_tokens = lambda t: len(tok(t, add_special_tokens=False).input_ids)
        for j, b in enumerate(todo):
            summaries[b] = outs[j].strip()
            parts["sim"][b] = W.similarity_reward(float(cos[j]), rw.delta)
            parts["comp"][b] = W.compression_reward(n_tokens(summaries[b]), n_tokens(y[b]))
    weights = rw.weights()
    r = torch.tensor([W.total_reward({k: float(v[b]) for k, v in parts.items()}, weights, rw.gate) for b in range(B)])
    return r, parts, cot.sum(1).float(), summaries


@functools.lru_cache(maxsize=4)
def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_batch(step, n_train, per_step, seed):
    """Global train indices of one GRPO step: epoch-wise permutations, a pure function of the step,
    so a resumed run sees exactly the prompts it would have seen."""
    return [int(_perm(n_train, seed + j // n_train)[j % n_train]) for j in range(step * per_step, (step + 1) * per_step)]


def save_checkpoint(out, model, tok, opt, step, cfg):
    """<out>/ckpt: backbone (save_pretrained), optimizer, next step, every rank's RNG states. Written
    beside the old one and swapped in, so a kill at any moment leaves a whole checkpoint."""
    final, tmp = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp")
    if MAIN:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else None},
               os.path.join(tmp, f"rng{RANK}.pt"))
    if MAIN:
        model.save_pretrained(tmp), tok.save_pretrained(tmp)
        torch.save({"step": step, "world": WORLD, "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg)},
                   os.path.join(tmp, "trainer_state.pt"))
    barrier()
    if MAIN:
        if os.path.exists(final):
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    barrier()


def load_checkpoint(out, model, opt):
    """Weights, optimizer and this rank's RNG from <out>/ckpt; returns the next step to run."""
    from transformers import AutoModelForCausalLM
    path = os.path.join(out, "ckpt")
    if not os.path.exists(os.path.join(path, "trainer_state.pt")):
        raise SystemExit(f"error: --resume but no checkpoint in {path}; drop --resume to start afresh")
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    if st["world"] != WORLD:
        raise SystemExit(f"error: the checkpoint was written by {st['world']} processes; resume with as many")
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict())
    opt.load_state_dict(st["optimizer"])
    rng = torch.load(os.path.join(path, f"rng{RANK}.pt"), weights_only=False)
    random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], DEVICE)
    return st["step"]


def stage2(cfg, ds, head, model, tok, train, log, out):
    """Algorithm 1 lines 13-20: G rollouts per prompt, rewards from the frozen Rechead, GRPO updates.
    Processes split each step's prompts; grpo.update averages their gradients."""
    g = cfg.grpo
    if g.prompts_per_step % WORLD:
        raise SystemExit(f"error: --grpo.prompts_per_step {g.prompts_per_step} does not divide by {WORLD} processes")
    head.eval().requires_grad_(False)
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref (KL) and the summarizer of r_sim, r_comp
    model.float()  # fp32 master weights: a bf16 weight would round every lr=1e-6 update away; autocast computes in bf16
    if g.grad_checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    torch.manual_seed(cfg.run.seed + 1 + RANK)  # ranks sample different completions
    start = load_checkpoint(out, model, opt) if cfg.run.resume else 0
    if MAIN and os.path.exists(log.path):  # steps logged after the checkpoint will run again: drop them
        recs = [r for r in map(json.loads, open(log.path)) if r["stage"] != 2 or r["step"] <= start]
        with open(f"{log.path}.tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        os.replace(f"{log.path}.tmp", log.path)
    roll = dataclasses.replace(cfg.decode, greedy=False, temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                               top_p=1.0, top_k=0)  # pi_old must be the distribution that sampled
    amp = DTYPE if DEVICE.type == "cuda" else None
    for step in tqdm(range(start, g.steps), desc="grpo", initial=start, total=g.steps, disable=not MAIN):
        t0 = time.time()
        samples = [dict(train[i], i=i) for i in shard(step_batch(step, len(train), g.prompts_per_step, cfg.run.seed))]
        p_ids, p_mask = encode_prompts(tok, [user_messages(cfg, ds, s) for s in samples], cfg.run.thinking)
        model.eval()
        ro = G.rollout(model, p_ids, p_mask, g.group_size, roll, eos_ids(model, tok), tok.pad_token_id)
        texts = tok.batch_decode(ro.tokens.masked_fill(~ro.mask, tok.pad_token_id), skip_special_tokens=True)
        r, parts, cot_len, summaries = reward_parts(cfg, ds, head, ref, tok, samples, texts, ro)
        head.forget()  # every step brings new CoTs: keep the frozen-embedding cache bounded
        adv = G.group_advantages(r, g.group_size, g.adv_eps)
        model.train()
        st = G.update(model, ref, opt, G.make_batch(p_ids, p_mask, ro, adv.to(DEVICE), g.group_size), g, amp)
        zero, groups = all_sum(G.zero_spread_groups(r, g.group_size), len(samples))
        log({"stage": 2, "step": step + 1, "reward": mean_all(r), **{k: mean_all(v) for k, v in parts.items()},
             "kl": st["kl"], "entropy": mean_all(ro.entropy[ro.mask]), "clip_low": st["clip_low"],
             "clip_high": st["clip_high"], "kept": st["kept"], "loss": st["loss"], "grad_norm": st["grad_norm"],
             "zero_std_groups": zero / groups, "len": mean_all(ro.mask.sum(1)), "cot_len": mean_all(cot_len),
             "s": round(time.time() - t0, 2)})
        if MAIN and g.sample_every and (step + 1) % g.sample_every == 0:
            tqdm.write(f"--- step {step + 1} sample (reward {r[0]:.3f}; target: {ds.titles[samples[0]['target']]})\n"
                       f"{texts[0][:1500]}\n--- its summary: {summaries[0][:300]}")
        if (step + 1) % max(g.save_every, 1) == 0 or step + 1 == g.steps:
            save_checkpoint(out, model, tok, opt, step + 1, cfg)
    return model.eval()


# ----------------------------------------------------------------------------- evaluation and main
def plot_stage2(out):
    """Reward parts, KL, entropy and CoT length per step (cf. the paper's Fig. 4) into stage2.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no stage2.png (pip install matplotlib)")
        return
    recs = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r["stage"] == 2]
    keys = ("reward", "fmt", "clean", "ndcg", "sim", "comp", "ent", "kl", "entropy", "cot_len")
    fig, axes = plt.subplots(2, 5, figsize=(18, 6))
    for ax, k in zip(axes.flat, keys):
        ax.plot([r["step"] for r in recs], [r[k] for r in recs])
        ax.set_title(k), ax.set_xlabel("step")
    fig.tight_layout(), fig.savefig(os.path.join(out, "stage2.png"), dpi=80)


def official_valid(cfg, ds, head, model, tok, valid, n=4):
    """The official code's protocol: valid metrics averaged over n sampled CoTs per sample."""
    sampled = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, greedy=False))
    runs = []
    for j in range(n):
        torch.manual_seed(cfg.run.seed + 1000 + j)
        path = cache_path(sampled, "valid").replace(".jsonl", f"-sample{j}.jsonl")
        rs = generate_reasoning(sampled, ds, model, tok, "valid", valid, path)
        runs.append(evaluate_split(cfg, head, rechead_inputs(cfg, ds, valid, rs), valid))
    return E.average_metrics(runs)


def main(argv):
    t_start, cfg = time.time(), parse_config(argv)
    init_distributed(cfg.run.dist_backend)
    random.seed(cfg.run.seed), np.random.seed(cfg.run.seed), torch.manual_seed(cfg.run.seed)
    out, log = cfg.run.out, Logger(cfg.run.out)
    if MAIN:
        os.makedirs(out, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        save_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg))
    ds = main_first(D.load_dataset, cfg.data)
    splits = {k: v[:cfg.run.limit or None] for k, v in ds.splits.items()}
    model, tok = load_backbone(cfg, ds)
    if MAIN and cfg.run.model == "toy":
        print("toy preset: a tiny randomly initialised Qwen3 backbone and a random static-embedding encoder, both "
              "built in code (no download). Its reasoning is noise; the numbers only exercise the code.")
    mpath = os.path.join(out, "metrics.json")
    metrics = json.load(open(mpath)) if os.path.exists(mpath) else {}
    if cfg.run.stage == "2":  # the frozen Rechead of a Stage I run, built as that run configured it
        path = os.path.join(cfg.run.init, "rechead.pt")
        if not os.path.exists(path):
            raise SystemExit(f"error: --stage 2 needs --init RUN_FOLDER, a Stage I run holding rechead.pt ({path})")
        saved = torch.load(path, weights_only=False)
        cfg.rechead = R.RecheadConfig(**saved["config"]["rechead"])
    head = make_head(cfg, ds)
    if cfg.run.stage in ("1", "both"):
        inputs = {k: rechead_inputs(cfg, ds, v, generate_reasoning(cfg, ds, model, tok, k, v)) for k, v in splits.items()}
        embed_frozen(cfg, head, inputs.values())
        if cfg.run.ablate != "I":
            head = train_rechead(cfg, ds, head, inputs, splits, log, out)
        metrics["stage1"] = {k: evaluate_split(cfg, head, inputs[k], splits[k], cfg.run.ablate == "I") for k in ("valid", "test")}
        metrics["popularity"] = {"test": E.popularity_metrics(splits["train"], splits["test"], ds.n_items, cfg.eval)}
        if cfg.run.official_eval and model is not None:
            metrics["stage1"]["valid_official"] = official_valid(cfg, ds, head, model, tok, splits["valid"])
        if MAIN:
            print(f"stage 1 done after {time.time() - t_start:.0f} s")
    else:
        head.load_state_dict(saved["state"])
    if MAIN:
        save_json(mpath, metrics)
    if cfg.run.stage in ("2", "both") and cfg.run.ablate not in ("I", "II"):
        if model is None:
            raise SystemExit("error: Stage II trains the backbone; pass --model (not none)")
        model = stage2(cfg, ds, head, model, tok, splits["train"], log, out)
        metrics["stage2"] = {}
        for k in ("valid", "test"):  # the tuned backbone reasons again; the frozen Rechead ranks
            rs = generate_reasoning(cfg, ds, model, tok, k, splits[k], os.path.join(out, "reasoning", f"{k}-step{cfg.grpo.steps}.jsonl"))
            metrics["stage2"][k] = evaluate_split(cfg, head, rechead_inputs(cfg, ds, splits[k], rs), splits[k])
        if MAIN:
            save_json(mpath, metrics), plot_stage2(out)
            print(f"stage 2 done after {time.time() - t_start:.0f} s")
    if MAIN:
        for name, m in metrics.items():
            for split, v in m.items():
                print(f"{name:>10} {split:>5}  " + "  ".join(f"{k}={v[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@20") if k in v))
        print(f"run folder: {out}")
    if WORLD > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(f"error: CUDA out of memory ({e}).\nFinished work is kept (reasoning cache, rechead.pt, "
                         "ckpt/): lower --gen_batch, --grpo.micro_batch or --grpo.logit_chunk, or turn on "
                         "--grpo.grad_checkpointing, then rerun (Stage II with --resume).") from e
