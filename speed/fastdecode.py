"""decode.py's "fast" backend: a compact decode forward for the Qwen3 / Qwen2 / Llama family over the
model's own weights (only QKV and gate/up are concatenated, to cut GEMM launches), a static KV cache,
and on CUDA the whole single-token step (all layers, final norm, lm_head, sampling, EOS bookkeeping)
replayed as one CUDA graph. HF decode at batch 64 is launch-bound (~1,800 tiny kernels per step).

It computes in DecodeConfig.dtype (bf16 on CUDA by default): fp32 master weights decode in bf16 through
copies refreshed from the masters before every batch.

Prompts are left-padded, so every row writes step t's K/V to the same cache column; rows differ only in
where their prompt starts (a per-row start and a shared column tensor, both updated in place, tell the
graph). Attention covers the cache up to the next multiple of kv_bucket columns, so there is one graph
per (batch size, bucket). The decode step has two kernel sets (DecodeConfig.kernels): "torch" builds an
attention mask from start and col for SDPA and runs RoPE, the norms and SiLU as torch ops; "triton"
(tritondecode.py) reads start and col inside its kernels, so attention touches only the columns a row uses,
and fuses the pointwise work into two kernels per layer. "torch" is the reference the tests hold the
Triton kernels to; the prefill always runs on torch.

Decoders (KV cache + graphs) are cached per model: at most KEEP_DECODERS, least recently used evicted,
each with a multiple of 8 rows; a smaller batch reuses a larger decoder, padded with copies of row 0
that are marked done at once and sliced off the outputs.

Sampling reads a caller-filled buffer, so no RNG runs inside a graph: Exp(1) noise (B, V) drawn from a generator
before each step, or, with row seeds, every row's uniforms for all steps (B, max_len), hashed once per batch
(sampling.row_uniforms), of which the graph reads the column of its step.

Callers go through decode.generate. The sampling rules and the Rollout type are plumbing/sampling.py's, which
both backends import; decode imports this module, never the other way round.
"""
import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from plumbing.sampling import Rollout, choose_tokens, choose_tokens_seeded, row_uniforms, token_stats

FAST_ARCHS = ("qwen3", "qwen2", "llama")  # pre-norm, SwiGLU, RoPE, GQA; qwen3 adds q/k RMSNorm
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq independent of sequence length
DTYPES = ("auto", "float32", "bfloat16", "float16")  # DecodeConfig.dtype choices
KERNELS = ("auto", "triton", "torch")  # DecodeConfig.kernels choices
PROGRAMS_PER_SM = 4  # split-KV attention: aim for this many programs per multiprocessor
KEEP_DECODERS = 2  # per model; each holds a KV cache (GBs at rollout sizes) and its CUDA graphs
_DECODERS = weakref.WeakKeyDictionary()  # model -> [_FastDecoder], least recently used first


def fast_unsupported(model):
    """Why the fast backend cannot run `model`, or None if it can."""
    c = model.config
    kind = getattr(c, "model_type", type(model).__name__)
    params = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    rope = params.get("rope_type", params.get("type", "default"))
    if kind not in FAST_ARCHS:
        return f"model_type {kind!r} is not one of {FAST_ARCHS}"
    if getattr(c, "use_sliding_window", False) or getattr(c, "hidden_act", "silu") != "silu":
        return f"{kind} with sliding-window attention or a non-SiLU MLP"
    if rope not in STATIC_ROPE:
        return f"{kind} with rope_type {rope!r}"
    return None


def graphs_available(device):
    """CUDA graphs exist on CUDA only (tests/test_graph_replay.py emulates them on CPU)."""
    return device.type == "cuda"


def triton_kernels():
    """tritondecode.py, or None when triton does not import (it ships with CUDA builds of torch)."""
    try:
        from speed import tritondecode
    except ImportError:
        return None
    return tritondecode


def use_triton(model, cfg, device):
    """Whether the decode step runs tritondecode.py's kernels (DecodeConfig.kernels); a ValueError naming the fix
    when "triton" is asked for and cannot run."""
    if cfg.kernels == "torch":
        return False
    c = model.config
    K = triton_kernels()
    if K is None:
        why = "triton does not import"
    else:
        why = K.supports(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                         c.num_attention_heads // c.num_key_value_heads)
        if why is None and device.type != "cuda" and not K.INTERPRETED:
            why = "on a CPU Triton kernels run only under TRITON_INTERPRET=1 (the tests)"
    if cfg.kernels == "triton" and why:
        raise ValueError(f"decode kernels 'triton' cannot run here: {why}; use --decode.kernels torch")
    return why is None and (cfg.kernels == "triton" or device.type == "cuda")


def _programs(device):
    """Programs the split-KV attention aims to launch: PROGRAMS_PER_SM per multiprocessor (1 on a CPU)."""
    if device.type != "cuda":
        return 1
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _swiglu(gu):
    """silu(gate) * up for gu = [gate | up] (..., 2I)."""
    g, u = gu.chunk(2, -1)
    return F.silu(g) * u


def clear_fast_cache(model=None):
    """Free the fast backend's KV caches and CUDA graphs (for `model`, or all)."""
    if model is None:
        _DECODERS.clear()
    else:
        _DECODERS.pop(model, None)


def _residual_linear(h, x, w, b):
    """h + x @ w.T (+ b): one GEMM with the residual added in its epilogue."""
    out = torch.addmm(h.flatten(0, -2), x.flatten(0, -2), w.t()).view_as(h)
    return out if b is None else out + b


def _signature(model, dtype):
    """Identity of the parameter storage a decoder (and its graphs) points into, and its compute dtype."""
    return dtype, tuple((p.data_ptr(), p.dtype, p.shape) for p in model.parameters())


class _FastDecoder:
    """Static KV cache, decode-dtype weights and step state for one (model, batch size, dtype); graphs
    per (attended length, sampling mode). Everything a graph reads or writes lives here, updated in place."""

    def __init__(self, model, batch, max_len, dtype=None):
        c = model.config
        m = model.model
        self.H = c.num_attention_heads
        self.Hkv = c.num_key_value_heads
        self.hid = c.hidden_size
        self.D = getattr(c, "head_dim", None) or self.hid // self.H
        self.eps = c.rms_norm_eps
        self.max_len = max_len
        self.batch = batch
        self.dtype = dtype or m.embed_tokens.weight.dtype  # None: the weights' dtype
        self.signature = _signature(model, self.dtype)
        self.copies = []  # (decode-dtype copy, its sources), refreshed by reset()
        self.embed = self._w(m.embed_tokens.weight)
        self.norm = self._w(m.norm.weight)
        tied = model.lm_head.weight is m.embed_tokens.weight
        self.head = self.embed if tied else self._w(model.lm_head.weight)
        self.head_b = self._w(model.lm_head.bias)
        self.layers = [self._layer_weights(layer) for layer in m.layers]
        self._rope_tables(model, max_len)
        self._state_buffers(batch, max_len)
        self.graphs = {}
        self.programs = _programs(self.embed.device)
        self.pool = torch.cuda.graph_pool_handle() if self.embed.is_cuda else None  # shared by all graphs

    def _layer_weights(self, layer):
        a = layer.self_attn
        f = layer.mlp
        qk_norm = None
        if hasattr(a, "q_norm"):
            qk_norm = [a.q_norm.weight.expand(self.H, -1), a.k_norm.weight.expand(self.Hkv, -1)]
        return SimpleNamespace(
            ln1=self._w(layer.input_layernorm.weight), ln2=self._w(layer.post_attention_layernorm.weight),
            qkv=self._w([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            qkv_b=self._w([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            qk_norm=self._w(qk_norm),  # (H + Hkv, D): one multiply scales q and k heads
            o=self._w(a.o_proj.weight), o_b=self._w(a.o_proj.bias),
            down=self._w(f.down_proj.weight), down_b=self._w(f.down_proj.bias),
            gu=self._w([f.gate_proj.weight, f.up_proj.weight]),
            gu_b=self._w([f.gate_proj.bias, f.up_proj.bias]))

    def _rope_tables(self, model, max_len):
        """cos and sign-folded sin (max_len, D) in the decode dtype."""
        c = model.config
        dev = self.embed.device
        rot = getattr(model.model, "rotary_emb", None)
        if rot is not None and hasattr(rot, "inv_freq"):  # the model's own buffer: exactly what HF uses
            inv_freq = rot.inv_freq.float()
            scale = float(getattr(rot, "attention_scaling", 1.0))
        else:
            # transformers 5 keeps theta in config.rope_parameters, 4.x in config.rope_theta
            theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
            inv_freq = 1.0 / theta ** (torch.arange(0, self.D, 2, device=dev).float() / self.D)
            scale = 1.0
        freqs = torch.arange(max_len, device=dev).float()[:, None] * inv_freq  # (max_len, D/2)
        emb = torch.cat([freqs, freqs], -1)  # (max_len, D), HF's half-split layout
        self.cos = (emb.cos() * scale).to(self.dtype)
        sign = torch.cat([-inv_freq.new_ones(self.D // 2), inv_freq.new_ones(self.D // 2)])  # (D,)
        self.sin = (emb.sin() * scale * sign).to(self.dtype)  # rotate_half(x) * sin == roll(x, D/2) * sign * sin

    def _state_buffers(self, batch, max_len):
        """KV cache, step state and outputs: fixed addresses that the graphs read and write."""
        dev = self.embed.device
        long = dict(device=dev, dtype=torch.long)
        self.cache = torch.zeros(len(self.layers), 2, batch, self.Hkv, max_len, self.D, device=dev, dtype=self.dtype)
        self.cols = torch.arange(max_len, device=dev)
        self.tok = torch.zeros(batch, **long)  # (B,) token fed at the next step
        self.start = torch.zeros(batch, **long)  # (B,) first real prompt column
        self.col = torch.zeros(1, **long)  # cache column the next step writes
        self.step = torch.zeros(1, **long)  # output column the next step writes
        self.pad = torch.zeros(1, **long)
        self.eos = torch.full((8,), -1, **long)  # EOS ids, -1 = unused slot
        self.done = torch.zeros(batch, device=dev, dtype=torch.bool)
        self.noise = torch.ones(batch, self.head.shape[0], device=dev)  # (B, V) Exp(1) draws, unseeded sampling
        self.uniform = torch.zeros(batch, max_len, device=dev, dtype=torch.float64)  # (B, max_len) seeded sampling:
        # each row's uniform per output column, sampling.row_uniforms
        self.seeded = False  # this batch samples from self.uniform (a Python value: part of a graph's key)
        self.out_tok = torch.zeros(batch, max_len, **long)  # (B, max_len) columns = decode steps
        self.out_mask = torch.zeros(batch, max_len, device=dev, dtype=torch.bool)
        self.out_logp = torch.zeros(batch, max_len, device=dev)  # (B, max_len) float32
        self.out_ent = torch.zeros(batch, max_len, device=dev)

    def _w(self, srcs):
        """One weight (a tensor) or several concatenated (a list) in the decode dtype: the tensor itself
        if it already has that dtype, else a copy that reset() refreshes. None if any is None."""
        srcs = srcs if isinstance(srcs, list) or srcs is None else [srcs]
        if srcs is None or any(s is None for s in srcs):
            return None
        if len(srcs) == 1 and srcs[0].dtype == self.dtype:
            return srcs[0]
        dst = torch.cat(srcs).to(self.dtype)
        self.copies.append((dst, srcs))
        return dst

    def reset(self, input_ids, attention_mask, eos_ids, pad_id):
        """Load a new batch; refresh the weight copies (the optimizer updates the originals in place)."""
        for dst, srcs in self.copies:
            torch.cat(srcs, out=dst)  # casts to dst's dtype
        self.start.copy_((attention_mask == 0).sum(1))
        self.col.fill_(input_ids.shape[1])
        self.step.zero_()
        self.done.zero_()
        self.pad.fill_(pad_id)
        self.eos.fill_(-1)
        self.eos[:len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.long)

    def _layers(self, h, attend, act=_swiglu):
        """Pre-norm decoder layers on h (N, S, hid). attend(i, w, qkv) takes layer i's (N, S, (H+2Hkv)D)
        projections through q/k norm, RoPE, the cache and attention to (N, S, H * D); act is the MLP's."""
        for i, w in enumerate(self.layers):
            qkv = F.linear(F.rms_norm(h, (self.hid,), w.ln1, self.eps), w.qkv, w.qkv_b)  # (N, S, (H+2Hkv)D)
            h = _residual_linear(h, attend(i, w, qkv), w.o, w.o_b)
            gu = F.linear(F.rms_norm(h, (self.hid,), w.ln2, self.eps), w.gu, w.gu_b)  # (N, S, 2I)
            h = _residual_linear(h, act(gu), w.down, w.down_b)
        return h

    def _rope(self, w, qkv, cos, sin):
        """q (N, S, H, D), k and v (N, S, Hkv, D) from qkv, with q/k norm and RoPE (cos, sin broadcast to
        (N, S, 1, D)); tritondecode.rope_qk_cache does this for one token per row in one kernel."""
        H, Hkv, D = self.H, self.Hkv, self.D
        qk = qkv[..., :(H + Hkv) * D].unflatten(-1, (H + Hkv, D))  # (N, S, H + Hkv, D)
        if w.qk_norm is not None:
            qk = F.rms_norm(qk, (D,), None, self.eps) * w.qk_norm
        qk = qk * cos + qk.roll(D // 2, -1) * sin
        return qk[..., :H, :], qk[..., H:, :], qkv[..., (H + Hkv) * D:].unflatten(-1, (Hkv, D))

    def _logits(self, h):
        """(N, hid) -> (N, V) float32, as HF: lm_head in the model dtype, then upcast."""
        return F.linear(F.rms_norm(h, (self.hid,), self.norm, self.eps), self.head, self.head_b).float()

    def prefill(self, input_ids, attention_mask, rows_per_chunk):
        """Eager forward over the left-padded prompts, writing K/V to cache columns [0, P)."""
        B, P = input_ids.shape
        G = self.H // self.Hkv
        last = []
        causal = torch.ones(P, P, device=input_ids.device, dtype=torch.bool).tril()  # (P, P)
        eye = torch.eye(P, device=input_ids.device, dtype=torch.bool)
        for r in range(0, B, rows_per_chunk):
            rows = slice(r, min(B, r + rows_per_chunk))
            pos = (self.cols[:P] - self.start[rows, None]).clamp_min(0)  # (N, P), HF: cumsum(mask) - 1
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (N, P, 1, D)
            # pad queries see themselves so no row is fully masked (no NaN reaches the cache)
            mask = (causal & attention_mask[rows, None, :].bool()) | eye  # (N, P, P)

            def attend(i, w, qkv):
                q, k, v = self._rope(w, qkv, cos, sin)
                k = k.transpose(1, 2)  # (N, Hkv, P, D)
                v = v.transpose(1, 2)
                self.cache[i, 0, rows, :, :P] = k
                self.cache[i, 1, rows, :, :P] = v
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(G, 1),
                                                   v.repeat_interleave(G, 1), attn_mask=mask[:, None])
                return o.transpose(1, 2).flatten(2)  # (N, P, H * D)

            h = self._layers(F.embedding(input_ids[rows], self.embed), attend)
            last.append(h[:, -1])
        return self._logits(torch.cat(last))

    def emit(self, logits, cfg, stats):
        """Choose, record at column `step`, update EOS state, feed back. Graph-safe: no host syncs. Samples from
        each row's uniform of this step (self.uniform) when the batch is seeded, else from the noise buffer."""
        if self.seeded:
            chosen = choose_tokens_seeded(logits, cfg, self.uniform.index_select(1, self.step)[:, 0])
        else:
            chosen = choose_tokens(logits, cfg, self.noise)
        nxt = torch.where(self.done, self.pad, chosen)  # (B,)
        self.out_tok.index_copy_(1, self.step, nxt[:, None])
        self.out_mask.index_copy_(1, self.step, ~self.done[:, None])
        if stats:
            logp, ent = token_stats(logits, cfg.temperature)
            self.out_logp.index_copy_(1, self.step, logp.gather(1, nxt[:, None]))
            self.out_ent.index_copy_(1, self.step, ent[:, None])
        self.done |= (nxt[:, None] == self.eos).any(1)
        self.tok.copy_(nxt)
        self.step += 1

    def _attend_torch(self, kv_len):
        """The reference decode attention: q/k norm and RoPE as torch ops, index_copy_ into the cache, SDPA
        over the first kv_len columns under a mask built from start and col."""
        B, G = self.tok.shape[0], self.H // self.Hkv
        pos = self.col - self.start  # (B,) RoPE position = real tokens before this one
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (B, 1, 1, D)
        valid = (self.cols[:kv_len] >= self.start[:, None]) & (self.cols[:kv_len] <= self.col)  # (B, kv_len)
        mask = torch.zeros(B, 1, 1, kv_len, device=valid.device, dtype=self.cache.dtype)
        mask = mask.masked_fill(~valid[:, None, None], float("-inf"))  # additive, broadcast over heads

        def attend(i, w, qkv):
            q, k, v = self._rope(w, qkv, cos, sin)
            kc = self.cache[i, 0]  # (B, Hkv, max_len, D)
            vc = self.cache[i, 1]
            kc.index_copy_(2, self.col, k.transpose(1, 2))
            vc.index_copy_(2, self.col, v.transpose(1, 2))
            # GQA without copying K/V: the G query heads of a group act as G query rows
            o = F.scaled_dot_product_attention(q.reshape(B, self.Hkv, G, self.D), kc[:, :, :kv_len],
                                               vc[:, :, :kv_len], attn_mask=mask)  # (B, Hkv, G, D)
            return o.reshape(B, 1, self.H * self.D)
        return attend

    def _attend_triton(self, kv_len):
        """The same attention through tritondecode.py: one fused kernel for q/k norm, RoPE and the cache write,
        then split-KV attention over the columns [start_b, col] only."""
        K = triton_kernels()
        B = self.tok.shape[0]
        splits = K.n_splits(B * self.Hkv, kv_len, self.programs)

        def attend(i, w, qkv):
            q = K.rope_qk_cache(qkv[:, 0], w.qk_norm, self.cos, self.sin, self.start, self.col, self.cache, i,
                                self.eps)  # (B, H, D); k and v are in the cache at column col
            return K.decode_attention(q, self.cache, i, self.start, self.col, kv_len, splits).view(B, 1, -1)
        return attend

    def decode_step(self, kv_len, cfg, stats, triton=False):
        """Feed `tok` at cache column `col` (same for every row: prompts are left-padded), attend
        over columns [start_b, col] of the first kv_len, then emit. triton: tritondecode.py's kernels."""
        h = F.embedding(self.tok[:, None], self.embed)  # (B, 1, hid)
        if triton:
            silu_mul = triton_kernels().silu_mul
            h = self._layers(h, self._attend_triton(kv_len), lambda gu: silu_mul(gu[:, 0])[:, None])
        else:
            h = self._layers(h, self._attend_torch(kv_len))
        self.emit(self._logits(h[:, 0]), cfg, stats)
        self.col += 1

    def run_step(self, kv_len, cfg, stats, use_graph, triton=False):
        """One decode step, eager or as a CUDA graph. A key's first step runs eagerly on a side stream
        (it doubles as the warm-up, and compiles the Triton kernels) and is then captured (capture records,
        it does not execute)."""
        if not use_graph:
            return self.decode_step(kv_len, cfg, stats, triton)
        key = (kv_len, cfg.greedy, cfg.temperature, cfg.top_k, cfg.top_p, stats, triton, self.seeded)
        if key in self.graphs:
            return self.graphs[key].replay()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decode_step(kv_len, cfg, stats, triton)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.decode_step(kv_len, cfg, stats, triton)
        except RuntimeError as e:  # e.g. an op this torch build cannot capture
            raise RuntimeError(f"CUDA graph capture of the decode step failed: {e}\nThe step itself ran; rerun "
                               "with --decode.cuda_graph false (eager fast backend) or --decode.backend hf") from e
        self.graphs[key] = graph


def _check(model, cfg, eos_ids):
    """A clear ValueError for anything the fast backend cannot do."""
    reason = fast_unsupported(model)
    if reason is not None:
        raise ValueError(f"decode backend 'fast' does not support {reason}; use --decode.backend hf")
    if cfg.kv_bucket < 8 or cfg.kv_bucket % 8 or cfg.sync_every < 1 or cfg.prefill_rows < 1:
        raise ValueError(f"kv_bucket={cfg.kv_bucket} must be a positive multiple of 8, sync_every="
                         f"{cfg.sync_every} and prefill_rows={cfg.prefill_rows} >= 1; fix the DecodeConfig")
    if len(eos_ids) > 8:
        raise ValueError(f"at most 8 EOS ids are supported, got {len(eos_ids)}; pass the ones the model emits")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown decode dtype {cfg.dtype!r}; use one of {DTYPES}")
    if cfg.kernels not in KERNELS:
        raise ValueError(f"unknown decode kernels {cfg.kernels!r}; use one of {KERNELS}")


def _decoder(model, batch, max_len, dtype):
    """The smallest cached decoder that fits, else a new one (evicting the least recently used)."""
    decoders = _DECODERS.setdefault(model, [])
    sig = _signature(model, dtype)
    fits = [d for d in decoders if d.batch >= batch and d.max_len >= max_len and d.signature == sig]
    dec = min(fits, key=lambda d: d.batch, default=None)
    if dec is None:
        del decoders[:max(0, len(decoders) + 1 - KEEP_DECODERS)]  # evict before allocating
        dec = _FastDecoder(model, -(-batch // 8) * 8, max_len, dtype)
    else:
        decoders.remove(dec)
    decoders.append(dec)
    return dec


def generate_fast(model, input_ids, attention_mask, cfg, eos_ids, pad_id, stats, generator, row_seeds=None):
    """decode.generate's "fast" backend, on inputs decode.generate has checked; a Rollout as the hf backend's."""
    _check(model, cfg, eos_ids)
    triton = use_triton(model, cfg, input_ids.device)
    weights = model.model.embed_tokens.weight
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
    else:
        dtype = torch.bfloat16 if weights.is_cuda else weights.dtype
    B, P = input_ids.shape
    align = cfg.kv_bucket  # multiples of 8 keep the attention mask aligned for fused kernels
    dec = _decoder(model, B, -(-(P + cfg.max_new_tokens - 1) // align) * align, dtype)
    if dec.batch > B:  # pad with copies of row 0; real rows never see them (attention is per row)
        input_ids = torch.cat([input_ids, input_ids[:1].expand(dec.batch - B, -1)])
        attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(dec.batch - B, -1)])
    use_graph = cfg.cuda_graph and graphs_available(input_ids.device)
    dec.reset(input_ids, attention_mask, eos_ids, pad_id)
    dec.done[B:] = True  # padding rows emit pad_id and never hold up the early stop
    dec.seeded = row_seeds is not None and not cfg.greedy
    if dec.seeded:  # every step's uniforms up front: the graph reads its column, the hash runs once per batch
        dec.uniform[:B, :cfg.max_new_tokens] = row_uniforms(row_seeds, torch.arange(cfg.max_new_tokens,
                                                                                    device=input_ids.device))
    elif not cfg.greedy:  # real rows only: a seed gives the same samples whatever decoder is reused
        dec.noise[:B].exponential_(generator=generator)
    dec.emit(dec.prefill(input_ids, attention_mask, cfg.prefill_rows), cfg, stats)
    for t in range(1, cfg.max_new_tokens):
        if t % cfg.sync_every == 0 and bool(dec.done.all()):
            break
        if not (cfg.greedy or dec.seeded):
            dec.noise[:B].exponential_(generator=generator)
        dec.run_step(min(dec.max_len, -(-(P + t) // align) * align), cfg, stats, use_graph, triton)
    mask = dec.out_mask[:B, :int(dec.step)]
    T = int(mask.sum(1).max())  # rows finished between two checks only add all-pad columns
    mask = mask[:, :T].clone()
    tokens = dec.out_tok[:B, :T].clone()
    if not stats:
        return Rollout(tokens, mask, None, None)
    return Rollout(tokens, mask, dec.out_logp[:B, :T].masked_fill(~mask, 0.0),
                   dec.out_ent[:B, :T].masked_fill(~mask, 0.0))
