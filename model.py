"""
GPT-2 in one file, numerically equal to the Hugging Face reference (GPT2LMHeadModel).

For a sequence of token ids x_1..x_T the model computes

    h_0 = W_E[x_t] + W_pos[t]                       token + position embedding (T, d)
    h_l = h_{l-1} + Attn(LN(h_{l-1}))               for each of n_layer blocks:
    h_l = h_l     + MLP(LN(h_l))                    pre-LayerNorm residual blocks
    logits = LN_f(h_L) @ W_E^T                      the head is tied to the embedding

Attn(x) = concat_heads(softmax(q k^T / sqrt(d_head) + mask) v) W_O with q, k, v = x W_Q, x W_K, x W_V,
and MLP(x) = GELU(x W_in + b_in) W_out + b_out with the tanh approximation of GELU.
Besides GPT-2's learned position table, `pos_emb` selects the schemes it is usually
compared with: a fixed sinusoidal table, rotary embeddings (RoPE) and ALiBi, or none.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


POS_EMBS = ('learned', 'sinusoidal', 'rope', 'alibi', 'none')


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True            # biases in Linear and LayerNorm, as in GPT-2
    pos_emb: str = 'learned'     # 'learned' | 'sinusoidal' | 'rope' | 'alibi' | 'none'
    causal: bool = True          # False: bidirectional attention (a BERT-style masked LM)
    pad_vocab_to: int = 1        # e.g. 64: pad the embedding rows for faster matmuls
    wpe_init_std: float = 0.02   # a learned W_pos starts ~ N(0, wpe_init_std^2) (0: all zeros),
                                 # as GPT-2's at 0.02
    wpe_init: str = 'normal'     # 'normal', or 'sinusoidal': the smooth sinusoidal table, RMS wpe_init_std

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to


def sinusoidal_table(n_pos, dim, std=0.02):
    """PE[t, 2i] = sin(t / 10000^(2i/dim)), PE[t, 2i+1] = cos(t / 10000^(2i/dim)), scaled by
    std * sqrt(2) so that its entries have the RMS of a learned table at init (the token
    embeddings start at std 0.02: an unscaled table, RMS 0.71, would drown them)."""
    angle = torch.arange(n_pos)[:, None] / 10000 ** (torch.arange(0, dim, 2) / dim)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle[:, :dim // 2])
    return table * std * math.sqrt(2)


def rotate(x, cos, sin):
    """RoPE: rotate each pair (x_2i, x_2i+1) of a head's channels by the angle t * theta_i."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


def alibi_slopes(n_head):
    """ALiBi head slopes: the geometric sequence 2^(-8h/n) for h = 1..n (n a power of two),
    for other n the 2^floor(log2 n) slopes plus every other slope of the next power of two."""
    def power_of_two(n):
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_two(closest) + power_of_two(2 * closest)[0::2][:n_head - closest])


TEMPERATURE, TOP_K = 0.8, 200  # how sample.py and train.py's samples draw, unless told otherwise


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row of logits (B, V): greedy when temperature is 0; top_k keeps the
    k likeliest tokens; top_p keeps the smallest set whose probability reaches p (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # the largest logit first brought to 0, so that a tiny temperature makes the others -inf, not NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        # a slice, not [:, [-1]]: a list index is a host tensor copied to the device at every token
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float('-inf')))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # W_Q, W_K, W_V
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)      # W_O
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, config.causal

    def forward(self, x, rope=None, alibi=None, cache=None, positions=None):
        """x: (B, T, d). rope: (cos, sin) for these T positions. alibi: (n_head, T, T_k) score bias.
        cache: this layer's key and value buffers, (B, n_head, block_size, d_head) each (GPT.new_cache):
        the T new keys and values are written in at `positions` (a device tensor of T positions),
        and the queries attend over the whole buffer, each up to its own position, in the cache's
        dtype (an fp32 cache beside bf16 weights: see machine.choose_decode_dtype)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        mask, is_causal, dtype = alibi, self.causal and alibi is None, q.dtype
        if cache is not None:
            cache['k'].index_copy_(2, positions, k.to(cache['k'].dtype))
            cache['v'].index_copy_(2, positions, v.to(cache['v'].dtype))
            q, k, v, is_causal = q.to(cache['k'].dtype), cache['k'], cache['v'], False
            # key j is seen by the query at position i when j <= i: the rest is empty or future
            # (ALiBi's bias has it)
            mask = (torch.arange(k.size(2), device=x.device) <= positions[:, None] if alibi is None
                    else alibi.to(q.dtype))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate='tanh')))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, alibi=None, cache=None, positions=None):
        x = x + self.attn(self.ln_1(x), rope, alibi, cache, positions)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.pos_emb in POS_EMBS, f"pos_emb must be one of {POS_EMBS}"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_emb == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.pos_emb == 'sinusoidal':
            self.register_buffer('pos_table', sinusoidal_table(config.block_size, config.n_embd),
                                 persistent=False)
        if config.pos_emb == 'rope':
            head_dim = config.n_embd // config.n_head
            angle = (torch.arange(config.block_size)[:, None]
                     / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
            self.register_buffer('rope_cos', angle.cos(), persistent=False)
            self.register_buffer('rope_sin', angle.sin(), persistent=False)
        if config.pos_emb == 'alibi':
            self.register_buffer('alibi_slopes', alibi_slopes(config.n_head), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one tensor, two uses
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.padded_vocab_size > config.vocab_size:
            # the padding columns of the head get a constant bias of -inf: their logits are -inf
            # whatever the weights, and exp(-inf) = 0 adds nothing to a softmax over the padded
            # width. A buffer, not a parameter: no gradient, and not in the state dict.
            del self.lm_head.bias
            pad_bias = torch.zeros(config.padded_vocab_size)
            pad_bias[config.vocab_size:] = float('-inf')
            self.lm_head.register_buffer('bias', pad_bias, persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            wpe = module is getattr(self.transformer, 'wpe', None)
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.wpe_init_std if wpe else 0.02)
            if wpe and self.config.wpe_init == 'sinusoidal':  # drawn first all the same: the other weights
                with torch.no_grad():                         # start as they would from a normal W_pos
                    module.weight.copy_(sinusoidal_table(*module.weight.shape, std=self.config.wpe_init_std))
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    @property
    def W_E(self):
        """Token embedding, (vocab_size, d), without the padding rows."""
        return self.transformer.wte.weight[:self.config.vocab_size]

    @property
    def W_pos(self):
        """Learned position embedding, (block_size, d); None for the other pos_emb schemes."""
        return self.transformer.wpe.weight if self.config.pos_emb == 'learned' else None

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.W_pos.numel() if non_embedding and self.W_pos is not None else n

    def crop_block_size(self, block_size):
        """Shorten the context, e.g. to fine-tune GPT-2 (1024) with block_size 256."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos_emb == 'learned':
            self.transformer.wpe.weight = nn.Parameter(
                self.transformer.wpe.weight[:block_size].detach().clone())
        for name in ('pos_table', 'rope_cos', 'rope_sin'):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name)[:block_size])

    def alibi_bias(self, positions, n_keys):
        """-m_h * (i - j) for the query at position i and key j (causal: -inf for j > i); -m_h * |i - j|
        otherwise. positions: the queries' positions, a (T,) tensor; keys 0 .. n_keys - 1."""
        query, key = positions[:, None], torch.arange(n_keys, device=positions.device)[None, :]
        distance = (query - key).float()
        if self.config.causal:
            distance = distance.masked_fill(key > query, float('inf'))
        return -self.alibi_slopes.to(positions.device)[:, None, None] * distance.abs()

    def new_cache(self, batch, dtype, device, static=False):
        """A static KV cache: for each layer, key and value buffers of (batch, n_head, block_size,
        d_head), allocated once and written in place, so that every decode step has the same
        shapes (what torch.compile and a CUDA graph need). static, for a compiled decode step:
        their addresses are marked static, as a CUDA graph may write into them."""
        c = self.config
        shape = (batch, c.n_head, c.block_size, c.n_embd // c.n_head)
        cache = [{name: torch.zeros(shape, dtype=dtype, device=device) for name in ('k', 'v')}
                 for _ in self.transformer.h]
        if static:
            for buffers in cache:
                for buffer in buffers.values():
                    torch._dynamo.mark_static_address(buffer)
        return cache

    def trunk(self, idx, cache=None, positions=None):
        """Token ids (B, T) -> final hidden states LN_f(h_L), (B, T, d). With a cache (new_cache), the
        ids sit at `positions`, a (T,) device tensor (the prompt at 0 .. T-1, then one token at a time),
        and their keys and values go into the cache there."""
        T = idx.size(1)
        block_size = self.config.block_size
        assert cache is not None or T <= block_size, f"sequence of {T} > block_size {block_size}"
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)
        if self.config.pos_emb == 'learned':
            x = x + self.transformer.wpe(positions)
        elif self.config.pos_emb == 'sinusoidal':
            x = x + self.pos_table[positions]
        rope = (self.rope_cos[positions], self.rope_sin[positions]) if self.config.pos_emb == 'rope' else None
        alibi = None
        if self.config.pos_emb == 'alibi':
            alibi = self.alibi_bias(positions, T if cache is None else block_size).to(x.dtype)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, alibi, None if cache is None else cache[i], positions)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Return (logits (B, T, vocab_size), mean cross-entropy over targets != -1, or None).
        The loss is taken over the head's padded width, whose padding columns are -inf (see
        __init__), so it equals the loss over the vocabulary while the logits stay one contiguous
        tensor: a slice of the real columns would be copied by the softmax and its gradient. The
        logits returned are a view of the real columns. Uncompiled (train.py's compile=False) under
        bf16 autocast, cross_entropy runs in fp32, so autocast copies the bf16 logits to fp32 first."""
        logits = self.lm_head(self.trunk(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits[..., :self.config.vocab_size], loss

    def next_logits(self, idx, cache=None, positions=None):
        """The logits after the last token of each row of idx (B, T), in fp32: (B, vocab_size)."""
        return self.lm_head(self.trunk(idx, cache, positions)[:, -1])[:, :self.config.vocab_size].float()

    def decode_step(self, token, position, cache):
        """One token per row (B, 1) at `position`, a (1,) device tensor -> fp32 logits (B, vocab_size),
        its keys and values written into the cache. Fixed shapes, no host reads and no branch on a
        tensor's value: what compile_decode compiles whole."""
        return self.next_logits(token, cache, position)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True,
               generator=None, decode=None, cache_dtype=None, cache=None):
        """Yield max_new_tokens next tokens, each (B, 1), continuing idx (B, T); see sample_next.
        With kv_cache the prompt runs once, eagerly, into a static cache (prefill), then one token
        per step through decode: decode_step, or compile_decode's compiled one. The cache holds
        cache_dtype (None: the dtype the keys are computed in). cache: a new_cache() of B rows to
        write into instead of a new one (static for a compiled decode): a CUDA graph captured on a
        cache replays only on that cache, so a warm-up and a timed run share one. What an earlier
        call left in it is never read: each query sees the keys up to its own position, all written
        by this call (the mask, or ALiBi's -inf, hides the rest), and a hidden entry, being finite,
        adds exactly 0. Past block_size the context is cropped and recomputed at every step
        (positions would shift in a cache)."""
        static = decode is not None  # a compiled step's CUDA graph may write into the cache (new_cache)
        decode = decode or self.decode_step
        position, next_token = None, None
        for _ in range(max_new_tokens):
            if not kv_cache or idx.size(1) > self.config.block_size:
                logits = self.next_logits(idx[:, -self.config.block_size:])
            elif position is None:
                if cache is None:
                    device_type = idx.device.type
                    # what the keys and values are computed in
                    dtype = cache_dtype or (torch.get_autocast_dtype(device_type)
                                            if torch.is_autocast_enabled(device_type)
                                            else self.lm_head.weight.dtype)
                    cache = self.new_cache(idx.size(0), dtype, idx.device, static)
                positions = torch.arange(idx.size(1), device=idx.device)
                logits = self.next_logits(idx, cache, positions)
                position = positions[-1:] + 1
            else:
                logits = decode(next_token, position, cache)  # the token sampled last
                position = position + 1
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True,
                 generator=None, decode=None, cache_dtype=None, cache=None):
        """Return idx (B, T) extended by max_new_tokens sampled tokens; see stream()."""
        new = self.stream(idx, max_new_tokens, temperature, top_k, top_p, kv_cache, generator, decode,
                          cache_dtype, cache)
        return torch.cat([idx] + list(new), dim=1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw',
                             wpe_weight_decay=None, embedding_lr=None, ns_dtype=torch.bfloat16):
        """Return a list of optimizers. Weight decay applies to 2-D weights only (matrices and
        embeddings), never to biases and LayerNorm gains. AdamW is fused on CUDA and the CPU.
        'muon' trains the 2-D matrices of the blocks with Muon (gulliver/optim.py: orthogonalised momentum,
        its Newton-Schulz products in ns_dtype) and everything else with AdamW. wpe_weight_decay
        (None: weight_decay) and embedding_lr (None: learning_rate) give W_pos, and W_E and W_pos,
        groups of their own; a group's 'lr_scale' is its learning rate over learning_rate, which
        train.py's schedule multiplies."""
        params = [p for p in self.parameters() if p.requires_grad]
        fused = device_type in ('cuda', 'cpu')  # one kernel per step instead of a dozen per tensor

        def adamw_groups(params):
            own = []  # (parameter, weight decay): embeddings in groups of their own, when a setting asks
            if embedding_lr is not None or wpe_weight_decay is not None:
                own = [(self.transformer.wte.weight, weight_decay)]
                if self.W_pos is not None:
                    own.append((self.W_pos, weight_decay if wpe_weight_decay is None else wpe_weight_decay))
            scale = 1.0 if embedding_lr is None else embedding_lr / learning_rate
            rest = [p for p in params if all(p is not q for q, _ in own)]
            return ([{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
                     {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}] +
                    [{'params': [p], 'weight_decay': decay, 'lr': learning_rate * scale, 'lr_scale': scale}
                     for p, decay in own if any(p is q for q in params)])

        if optimizer == 'adamw':
            return [torch.optim.AdamW(adamw_groups(params), lr=learning_rate, betas=betas, fused=fused)]
        if optimizer == 'muon':
            from gulliver.optim import Muon  # the package's: an AdamW run needs torch alone
            hidden = [p for n, p in self.named_parameters()
                      if n.startswith('transformer.h.') and p.dim() == 2]
            hidden_ids = {id(p) for p in hidden}
            rest = [p for p in params if id(p) not in hidden_ids]
            return [Muon(hidden, lr=learning_rate, weight_decay=weight_decay, ns_dtype=ns_dtype),
                    torch.optim.AdamW(adamw_groups(rest), lr=learning_rate, betas=betas, fused=fused)]
        raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6N for the weights (2 forward + 4 backward per multiply-add),
        plus attention's q k^T and att v, 12 * n_layer * T * d, for a context of T tokens."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * (T or c.block_size) * c.n_embd

    def estimate_mfu(self, tokens_per_s, peak_flops, T=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the peak FLOP/s."""
        return self.flops_per_token(T) * tokens_per_s / peak_flops

    # ---- Hugging Face format: config.json + model.safetensors --------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, hub_url=None, cache_dir=None, **overrides):
        """GPT-2 weights from a local save_pretrained directory or the hub ('gpt2', 'gpt2-medium',
        'gpt2-large', 'gpt2-xl'), downloaded once into cache_dir (None: gulliver/pretrained.py's
        HF_CACHE_DIR) from hub_url (None: HF_HUB_URL). overrides: e.g. dropout=0.1. The conversion
        lives in the package and is imported here, so that this file needs torch alone."""
        from gulliver.pretrained import copy_pretrained, read_pretrained
        shape, tensors, source = read_pretrained(name_or_dir, hub_url, cache_dir)
        model = cls(GPTConfig(**shape, **overrides))
        copy_pretrained(tensors, model.state_dict(), source)
        return model

    def save_pretrained(self, folder):
        """Write config.json and model.safetensors as transformers' GPT2LMHeadModel expects them."""
        from gulliver.pretrained import write_pretrained
        c = self.config
        if (c.pos_emb, c.bias, c.causal) != ('learned', True, True):
            raise ValueError("save_pretrained needs the GPT-2 architecture: "
                             "pos_emb='learned', bias=True, causal=True")
        write_pretrained(folder, self.state_dict(), c)


def compile_decode(model):
    """model.decode_step compiled whole, for GPT.stream(decode=...): fullgraph=True makes a graph
    break an error rather than a silent fall-back to eager. On CUDA the step is also captured as
    a CUDA graph (mode 'reduce-overhead'): one launch per token instead of hundreds from Python.
    The first call compiles (tens of seconds on a CPU); the cache's static shapes keep it the only one."""
    cuda = next(model.parameters()).is_cuda
    return torch.compile(model.decode_step, fullgraph=True, dynamic=False,
                         mode='reduce-overhead' if cuda else None)
