"""LabGPT: the decoder-only transformer every lab studies (GPT-2's architecture, small).

Read it top to bottom: config, attention backends, the block, the model, the KV cache,
generation, checkpoints, and a loader for real GPT-2 weights. Every technique in the kit
plugs in somewhere here: attention backends (sparse, Triton), linear layers (quantized,
pruned, low-rank) swapped by module replacement, hidden states of every layer (early
exit), ``inputs_embeds`` (soft prompts) and the cache (serving).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._args import check_int
from .memory import load_safetensors, save_safetensors


@dataclass
class GPTConfig:
    """Shape of a LabGPT. Defaults are the `tiny` teacher."""

    vocab_size: int = 128  # the character alphabet (~120) rounded up to a multiple of 64
    block_size: int = 512  # context length in tokens: 8 demonstrations + a query fit
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 192  # head size 32
    dropout: float = 0.0  # the corpus is generated and endless: no overfitting to fight
    bias: bool = True  # GPT-2 has biases; keeping them lets load_hf_gpt2 be exact
    attention: str = "sdpa"  # a name in ATTENTION_BACKENDS

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(f"GPTConfig.{name}", getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.attention, str):
            raise ValueError(f"GPTConfig.attention must be the name of a backend (a str), got {self.attention!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# Named sizes. `nano` is for tests; `tiny` is the teacher shipped in data/; `student` has
# half its layers (the distillation and speculative-decoding labs use it); `gpt2` is the
# GPT-2-small shape, for GPUs (no checkpoint ships: train it or load real weights).
CONFIGS: dict[str, GPTConfig] = {
    "nano": GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32),
    "tiny": GPTConfig(),
    "student": GPTConfig(n_layer=3),
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """A copy of a named config, with fields overridden."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; allowed: {sorted(CONFIGS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {unknown}; allowed: {[f.name for f in fields(GPTConfig)]}")
    return GPTConfig(**{**asdict(CONFIGS[name]), **overrides})


# ---------------------------------------------------------------------------------------
# Attention backends. Each takes q (B, nh, T, hs), k and v (B, nh, S, hs), where query i
# sits at absolute position q_offset + i and key j at position j, and returns causal
# attention (B, nh, T, hs). Labs register more (sparse, Triton) with register_attention.
# ---------------------------------------------------------------------------------------
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
ATTENTION_BACKENDS: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``GPTConfig.attention = name``."""
    ATTENTION_BACKENDS[name] = fn


def causal_mask(T: int, S: int, q_offset: int, device=None) -> torch.Tensor:
    """(T, S) boolean mask, True where query i (position q_offset+i) may see key j."""
    q_pos = torch.arange(T, device=device).unsqueeze(1) + q_offset
    return torch.arange(S, device=device).unsqueeze(0) <= q_pos


def manual_attention(q, k, v, q_offset: int = 0):
    """softmax(q k^T / sqrt(d) + mask) v, written out: the version to read."""
    T, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
    att = att.masked_fill(~causal_mask(T, S, q_offset, q.device), float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v  # (B, nh, T, hs)


def sdpa_attention(q, k, v, q_offset: int = 0):
    """PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels)."""
    T, S = q.size(-2), k.size(-2)
    if q_offset == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if T == 1 and S == q_offset + 1:  # one new token after the cache sees every key: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    # several new tokens after a cache (speculative decoding's verify pass): every layer needs the same
    # mask, so it is built once per shape rather than once per layer
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_shared_causal_mask(T, S, q_offset, q.device))


@functools.lru_cache(maxsize=8)
def _shared_causal_mask(T: int, S: int, q_offset: int, device) -> torch.Tensor:
    return causal_mask(T, S, q_offset, device)


register_attention("manual", manual_attention)
register_attention("sdpa", sdpa_attention)


def _check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must index the embedding table. Checked on CPU tensors only: on a GPU the check would
    wait for the device at every call (and break CUDA-graph capture); there the embedding asserts."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} must be token ids in 0..{vocab_size - 1} (this model's vocabulary), got values in "
                         f"{lo}..{hi}: was the text encoded with this model's tokenizer?")  # fmt: skip


def check_stop_token(stop_token, vocab_size: int) -> None:
    """None, or a token id of this vocabulary (not a character: ``tokenizer.encode(ch)[0]`` gives its id)."""
    if stop_token is not None and (isinstance(stop_token, bool) or not isinstance(stop_token, int)
                                   or not 0 <= stop_token < vocab_size):  # fmt: skip
        raise ValueError(f"stop_token must be None or a token id in 0..{vocab_size - 1} (e.g. tokenizer.newline_id), "
                         f"got {stop_token!r}")


def _check_cache_fits(cache, config, batch: int, dtype: torch.dtype) -> None:
    k = getattr(cache, "all_k", None)
    if k is None:  # another cache class (serving's slot cache): it checks itself
        return
    want = (config.n_layer, batch, config.n_head, config.block_size, config.head_size)
    if tuple(k.shape) != want or k.dtype != dtype:
        def says(shape) -> str:
            return f"{shape[0]} layers x batch {shape[1]} x {shape[2]} heads x {shape[3]} positions x head size {shape[4]}"

        raise ValueError(f"cache holds {says(k.shape)} in {k.dtype}; this call needs {says(want)} in {dtype}: make it "
                         f"with this model's new_cache({batch})")  # fmt: skip


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated.

    Preallocating (B, nh, block_size, hs) per layer makes each decode step write one slot
    instead of concatenating (which would copy the whole cache every step: O(n^2) bytes).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device=None, dtype=torch.float32) -> None:
        check_int("batch_size", batch_size)
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_size)
        # one tensor for all layers, seen as a list of per-layer views: code that writes several
        # layers at once (early exit's filled layers) does it in one copy
        self.all_k = torch.zeros(shape, device=device, dtype=dtype)
        self.all_v = torch.zeros(shape, device=device, dtype=dtype)
        self.k = [self.all_k[layer] for layer in range(config.n_layer)]
        self.v = [self.all_v[layer] for layer in range(config.n_layer)]
        self.pos = 0  # number of positions filled (all layers agree once a forward ends)
        self.block_size = config.block_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store k, v (B, nh, T, hs) at positions start..start+T-1; return all keys/values so far."""
        end = start + k.size(-2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def crop(self, length: int) -> None:
        """Forget positions >= length (speculative decoding rolls back rejected tokens)."""
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= self.pos:
            raise ValueError(f"crop length must be in 0..{self.pos}, got {length}")
        self.pos = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection (as in GPT-2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.attention = config.attention

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, nh, start+T, hs)
        y = ATTENTION_BACKENDS[self.attention](q, k, v, start)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.dropout(self.c_proj(y))


class MLP(nn.Module):
    """Two linears with a GELU between; 4x wider inside, as in GPT-2."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer, start)
        return x + self.mlp(self.ln_2(x))


class LabGPT(nn.Module):
    """The model under study: token + position embeddings, n blocks, a final norm, a tied head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig (e.g. get_config('nano')), got {type(config).__name__} "
                             f"{config!r}")  # fmt: skip
        if config.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention {config.attention!r}; allowed: {sorted(ATTENTION_BACKENDS)}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (as nanoGPT counts)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def set_attention(self, name: str) -> LabGPT:
        """Switch every layer to the attention backend ``name``."""
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention {name!r}; allowed: {sorted(ATTENTION_BACKENDS)}")
        self.config.attention = name
        for block in self.transformer.h:
            block.attn.attention = name
        return self

    def forward(
        self,
        idx: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """Token ids (B, T), or token embeddings (B, T, C), to logits (B, T, vocab).

        With ``cache``, the T tokens continue the cached sequence and are appended to it.
        With ``return_hidden``, also returns the residual stream after every block (a list
        of n_layer tensors (B, T, C), before the final norm): early exit reads them.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds")
        if idx is not None:
            if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
                raise ValueError(f"idx must be a (batch, time) long tensor, got "
                                 f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__} "
                                 f"{getattr(idx, 'dtype', '')}")  # fmt: skip
            _check_token_ids("idx", idx, self.config.vocab_size)
            x = self.transformer.wte(idx)  # (B, T, C)
        else:
            C, dtype = self.config.n_embd, self.transformer.wte.weight.dtype
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != C \
                    or inputs_embeds.dtype != dtype:  # fmt: skip
                raise ValueError(f"inputs_embeds must be a (batch, time, {C}) {dtype} tensor, got "
                                 f"{tuple(getattr(inputs_embeds, 'shape', ()))} {getattr(inputs_embeds, 'dtype', '')}")  # fmt: skip
            x = inputs_embeds
        B, T, _ = x.shape
        if T < 1:
            raise ValueError("the sequence is empty: pass at least one token (allowed lengths 1..block_size)")
        if cache is not None:
            _check_cache_fits(cache, self.config, B, x.dtype)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the context: block_size is "
                f"{self.config.block_size} (allowed lengths 1..{self.config.block_size})"
            )
        pos = torch.arange(start, start + T, device=x.device)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        hidden = []
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, start)
            if return_hidden:
                hidden.append(x)
        if cache is not None:
            cache.pos = start + T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        return (logits, hidden) if return_hidden else logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; targets of -1 are ignored."""
        if not isinstance(targets, torch.Tensor) or targets.shape != getattr(idx, "shape", None):
            raise ValueError(f"targets must have idx's shape {tuple(getattr(idx, 'shape', ()))}, got "
                             f"{tuple(getattr(targets, 'shape', ())) or type(targets).__name__}")  # fmt: skip
        kept = targets[targets != -1]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= self.config.vocab_size):
            raise ValueError(f"targets must be token ids in 0..{self.config.vocab_size - 1} (or -1 to ignore), got "
                             f"values in {int(kept.min())}..{int(kept.max())}")  # fmt: skip
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    def new_cache(self, batch_size: int = 1) -> KVCache:
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` (B, T) by ``max_new_tokens``; returns (B, T + new).

        ``temperature=0`` is greedy decoding. With ``use_cache`` the prompt runs once and
        each new token costs one position; without it the whole sequence is re-run every
        step (the O(n^2) baseline of the serving lab). ``stop_token`` ends generation once
        every row has produced it.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")  # fmt: skip
        check_int("max_new_tokens", max_new_tokens, 0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0 \
                or math.isinf(temperature):  # fmt: skip
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                                  or not 1 <= top_k <= self.config.vocab_size):  # fmt: skip
            raise ValueError(f"top_k must be an int in 1..{self.config.vocab_size} or None, got {top_k!r}")
        check_stop_token(stop_token, self.config.vocab_size)
        total = idx.size(1) + max_new_tokens
        if idx.size(1) < 1 or total > self.config.block_size:
            raise ValueError(
                f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"context: block_size is {self.config.block_size} (allowed total 1..{self.config.block_size})"
            )
        cache = self.new_cache(idx.size(0)) if use_cache else None
        logits = self(idx, cache=cache)[:, -1, :]
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
            if stop_token is not None:
                done |= next_token.squeeze(1) == stop_token
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = (self(next_token, cache=cache) if use_cache else self(idx))[:, -1, :]
        return idx


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, generator=None) -> torch.Tensor:
    """Pick the next token from (B, vocab) logits: argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


def replace_linears(model: nn.Module, factory: Callable[[str, nn.Linear], nn.Module], only=None) -> nn.Module:
    """Swap every nn.Linear (except the tied head) for ``factory(name, linear)``, in place.

    ``only`` optionally filters by qualified name. Quantization, pruning and low-rank labs
    all use this: the technique is a new module with the same call signature.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head" and (only is None or only(name))
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(name, module))
    return model


# ---------------------------------------------------------------------------------------
# Checkpoints: safetensors (no pickle), with the config in the header's metadata.
# ---------------------------------------------------------------------------------------
def save_checkpoint(model: LabGPT, path, metadata: dict[str, str] | None = None) -> None:
    """Write weights and config to a safetensors file (the tied head is stored once)."""
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    meta = {"format": "labkit-gpt", "config": json.dumps(asdict(model.config))}
    meta.update(metadata or {})
    save_safetensors(state, path, meta)


def load_checkpoint(path, device=None, mmap: bool = True) -> LabGPT:
    """Rebuild a LabGPT from a file written by ``save_checkpoint``; a bad file is a ValueError."""
    tensors, meta = load_safetensors(path, mmap=mmap, with_metadata=True)
    if meta.get("format") != "labkit-gpt" or "config" not in meta:
        raise ValueError(f"{Path(path).name} is not a labkit checkpoint (its metadata lacks format=labkit-gpt)")
    try:
        cfg = json.loads(meta["config"])
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a JSON object, got {type(cfg).__name__}")
        allowed = {f.name for f in fields(GPTConfig)}
        config = GPTConfig(**{k: v for k, v in cfg.items() if k in allowed})
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{Path(path).name}: config in metadata is malformed ({err})") from None
    if config.attention not in ATTENTION_BACKENDS:
        config.attention = "sdpa"
    model = LabGPT(config)
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(
            f"{Path(path).name}: weights do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    for name, t in tensors.items():
        want = model.state_dict()[name].shape
        if t.shape != want:
            raise ValueError(f"{Path(path).name}: {name} has shape {tuple(t.shape)}, config needs {tuple(want)}")
    model.load_state_dict(tensors, strict=False)  # copies out of the map: the model owns its weights
    return model.to(device).eval() if device is not None else model.eval()


def load_hf_gpt2(folder, device=None) -> LabGPT:
    """Load a local Hugging Face GPT-2 folder (config.json + model.safetensors) into LabGPT.

    GPT-2 stores its linears as Conv1D with weight (in, out); nn.Linear wants (out, in),
    hence the transposes. Nothing is downloaded: point it at a folder you already have.
    """
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{folder} must contain config.json and model.safetensors (a Hugging Face GPT-2 folder)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from None
    missing = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if not isinstance(hf.get(k), int)]
    if missing:
        raise ValueError(f"{config_path} lacks GPT-2's {missing} (ints); is this a GPT-2 folder?")
    # what LabGPT builds exactly as GPT-2 does; anything else would load and compute something else, silently
    same = {"activation_function": "gelu_new", "n_inner": None, "layer_norm_epsilon": 1e-5,
            "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True}
    differs = {k: hf[k] for k, v in same.items()
               if k in hf and hf[k] != v and not (k == "n_inner" and hf[k] == 4 * hf["n_embd"])}
    if differs:
        raise ValueError(f"{config_path} sets {differs}; LabGPT implements GPT-2's defaults {same} only")
    config = GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", 1024),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
    )
    model = LabGPT(config)
    sd = {k.removeprefix("transformer."): v for k, v in load_safetensors(weights_path).items()}
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    new_state = {}
    for name in model.state_dict():
        if name == "lm_head.weight":
            continue
        key = name.removeprefix("transformer.")
        if key not in sd:
            raise ValueError(f"{weights_path.name} lacks {key!r}; is this a GPT-2 checkpoint?")
        w = sd[key]
        w = w.t() if name.endswith(transposed) else w
        if tuple(w.shape) != tuple(model.state_dict()[name].shape):
            raise ValueError(f"{weights_path.name}: {key!r} has shape {tuple(sd[key].shape)}, but config.json's GPT-2 "
                             f"needs {tuple(model.state_dict()[name].shape)}" + (" (transposed, Conv1D's (in, out))"
                             if name.endswith(transposed) else "") + ": the weights and the config disagree")  # fmt: skip
        new_state[name] = w
    model.load_state_dict(new_state, strict=False)
    return model.to(device).eval() if device is not None else model.eval()
