"""RPORec, the one train script (arXiv 2605.21967, Algorithm 1).

    python rporec.py                                 # toy preset: tiny random models, CPU, offline
    python rporec.py --dataset cds                   # the paper run (Qwen3-0.6B, one GPU)
    torchrun --nproc_per_node 4 rporec.py --dataset cds
    python rporec.py --dataset cds --grpo.beta 0.001 --rechead.trainable false

Reads top to bottom: config, data, backbone + cached reasoning (Alg. 1 line 1), Stage I (Rechead,
eq. 1-6), Stage II (GRPO with Rechead rewards, eq. 7-11), evaluation. Every run folder holds
config.json, log.jsonl, checkpoints and metrics.json.
"""
import copy, dataclasses, functools, hashlib, json, math, os, random, sys, time
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

# ----------------------------------------------------------------------------- device, once
RANK, WORLD, LOCAL_RANK = (int(os.environ.get(k, d)) for k, d in
                           (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
DEVICE = torch.device("cuda", LOCAL_RANK) if torch.cuda.is_available() else torch.device("cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # backbone weights + autocast
MAIN = RANK == 0


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    dataset: str = "toy"          # preset and data source (see PRESETS and data.py)
    model: str = "toy"            # backbone: hub id, local folder, "toy" (tiny random) or "none" (no LLM)
    stage: str = "both"           # 1 | 2 | both (Algorithm 1)
    out: str = ""                 # run folder; default runs/<dataset>-<time>
    init: str = ""                # stage 2 only: the Stage I run folder holding rechead.pt
    resume: bool = False          # continue Stage II from <out>/ckpt
    ablate: str = ""              # "" | cot | I | II  (paper Fig. 2; reward terms: --rewards.drop)
    thinking: bool = True         # Qwen3 chat template thinking mode
    gen_batch: int = 64           # prompts per generation batch (Stage I reasoning, evaluation)
    limit: int = 0                # >0: use only the first `limit` samples of each split (slices)
    seed: int = 0                 # seeds python, numpy, torch


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: D.DataConfig = field(default_factory=D.DataConfig)
    rechead: R.RecheadConfig = field(default_factory=R.RecheadConfig)
    decode: dec.DecodeConfig = field(default_factory=lambda: dec.DecodeConfig(greedy=True))
    grpo: G.GRPOConfig = field(default_factory=G.GRPOConfig)
    rewards: W.RewardConfig = field(default_factory=W.RewardConfig)


_AMAZON = {"run.model": "Qwen/Qwen3-0.6B", "run.gen_batch": 64}
PRESETS = {
    # tiny random backbone + tiny random encoder, both built in code: runs anywhere in minutes
    "toy": {"run.model": "toy", "rechead.encoder": "toy", "decode.greedy": False, "rechead.layers": 1, "rechead.heads": 2,
            "rechead.batch_size": 64, "rechead.epochs": 40, "rechead.patience": 4,
            "decode.max_new_tokens": 24, "grpo.max_new_tokens": 24, "grpo.steps": 6,
            "grpo.prompts_per_step": 4, "grpo.lr": 1e-4, "rewards.summary_max_new_tokens": 12,
            "grpo.save_every": 3, "grpo.sample_every": 2},
    "cds": _AMAZON, "instruments": _AMAZON, "games": _AMAZON,
    "ml-100k": {"run.model": "Qwen/Qwen3-0.6B"}, "ml-1m": {"run.model": "Qwen/Qwen3-0.6B"},
    "custom": {"run.model": "Qwen/Qwen3-0.6B"},
}


def _set(cfg, dotted, value):
    sec, name = dotted.split(".")
    setattr(getattr(cfg, sec), name, value)


def _cast(text, like):
    if isinstance(like, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise SystemExit(f"error: expected true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    return type(like)(text) if like is not None else text


def parse_config(argv):
    """Defaults < PRESETS[dataset] < flags. Flags: --section.field value; run fields also bare (--model)."""
    cfg = Config()
    pairs = []
    for a in argv:
        if a.startswith("--") and "=" in a:
            pairs += a.split("=", 1)
        else:
            pairs.append(a)
    flags = {}
    i = 0
    while i < len(pairs):
        key = pairs[i]
        if not key.startswith("--"):
            raise SystemExit(f"error: unexpected argument {key!r}; flags look like --grpo.beta 0.001")
        key = key[2:].replace("-", "_")
        key = key if "." in key else f"run.{key}"
        sec, _, name = key.partition(".")
        if not hasattr(cfg, sec) or not hasattr(getattr(cfg, sec), name):
            raise SystemExit(f"error: unknown flag --{key}; see config.json of any run for all fields")
        like = getattr(getattr(cfg, sec), name)
        nxt = pairs[i + 1] if i + 1 < len(pairs) else None
        if isinstance(like, bool) and (nxt is None or nxt.startswith("--")):
            flags[key], i = True, i + 1          # bare boolean flag: --resume
        else:
            if nxt is None:
                raise SystemExit(f"error: --{key} needs a value")
            flags[key], i = _cast(nxt, like), i + 2
    dataset = flags.get("run.dataset", cfg.run.dataset)
    if dataset not in PRESETS:
        raise SystemExit(f"error: unknown dataset {dataset!r}; choose one of {sorted(PRESETS)}")
    for k, v in {**PRESETS[dataset], **flags}.items():
        _set(cfg, k, v)
    cfg.data.dataset = dataset
    if cfg.run.stage not in ("1", "2", "both"):
        raise SystemExit(f"error: --stage must be 1, 2 or both, got {cfg.run.stage!r}")
    if cfg.run.ablate not in ("", "cot", "I", "II"):
        raise SystemExit(f"error: --ablate must be cot, I or II, got {cfg.run.ablate!r}")
    cfg.rechead.use_cot = cfg.run.ablate != "cot"
    cfg.run.out = cfg.run.out or f"runs/{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def seed_all(seed):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def save_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class Logger:
    """One fixed-key line per step on stdout, and the same record appended to log.jsonl."""

    def __init__(self, out):
        self.path = os.path.join(out, "log.jsonl")

    def __call__(self, rec):
        if not MAIN:
            return
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- data
def split_samples(cfg, ds):
    """The canonical splits, cut to --limit samples each for quick slices."""
    n = cfg.run.limit
    return {k: (v[:n] if n else v) for k, v in ds.splits.items()}


def shard(items):
    """This rank's strided share of a list (all of it when single-process)."""
    return items[RANK::WORLD]


# ----------------------------------------------------------------------------- backbone
TOY_SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
TOY_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TOY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_toy_backbone(texts, out_dir, seed=0):
    """A 2-layer randomly initialised Qwen3 with a word-level tokenizer over `texts`, saved as a
    normal HF folder so that the toy run loads it exactly like a real checkpoint."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    words = sorted({w for t in texts for w in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(t.lower())
                    for w in [w[0]]})
    vocab = {w: i for i, w in enumerate(TOY_SPECIALS + TOY_TAGS + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                  eos_token="<|im_end|>", additional_special_tokens=TOY_SPECIALS[2:])
    tok.add_tokens(TOY_TAGS)  # not special: decoded text keeps them, as with Qwen3's <think>
    tok.chat_template = TOY_TEMPLATE
    torch.manual_seed(seed)
    mc = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                     tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(mc)
    with torch.no_grad():  # zero (tied) rows: greedy decoding then emits words, not control tokens
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids(TOY_SPECIALS)] = 0
    tmp = f"{out_dir}.tmp{os.getpid()}"
    model.save_pretrained(tmp), tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def load_backbone(cfg, ds):
    """(model, tokenizer) from a hub id or local folder; None, None for --model none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = cfg.run.model
    if name == "none":
        return None, None
    if name == "toy":
        name = build_toy_backbone(ds.texts[1:], os.path.join(cfg.data.data_dir, "toy", "backbone"))
    try:
        tok = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPE).to(DEVICE)
    except OSError as e:
        raise SystemExit(f"error: could not load backbone {name!r} ({e}). Pass a local folder with "
                         "--model PATH, or check the hub id and your network.") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def eos_ids(model, tok):
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids + [tok.eos_token_id]) - {None})


def encode_prompts(tok, messages, thinking):
    """Chat-template a batch of message lists and left-pad them: (B, P) ids and mask."""
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
             for m in messages]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(DEVICE), enc.attention_mask.to(DEVICE)


def complete(model, tok, messages, dcfg, thinking, stats=False):
    """Prompt -> decoded completion texts (+ the Rollout) with the one shared decoder."""
    ids, mask = encode_prompts(tok, messages, thinking)
    out = dec.generate(model, ids, mask, dcfg, eos_ids(model, tok), tok.pad_token_id, stats=stats)
    texts = tok.batch_decode(out.tokens.masked_fill(~out.mask, tok.pad_token_id), skip_special_tokens=True)
    return texts, out, (ids, mask)


# ----------------------------------------------------------------------------- reasoning cache (Alg. 1, line 1)
def split_reasoning(text):
    """(y, z) from one completion: the CoT and the answer (None if it did not parse, eq. 2)."""
    think, answer = W.parse_completion(text)
    if think is None:  # no think block: everything but the answer is the reasoning
        think = text.split("<answer>")[0].strip()
    return think, (answer or None)


def cache_path(cfg, split):
    key = json.dumps([cfg.run.model, cfg.run.thinking, D.PROMPT_VERSION, dataclasses.asdict(cfg.decode),
                      cfg.data.max_history_chars, cfg.data.dataset, D.cache_key(cfg.data)], sort_keys=True)
    h = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.data.data_dir, "reasoning", f"{cfg.data.dataset}-{h}", f"{split}.jsonl")


def read_cache(path):
    """{sample index: record}. A last line cut short by a kill is cut off the file, so that the
    next append starts on a fresh line."""
    done = {}
    if os.path.exists(path):
        with open(path, "rb+") as f:
            raw = f.read()
            if raw and not raw.endswith(b"\n"):
                f.truncate(raw.rfind(b"\n") + 1)
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[rec["i"]] = rec
    return done


def generate_reasoning(cfg, ds, model, tok, split, samples, path=None, desc=None):
    """Greedy (by default) reasoning for every sample of a split, appended batch by batch to a JSONL
    cache so that a killed run resumes where it stopped. Returns [(y, z)] in sample order."""
    if model is None:  # --model none: history-only Rechead
        return [("", None)] * len(samples)
    path = path or cache_path(cfg, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    done = read_cache(path)
    todo = shard([i for i in range(len(samples)) if i not in done])
    todo.sort(key=lambda i: -len(samples[i]["history"]))  # similar lengths share a batch
    mine = f"{path}.rank{RANK}" if WORLD > 1 else path
    bar = tqdm(total=len(todo), desc=desc or f"reasoning {split}", unit="sample", disable=not MAIN)
    t0, ntok = time.time(), 0
    for b in range(0, len(todo), cfg.run.gen_batch):
        idx = todo[b:b + cfg.run.gen_batch]
        msgs = [D.build_messages(ds, samples[i], cfg.data) for i in idx]
        texts, out, _ = complete(model, tok, msgs, cfg.decode, cfg.run.thinking)
        lines = "".join(json.dumps({"i": i, "text": t, "n_tokens": int(n)}) + "\n"
                        for i, t, n in zip(idx, texts, out.mask.sum(1)))
        with open(mine, "a") as f:  # one write per batch, then fsync: at most the batch is lost
            f.write(lines), f.flush(), os.fsync(f.fileno())
        ntok += int(out.mask.sum())
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{ntok / (time.time() - t0):.0f}")
    bar.close()
    if WORLD > 1:  # rank 0 folds every rank's shard into the one cache
        dist.barrier()
        if MAIN:
            for r in range(WORLD):
                part = f"{path}.rank{r}"
                if os.path.exists(part):
                    with open(part) as f, open(path, "a") as g:
                        g.write("".join(l for l in f if l.endswith("\n"))), g.flush(), os.fsync(g.fileno())
                    os.remove(part)
        dist.barrier()
    done = read_cache(path)
    return [split_reasoning(done[i]["text"]) for i in range(len(samples))]


# ----------------------------------------------------------------------------- Stage I: Rechead (eq. 1-6)
def rechead_inputs(cfg, ds, samples, reasoning):
    """The three Rechead texts per sample: history x, CoT y, answer z (None = not parsed)."""
    budget = cfg.rechead.history_chars or cfg.data.max_history_chars  # fit short encoders (MiniLM: 256 tokens)
    x = [D.history_text(ds, s["history"], budget) for s in samples]
    return x, [r[0] for r in reasoning], [r[1] for r in reasoning]


def make_head(cfg, ds):
    if cfg.rechead.encoder == "toy":
        cfg.rechead.encoder = R.build_toy_encoder(ds.texts[1:], os.path.join(cfg.data.data_dir, "toy", "encoder"))
    return R.Rechead(cfg.rechead, ds.texts, DEVICE)


def score_fn(head, inputs, ground=False):
    """Full-ranking scores (b, N+1) for a chunk of samples tagged with their index "i".
    ground=True is the -I ablation: no Rechead, the answer (else the history) goes to the nearest
    items by cosine in the frozen encoder's space."""
    x, y, z = inputs

    @torch.no_grad()
    def fn(chunk):
        idx = [s["i"] for s in chunk]
        if ground:
            return R.ground_scores(head.encode_frozen([z[i] or x[i] for i in idx]), head.item_vecs)
        return head.scores(head.user_vecs([x[i] for i in idx], [y[i] for i in idx], [z[i] for i in idx]))
    return fn


def evaluate_split(head, inputs, samples, ground=False):
    """Full ranking (SPEC §4), sharded over ranks and gathered back exactly."""
    head.eval()
    tagged = shard([dict(s, i=i) for i, s in enumerate(samples)])
    return E.metrics(gather_ranks(E.full_ranking(score_fn(head, inputs, ground), tagged), len(samples)))


def gather_ranks(ranks, n):
    """Exact gather of strided per-rank ranks back into sample order (no double counting)."""
    if WORLD == 1:
        return ranks
    out = [None] * WORLD
    dist.all_gather_object(out, ranks.cpu().tolist())
    full = torch.empty(n, dtype=torch.long)
    for r, part in enumerate(out):
        full[r::WORLD] = torch.tensor(part, dtype=torch.long)
    return full


def embed_frozen(head, inputs):
    """Frozen encoders: embed every distinct text of every split once, up front."""
    if head.cfg.trainable:
        return
    texts = list(dict.fromkeys(t or "" for x, y, z in inputs for t in (*x, *y, *z)))
    step = 16 * head.cfg.encode_batch
    for i in tqdm(range(0, len(texts), step), desc="embedding texts (frozen encoder)", disable=not MAIN):
        head.encode_frozen(texts[i:i + step])


def train_rechead(cfg, ds, head, train_in, train, valid_in, valid, log, out):
    """Eq. 6 with k fresh uniform negatives per batch; early stopping on valid NDCG@10."""
    rc = cfg.rechead
    gen = torch.Generator().manual_seed(cfg.run.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=rc.lr)
    net = torch.nn.parallel.DistributedDataParallel(head) if WORLD > 1 else head
    if rc.batch_size % WORLD:
        raise SystemExit(f"error: --rechead.batch_size {rc.batch_size} does not divide by {WORLD} processes")
    x, y, z = train_in
    targets = torch.tensor([s["target"] for s in train])
    best, best_state, bad = -1.0, None, 0
    for epoch in range(rc.epochs):
        head.train()
        t0, losses = time.time(), []
        perm = torch.randperm(len(train), generator=gen)
        nb = math.ceil(len(train) / rc.batch_size)
        for b in tqdm(range(nb), desc=f"rechead epoch {epoch}", leave=False, disable=not MAIN):
            idx = perm[b * rc.batch_size:(b + 1) * rc.batch_size]
            neg = R.sample_negatives(targets[idx], ds.n_items, rc.negatives, gen)  # same on every rank
            idx, neg = idx[RANK::WORLD], neg[RANK::WORLD]
            h = net([x[i] for i in idx], [y[i] for i in idx], [z[i] for i in idx])   # (b, d)
            loss = R.rec_loss(h, targets[idx].to(DEVICE), neg.to(DEVICE), head.item_vecs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        m = evaluate_split(head, valid_in, valid)
        log({"stage": 1, "epoch": epoch, "loss": float(np.mean(losses)), "valid_ndcg@10": m["ndcg@10"],
             "valid_hr@10": m["hr@10"], "epoch_s": round(time.time() - t0, 2)})
        if m["ndcg@10"] > best:
            best, bad = m["ndcg@10"], 0
            best_state = copy.deepcopy(head.state_dict())
            if MAIN:
                save_rechead(head, cfg, os.path.join(out, "rechead.pt"))
        else:
            bad += 1
            if bad >= rc.patience:
                break
    head.load_state_dict(best_state)
    return head


def save_rechead(head, cfg, path):
    tmp = f"{path}.tmp"
    torch.save({"state": head.state_dict(), "config": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- Stage II: GRPO (eq. 7-11)
def reward_parts(cfg, ds, head, ref, tok, samples, texts, ro):
    """Every reward of section 2.2 for B = N*G completions of the N `samples` -> (r (B,), parts)."""
    rw, gsize = cfg.rewards, cfg.grpo.group_size
    B = len(texts)
    owner = [samples[i // gsize] for i in range(B)]
    reasoning = [split_reasoning(t) for t in texts]
    x, y, z = rechead_inputs(cfg, ds, owner, reasoning)
    parts = {k: torch.zeros(B) for k in ("fmt", "clean", "ndcg", "sim", "comp", "ent")}
    parts["fmt"] = torch.tensor([W.format_reward(t) for t in texts])
    parts["clean"] = torch.tensor([W.clean_reward(t, rw.kappa) for t in texts])
    with torch.no_grad():  # r_ndcg: target among k fixed negatives, ranked by the frozen Rechead
        h = head.user_vecs(x, y, z)                                                   # (B, d)
        cand = torch.stack([W.candidates(s["i"], s["target"], ds.n_items, rw.negatives, rw.seed)
                            for s in owner]).to(DEVICE)                               # (B, k+1)
        s = (h[:, None, :] * head.item_vecs[cand]).sum(-1)                            # (B, k+1)
    parts["ndcg"] = torch.tensor([W.ndcg_reward(W.candidate_rank(s[b])) for b in range(B)])
    cot = torch.stack([W.cot_token_mask(ro.tokens[b], ro.mask[b], tok) for b in range(B)])  # (B, T)
    parts["ent"] = torch.tensor([W.entropy_reward(ro.entropy[b][cot[b]].float().cpu()) for b in range(B)])
    # r_sim, r_comp: greedy summaries of y by the frozen reference model, one batched call; only
    # for completions whose total reward can be non-zero (eq. 7 gates everything on r_fmt)
    todo = [b for b in range(B) if y[b] and (parts["fmt"][b] > 0 or not rw.gate)]
    summaries = [""] * B
    if todo:
        scfg = dataclasses.replace(cfg.decode, greedy=True, max_new_tokens=rw.summary_max_new_tokens)
        out, _, _ = complete(ref, tok, [W.summary_messages(y[b]) for b in todo], scfg, thinking=False)
        for b, t in zip(todo, out):
            summaries[b] = W.parse_completion(t)[1] or t.split("</think>")[-1].strip()
        e_y = head.encode_frozen([y[b] for b in todo])
        e_s = head.encode_frozen([summaries[b] for b in todo])
        cos = torch.nn.functional.cosine_similarity(e_y, e_s, dim=-1).cpu()
        for j, b in enumerate(todo):
            n_y = len(tok(y[b], add_special_tokens=False).input_ids)
            n_s = len(tok(summaries[b], add_special_tokens=False).input_ids)
            parts["sim"][b] = W.similarity_reward(float(cos[j]), rw.delta)
            parts["comp"][b] = W.compression_reward(n_s, n_y)
    weights = rw.weights()
    r = torch.tensor([W.total_reward({k: float(v[b]) for k, v in parts.items()}, weights, rw.gate)
                      for b in range(B)])
    return r, parts, cot.sum(1).float(), summaries


def step_batch(step, n_train, per_step, seed):
    """Global sample indices for one GRPO step: epoch-wise permutations, a pure function of the
    step, so a resumed run sees exactly the prompts it would have seen."""
    return [int(_perm(n_train, seed + j // n_train)[j % n_train])
            for j in range(step * per_step, (step + 1) * per_step)]


@functools.lru_cache(maxsize=4)
def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def save_checkpoint(out, model, tok, opt, step, cfg):
    """<out>/ckpt: backbone (save_pretrained), optimizer, next step and every RNG state; swapped in
    whole, so a kill at any moment leaves the previous checkpoint intact."""
    final, tmp = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp")
    model.save_pretrained(tmp), tok.save_pretrained(tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if DEVICE.type == "cuda" else None}
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng, "config": dataclasses.asdict(cfg)},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        import shutil
        shutil.rmtree(final + ".old")


def load_checkpoint(out, model, opt):
    """Restore weights, optimizer and RNG from <out>/ckpt; returns the next step to run."""
    from transformers import AutoModelForCausalLM
    path = os.path.join(out, "ckpt")
    if not os.path.exists(os.path.join(path, "trainer_state.pt")):
        raise SystemExit(f"error: --resume but no checkpoint at {path}; drop --resume to start fresh")
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE).state_dict())
    st = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    opt.load_state_dict(st["optimizer"])
    random.setstate(st["rng"]["python"]), np.random.set_state(st["rng"]["numpy"])
    torch.set_rng_state(st["rng"]["torch"])
    if st["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(st["rng"]["cuda"])
    return st["step"]


def stage2(cfg, ds, head, model, tok, train, log, out):
    """Algorithm 1, lines 13-20: the frozen Rechead scores G rollouts per prompt; GRPO updates the LLM."""
    g = cfg.grpo
    if g.prompts_per_step % WORLD:
        raise SystemExit(f"error: --grpo.prompts_per_step {g.prompts_per_step} does not divide by {WORLD} processes")
    head.eval().requires_grad_(False)
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref and the summarizer
    if g.grad_checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    start = load_checkpoint(out, model, opt) if cfg.run.resume else 0
    roll_cfg = dataclasses.replace(cfg.decode, greedy=False, temperature=g.temperature, max_new_tokens=g.max_new_tokens)
    eos = eos_ids(model, tok)
    autocast = DTYPE if DEVICE.type == "cuda" else None
    for step in tqdm(range(start, g.steps), desc="grpo", initial=start, total=g.steps, disable=not MAIN):
        t0 = time.time()
        idx = shard(step_batch(step, len(train), g.prompts_per_step, cfg.run.seed))
        samples = [dict(train[i], i=i) for i in idx]
        p_ids, p_mask = encode_prompts(tok, [D.build_messages(ds, s, cfg.data) for s in samples], cfg.run.thinking)
        model.eval()
        ro = G.rollout(model, p_ids, p_mask, g.group_size, roll_cfg, eos, tok.pad_token_id)
        texts = tok.batch_decode(ro.tokens.masked_fill(~ro.mask, tok.pad_token_id), skip_special_tokens=True)
        r, parts, cot_len, summaries = reward_parts(cfg, ds, head, ref, tok, samples, texts, ro)
        adv = G.group_advantages(r, g.group_size, g.adv_eps)
        model.train()
        st = G.update(model, ref, opt, G.make_batch(p_ids, p_mask, ro, adv.to(DEVICE), g.group_size), g, autocast)
        rec = {"stage": 2, "step": step + 1, "reward": mean_all(r)}
        rec.update({k: mean_all(v) for k, v in parts.items()})
        rec.update({k: float(v) for k, v in st.items()})
        rec.update({"entropy": mean_all(ro.entropy[ro.mask]), "zero_std_groups": G.zero_spread_groups(r, g.group_size),
                    "len": mean_all(ro.mask.sum(1).float()), "cot_len": mean_all(cot_len),
                    "s": round(time.time() - t0, 2)})
        log(rec)
        if MAIN and g.sample_every and (step + 1) % g.sample_every == 0:
            tqdm.write(f"--- sample (step {step + 1}, reward {r[0]:.3f}, target: {ds.titles[samples[0]['target']]})\n"
                       f"{texts[0][:1500]}\n--- summary: {summaries[0][:300]}")
        if MAIN and ((step + 1) % g.save_every == 0 or step + 1 == g.steps):
            save_checkpoint(out, model, tok, opt, step + 1, cfg)
        if WORLD > 1:
            dist.barrier()
    return model


def mean_all(t):
    """Mean over every rank's values (the GRPO statistics are per-sample tensors)."""
    t = t.detach().float().reshape(-1).to(DEVICE)
    if WORLD > 1:
        sn = torch.stack([t.sum(), torch.tensor(float(t.numel()), device=DEVICE)])
        dist.all_reduce(sn)
        return float(sn[0] / sn[1])
    return float(t.mean()) if t.numel() else 0.0


# ----------------------------------------------------------------------------- evaluation and main
def plot_stage2(out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the Stage II plot")
        return
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"stage": 2' in l]
    keys = ["reward", "fmt", "clean", "ndcg", "sim", "comp", "ent", "kl", "entropy", "cot_len"]
    fig, axes = plt.subplots(2, 5, figsize=(18, 6))
    for ax, k in zip(axes.flat, keys):
        ax.plot([r["step"] for r in recs], [r[k] for r in recs])
        ax.set_title(k), ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "stage2.png"), dpi=80)


def init_distributed():
    if WORLD == 1:
        return
    backend = os.environ.get("RPOREC_BACKEND", "nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("error: NCCL needs CUDA GPUs, none found; set RPOREC_BACKEND=gloo for CPU processes")
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend)


def main(argv):
    cfg = parse_config(argv)
    init_distributed()
    seed_all(cfg.run.seed)
    out = cfg.run.out
    if MAIN:
        os.makedirs(out, exist_ok=True)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        save_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg))
    log = Logger(out)
    ds = D.load_dataset(cfg.data) if MAIN else None
    if WORLD > 1:
        dist.barrier()
        ds = ds or D.load_dataset(cfg.data)
    splits = split_samples(cfg, ds)
    model, tok = load_backbone(cfg, ds)
    if MAIN and cfg.run.model == "toy":
        print("toy preset: a tiny randomly initialised Qwen3 backbone and a random static-embedding encoder, "
              "both built in code (no download). Its reasoning is noise; the numbers only exercise the code.")
    mpath = os.path.join(out, "metrics.json")
    metrics = json.load(open(mpath)) if os.path.exists(mpath) else {}
    if cfg.run.stage in ("1", "both"):
        reasoning = {k: generate_reasoning(cfg, ds, model, tok, k, v) for k, v in splits.items()}
        inputs = {k: rechead_inputs(cfg, ds, splits[k], reasoning[k]) for k in splits}
        head = make_head(cfg, ds)
        embed_frozen(head, inputs.values())
        if cfg.run.ablate != "I":
            head = train_rechead(cfg, ds, head, inputs["train"], splits["train"], inputs["valid"],
                                 splits["valid"], log, out)
        metrics["stage1"] = {k: evaluate_split(head, inputs[k], splits[k], cfg.run.ablate == "I")
                             for k in ("valid", "test")}
        metrics["popularity"] = {"test": E.popularity_metrics(splits["train"], splits["test"], ds.n_items, E.EvalConfig())}
    else:
        if not cfg.run.init:
            raise SystemExit("error: --stage 2 needs --init RUN_FOLDER (a Stage I run holding rechead.pt)")
        head = make_head(cfg, ds)
        head.load_state_dict(torch.load(os.path.join(cfg.run.init, "rechead.pt"), weights_only=False)["state"])
    if MAIN:
        save_json(mpath, metrics)
    if cfg.run.stage in ("2", "both") and cfg.run.ablate not in ("I", "II"):
        if model is None:
            raise SystemExit("error: Stage II needs a backbone; pass --model (not none)")
        model = stage2(cfg, ds, head, model, tok, splits["train"], log, out)
        model.eval()
        metrics["stage2"] = {}
        for k in ("valid", "test"):
            rs = generate_reasoning(cfg, ds, model, tok, k, splits[k], os.path.join(out, "reasoning", f"{k}.jsonl"),
                                    desc=f"tuned reasoning {k}")
            metrics["stage2"][k] = evaluate_split(head, rechead_inputs(cfg, ds, splits[k], rs), splits[k])
        if MAIN:
            save_json(mpath, metrics)
            plot_stage2(out)
    if MAIN:
        for name, m in metrics.items():
            for split, v in m.items():
                print(f"{name:>10} {split:>5}  " + "  ".join(f"{k}={v[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@20")))
        print(f"run folder: {out}")
    if WORLD > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
