"""
What a GPT computes inside, read with the model in hand (geometry.py has the studies of plain
arrays): the residual stream after each layer, the logit lens that decodes it, and the layer-0
query-key scores split exactly into their token and position parts.
"""
import math

import torch
from torch.nn import functional as F

TERMS = ['token-token', 'position-position', 'token-position', 'position-token', 'bias']


def position_table(model):
    """The table added to the token embeddings: the learned W_pos, the sinusoidal one, or None."""
    return model.W_pos if model.W_pos is not None else getattr(model, 'pos_table', None)


@torch.no_grad()
def qk_decomposition(model, x):
    """Layer-0 query-key scores on token ids x (B, T), split exactly into five parts; each part's
    share of the within-query score variance per head, and max |sum of parts - model's scores|,
    the scores taken from the model's own forward pass (a hook on layer 0's query-key projection)."""
    block, d, H = model.transformer.h[0], model.config.n_embd, model.config.n_head
    dh, T, ln = d // H, x.size(1), block.ln_1
    W, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # rows: W_Q, W_K, W_V; q = LN(h) W_Q^T + b_Q
    W_Q, W_K, zero = W[:d], W[d:2 * d], torch.zeros(d, device=W.device)
    beta = ln.bias if ln.bias is not None else zero
    b_Q = beta @ W_Q.T + (b[:d] if b is not None else zero)  # LN's beta goes through W_Q into the bias
    b_K = beta @ W_K.T + (b[d:2 * d] if b is not None else zero)
    mask = torch.ones(T, T, dtype=torch.bool, device=W.device)
    mask = mask.tril() if model.config.causal else mask

    def heads(v):  # (B, T, d) -> (B, H, T, dh)
        return v.view(-1, T, H, dh).transpose(1, 2)

    def centre(s):  # subtract each query's mean over the keys it sees: softmax ignores that part
        s = s.masked_fill(~mask, 0)
        return (s - s.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).masked_fill(~mask, 0)

    p = position_table(model)[:T]
    cov, var = torch.zeros(len(TERMS), H, device=W.device), torch.zeros(H, device=W.device)
    error, largest = 0.0, 0.0
    for xb in x.split(1):
        # the model's own layer-0 queries and keys, from its forward pass
        captured = []
        hook = block.attn.c_attn.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            model.trunk(xb)
        finally:
            hook.remove()
        q, k, _ = captured[0].split(d, dim=2)
        e = model.transformer.wte(xb)
        # LN(e + p) = gamma*(e - mean e)/sigma + gamma*(p - mean p)/sigma + beta exactly, sigma = std(e + p)
        sigma = torch.sqrt((e + p).var(-1, unbiased=False, keepdim=True) + ln.eps)
        e_n = ln.weight * (e - e.mean(-1, keepdim=True)) / sigma
        p_n = ln.weight * (p - p.mean(-1, keepdim=True)) / sigma
        qe, qp, ke, kp = heads(e_n @ W_Q.T), heads(p_n @ W_Q.T), heads(e_n @ W_K.T), heads(p_n @ W_K.T)
        qb, kb = b_Q.view(H, 1, dh), b_K.view(H, 1, dh)
        parts = torch.stack([qe @ ke.mT, qp @ kp.mT, qe @ kp.mT, qp @ ke.mT,
                             qb @ (ke + kp).mT + (qe + qp) @ kb.mT + qb @ kb.mT]) / math.sqrt(dh)
        scores = heads(q) @ heads(k).mT / math.sqrt(dh)
        error = max(error, (parts.sum(0) - scores).abs().max().item())
        largest = max(largest, scores.abs().max().item())
        total = centre(scores)
        # share_i = Cov(part_i, score) / Var(score): the shares of the five parts add up to 1
        cov += (centre(parts) * total).sum((1, 3, 4))
        var += (total ** 2).sum((0, 2, 3))
    share = (cov / var).T.cpu()
    return {'terms': TERMS, 'share_by_head': share.tolist(), 'share_mean': share.mean(0).tolist(),
            'max_abs_error': error, 'max_abs_score': largest, 'tokens': x.numel()}


@torch.no_grad()
def residual_stream(model, x):
    """The residual stream after the embeddings (entry 0) and after each block, for token ids x
    (B, T): a list of n_layer + 1 tensors (B, T, d). A masked LM reads x as it is, nothing masked."""
    residuals = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: residuals.append(output))
             for m in [model.transformer.drop, *model.transformer.h]]
    try:
        model.trunk(x)
    finally:
        for hook in hooks:
            hook.remove()
    return residuals


@torch.no_grad()
def logit_lens(model, x, y):
    """Next-token loss of decoding the residual stream after the embeddings (entry 0) and after each
    block through the final LayerNorm and the tied head; the last entry is the model's own loss."""
    losses = torch.zeros(model.config.n_layer + 1)
    for xb, yb in zip(x.split(1), y.split(1)):
        for layer, h in enumerate(residual_stream(model, xb)):
            logits = model.lm_head(model.transformer.ln_f(h))[..., :model.config.vocab_size]
            losses[layer] += F.cross_entropy(logits.flatten(0, 1), yb.flatten()).item()
    return (losses / len(x)).tolist()


def batch_gradients(model, batches, names):
    """The gradient of the mean loss of each batch (x, y) in batches, for the parameters named
    (names: {label: parameter}), kept as running sums so that K batches cost the memory of one:
    {label: {'mean': the mean gradient, 'mean_sq': the mean of its squared norm, 'mean_sq_rows': the
    same row by row, 'first': the first batch's own gradient}} and the number of batches. The model
    is run as it is (eval mode: no dropout, every batch's gradient of the same function)."""
    sums, k = {label: None for label in names}, 0
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        k += 1
        for label, parameter in names.items():
            g = parameter.grad.detach().double().cpu()
            if sums[label] is None:
                sums[label] = {'mean': torch.zeros_like(g), 'first': g.clone(),
                               'mean_sq_rows': torch.zeros(len(g), dtype=g.dtype)}
            sums[label]['mean'] += g
            sums[label]['mean_sq_rows'] += (g ** 2).sum(1)
    model.zero_grad(set_to_none=True)
    return {label: {'mean': s['mean'].numpy() / k, 'mean_sq_rows': s['mean_sq_rows'].numpy() / k,
                    'mean_sq': float(s['mean_sq_rows'].sum()) / k, 'first': s['first'].numpy()}
            for label, s in sums.items()}, k
