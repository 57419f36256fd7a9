"""
Word embeddings from two classic objectives, trained on the same train.bin as GPT, so that
each W_E has one row per GPT-2 token id (50,257) and compares with GPT's row for row.

    sgns   skip-gram with negative sampling (Mikolov et al. 2013, word2vec), minibatch SGD
    glove  weighted least squares on log co-occurrence counts (Pennington et al. 2014), AdaGrad

    $ python embeddings.py config/sgns.py                  # -> out-sgns/W_E.npy, embeddings.json
    $ python embeddings.py --method=glove --dim=128        # -> out-glove/...

Only the rows of tokens that occur in train.bin are trained; the rows of tokens never seen
are zeros in W_E.npy (embeddings.json says how many rows are covered).
"""
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

from gulliver.configurator import (a_path, a_seed, check, configure, greater_than, integer_at_least, one_of,
                                   optional)
from gulliver.data import read_split
from gulliver.atomic import write_atomic
from gulliver.tokenizer import VOCAB_SIZE

# -----------------------------------------------------------------------------
method = 'sgns'          # 'sgns' or 'glove'
data_dir = 'data/gulliver'
out_dir = None           # None -> out-{method}
dim = 256                # the n_embd of the CPU GPT config
window = 5               # context tokens on each side
epochs = None            # None -> METHOD_DEFAULTS[method]
batch_size = None        # None -> METHOD_DEFAULTS[method]
lr = None                # None -> METHOD_DEFAULTS[method]; decays linearly to 0
seed = 1337
negatives = 5            # sgns: noise tokens per (word, context) pair
subsample = 1e-3         # sgns: the threshold t of frequent-token subsampling
x_max = 100.0            # glove: the weighting f(x) = min(1, (x / x_max)^alpha)
alpha = 0.75
# -----------------------------------------------------------------------------

# sgns: twice word2vec's rate of 0.025, which needs some 30 epochs to get as far on this small book;
# glove: the paper's AdaGrad rate. Either takes under a minute on 2 idle CPU cores.
METHOD_DEFAULTS = {'sgns': dict(epochs=15, batch_size=1024, lr=0.05),
                   'glove': dict(epochs=25, batch_size=4096, lr=0.05)}
PROGRESS_EVERY_S = 10
MAX_STEPS = 10  # sgns: a row moves at most this many pairs' steps per batch (train_sgns)


def compact_ids(tokens):
    """(vocab, ids): the distinct token ids that occur, and the tokens renumbered 0..len(vocab)-1."""
    return np.unique(np.asarray(tokens, dtype=np.int64), return_inverse=True)


def full_vocab_matrix(vocab, trained_rows):
    """Scatter the trained rows into a (VOCAB_SIZE, dim) float32 matrix; unseen tokens stay zero."""
    W_E = np.zeros((VOCAB_SIZE, trained_rows.shape[1]), dtype=np.float32)
    W_E[vocab] = trained_rows
    return W_E


def sparse_embedding(n, dim, scale, generator):
    """An n x dim table initialised ~ U(-scale, scale), whose gradients are sparse (only the rows used)."""
    table = torch.nn.Embedding(n, dim, sparse=True)
    with torch.no_grad():
        table.weight.uniform_(-scale, scale, generator=generator)
    return table


def run_epochs(name, make_examples, batch_loss, optimizer, epochs, batch_size, lr, rng):
    """Minibatch training. Each epoch takes examples (aligned numpy arrays) from make_examples(),
    shuffles them and steps the optimizer on batch_loss(*batch), a sum over the batch; the
    learning rate decays linearly from lr to 0 over the run. Returns the mean loss of each epoch;
    raises FloatingPointError (one line) when the loss or a parameter stops being finite."""
    losses, start, last_print, seen = [], time.time(), time.time(), 0
    for epoch in range(epochs):
        examples = make_examples()
        order = rng.permutation(len(examples[0]))
        n_batches = -(-len(order) // batch_size)
        epoch_total = 0.0
        for step in range(n_batches):
            for group in optimizer.param_groups:
                group['lr'] = lr * (1 - (epoch + step / n_batches) / epochs)
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = batch_loss(*(torch.from_numpy(a[idx]) for a in examples))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_total += loss.item()
            seen += len(idx)
            now = time.time()
            if now - last_print >= PROGRESS_EVERY_S or step == n_batches - 1:
                last_print, elapsed = now, now - start
                done = (epoch + (step + 1) / n_batches) / epochs
                print(f"{name} epoch {epoch + 1}/{epochs} step {step + 1}/{n_batches}: "
                      f"loss {epoch_total / (step * batch_size + len(idx)):.4f}, "
                      f"{seen / elapsed:,.0f} pairs/s, ETA {elapsed / done - elapsed:.0f}s", flush=True)
        losses.append(epoch_total / len(order))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name}: the loss is {losses[-1]} after epoch {epoch + 1}; lower --lr")
    if not all(torch.isfinite(p).all() for group in optimizer.param_groups for p in group['params']):
        raise FloatingPointError(f"{name}: the vectors are not finite after training; lower --lr")
    return losses


# --- skip-gram with negative sampling ----------------------------------------

def skipgram_pairs(ids, window, rng):
    """(word, context) pairs with word2vec's shrinking window: each word draws its own span
    b in 1..window and pairs with the tokens at distance <= b on both sides."""
    span = rng.integers(1, window + 1, size=len(ids))
    words, contexts = [], []
    for d in range(1, window + 1):
        left, right = np.arange(len(ids) - d), np.arange(d, len(ids))
        for word, context in ((left, right), (right, left)):
            keep = span[word] >= d
            words.append(ids[word[keep]])
            contexts.append(ids[context[keep]])
    return np.concatenate(words), np.concatenate(contexts)


def keep_probability(counts, t):
    """Subsampling, the paper's variant: a token of frequency f = count / total is kept with
    probability min(1, sqrt(t / f)) (the word2vec code uses sqrt(t/f) + t/f); redrawn each epoch."""
    return np.minimum(1.0, np.sqrt(t / (counts / counts.sum())))


def noise_distribution(counts):
    """The distribution negatives are drawn from: the unigram distribution raised to 3/4."""
    weights = np.asarray(counts, np.float64) ** 0.75
    return weights / weights.sum()


def sgns_loss(v_word, u_context, u_noise):
    """L = -log σ(u_c·v_w) - Σ_k log σ(-u_{n_k}·v_w), summed over the batch.
    v_word, u_context: (B, dim); u_noise: (B, K, dim)."""
    positive = (u_context * v_word).sum(-1)
    negative = torch.bmm(u_noise, v_word[:, :, None]).squeeze(-1)
    return -(F.logsigmoid(positive) + F.logsigmoid(-negative).sum(-1)).sum()


def train_sgns(tokens, dim, window, negatives, epochs, batch_size, lr, subsample, seed):
    """Skip-gram with negative sampling. Returns (W_E (VOCAB_SIZE, dim), loss per epoch).
    word2vec steps one pair at a time, each by lr times that pair's gradient, and a row's later steps
    shrink as its sigmoids saturate. A minibatch sums gradients taken at one point instead: a row
    in k of the batch's pairs moves k steps at once, with no such brake. On the book few rows reach
    large k, but on a vocabulary of a few dozen tokens k runs into the hundreds and the vectors
    blow up. So a row in k > MAX_STEPS lookups of a batch gets its summed gradient scaled by
    MAX_STEPS / k: it moves at most as far as MAX_STEPS pairs' steps."""
    vocab, ids = compact_ids(tokens)
    counts = np.bincount(ids)
    keep_prob, noise_prob = keep_probability(counts, subsample), noise_distribution(counts)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    # v: the word vectors (the embedding), u: the context vectors; as in word2vec, v ~ U(±0.5/dim), u = 0
    v = sparse_embedding(len(vocab), dim, 0.5 / dim, generator)
    u = sparse_embedding(len(vocab), dim, 0.0, generator)

    def make_examples():
        kept = ids[rng.random(len(ids)) < keep_prob[ids]]
        words, contexts = skipgram_pairs(kept, window, rng)
        return words, contexts, rng.choice(len(vocab), size=(len(words), negatives), p=noise_prob)

    def batch_loss(words, contexts, noise):
        v_word, u_context, u_noise = v(words), u(contexts), u(noise)
        # each lookup's gradient times min(1, MAX_STEPS / k), k = how often its row is looked up in the batch
        u_rows = torch.cat([contexts, noise.flatten()])
        v_scale = MAX_STEPS / torch.bincount(words, minlength=len(vocab)).clamp(min=MAX_STEPS)
        u_scale = MAX_STEPS / torch.bincount(u_rows, minlength=len(vocab)).clamp(min=MAX_STEPS)
        for looked_up, scale in ((v_word, v_scale[words]), (u_context, u_scale[contexts]),
                                 (u_noise, u_scale[noise])):
            looked_up.register_hook(lambda grad, scale=scale: grad * scale[..., None].float())
        return sgns_loss(v_word, u_context, u_noise)

    optimizer = torch.optim.SGD([v.weight, u.weight], lr=lr)
    losses = run_epochs('sgns', make_examples, batch_loss, optimizer, epochs, batch_size, lr, rng)
    return full_vocab_matrix(vocab, v.weight.detach().numpy()), losses


# --- GloVe ---------------------------------------------------------------------

def cooccurrence(ids, window):
    """The symmetric co-occurrence counts X as (rows, cols, values) of its nonzeros: every two
    tokens d <= window positions apart add 1/d to X[a, b] and to X[b, a]."""
    ids = np.asarray(ids, dtype=np.int64)
    n = int(ids.max()) + 1
    keys, weights = [], []
    for d in range(1, min(window, len(ids) - 1) + 1):
        a, b = ids[:-d], ids[d:]
        keys += [a * n + b, b * n + a]
        weights += [np.full(len(a), 1.0 / d)] * 2
    pairs, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return pairs // n, pairs % n, np.bincount(inverse, weights=np.concatenate(weights))


def glove_weight(x, x_max, alpha):
    """f(x) = min(1, (x / x_max)^alpha): rare co-occurrences count less, none counts more than 1."""
    return np.minimum(1.0, (x / x_max) ** alpha)


def glove_loss(w_i, w_j, b_i, b_j, log_x, f):
    """J = Σ f(X_ij) (w_i·w~_j + b_i + b~_j - log X_ij)^2, summed over the batch."""
    return (f * ((w_i * w_j).sum(-1) + b_i + b_j - log_x) ** 2).sum()


def train_glove(tokens, dim, window, x_max, alpha, epochs, batch_size, lr, seed):
    """GloVe with AdaGrad, as in the paper. Returns (W_E = w + w~ (VOCAB_SIZE, dim), loss per epoch)."""
    vocab, ids = compact_ids(tokens)
    rows, cols, x = cooccurrence(ids, window)
    f = glove_weight(x, x_max, alpha).astype(np.float32)
    log_x = np.log(x).astype(np.float32)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    # word vectors w, context vectors w~ and their biases, all ~ U(-0.5, 0.5) / dim as in the GloVe code
    w, w_ctx, b, b_ctx = (sparse_embedding(len(vocab), size, 0.5 / dim, generator)
                          for size in (dim, dim, 1, 1))

    def batch_loss(i, j, f_ij, log_x_ij):
        return glove_loss(w(i), w_ctx(j), b(i)[:, 0], b_ctx(j)[:, 0], log_x_ij, f_ij)

    torch.sparse.check_sparse_tensor_invariants.disable()  # the default; saying so silences AdaGrad's warning
    optimizer = torch.optim.Adagrad([w.weight, w_ctx.weight, b.weight, b_ctx.weight], lr=lr)
    losses = run_epochs('glove', lambda: (rows, cols, f, log_x), batch_loss, optimizer,
                        epochs, batch_size, lr, rng)
    return full_vocab_matrix(vocab, (w.weight + w_ctx.weight).detach().numpy()), losses


if __name__ == '__main__':
    configure(globals())
    check(globals(), {
        'method': one_of(*METHOD_DEFAULTS), 'out_dir': optional(a_path), 'seed': a_seed,
        **{name: integer_at_least(1) for name in ('dim', 'window', 'negatives')},
        **{name: optional(integer_at_least(1)) for name in ('epochs', 'batch_size')},
        'lr': optional(greater_than(0)),
        **{name: greater_than(0) for name in ('subsample', 'x_max', 'alpha')},
    })
    epochs, batch_size, lr = (METHOD_DEFAULTS[method][name] if value is None else value
                              for name, value in (('epochs', epochs), ('batch_size', batch_size), ('lr', lr)))
    out_dir = f'out-{method}' if out_dir is None else out_dir
    try:
        tokens = read_split(data_dir, 'train')
    except ValueError as e:
        sys.exit(f"error: {e}")

    n_seen = len(np.unique(tokens))
    print(f"{method}: {len(tokens):,} tokens, {n_seen:,} distinct; dim {dim}, window {window}, "
          f"{epochs} epochs, batch {batch_size}, lr {lr}")
    start = time.time()
    try:
        if method == 'sgns':
            W_E, losses = train_sgns(tokens, dim, window, negatives, epochs, batch_size, lr, subsample, seed)
        else:
            W_E, losses = train_glove(tokens, dim, window, x_max, alpha, epochs, batch_size, lr, seed)
    except FloatingPointError as e:
        sys.exit(f"error: {e}; nothing was written")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing was written")
    wall_time = time.time() - start
    if not np.isfinite(losses[-1]) or losses[-1] > losses[0]:
        sys.exit(f"error: the loss diverged ({losses[0]:.4g} -> {losses[-1]:.4g}); "
                 f"lower --lr or --batch_size")

    method_settings = (dict(negatives=negatives, subsample=subsample) if method == 'sgns'
                       else dict(x_max=x_max, alpha=alpha))
    summary = {
        'method': method,
        'settings': dict(data_dir=data_dir, dim=dim, window=window, epochs=epochs, batch_size=batch_size,
                         lr=lr, seed=seed, **method_settings),
        'optimizer': ('SGD' if method == 'sgns' else 'AdaGrad') + ', lr decaying linearly to 0',
        'loss': 'per (word, context) pair, -log σ(u_c·v_w) - Σ_k log σ(-u_n·v_w)' if method == 'sgns'
                else 'per nonzero X_ij, f(X_ij)(w_i·w~_j + b_i + b~_j - log X_ij)^2',
        'losses': losses,
        'wall_time_s': round(wall_time, 1),
        'train_tokens': len(tokens),
        'rows_trained': n_seen,
        'vocab_coverage': n_seen / VOCAB_SIZE,
        'unseen_rows': 'zeros',
        'embedding': 'v, the word vectors' if method == 'sgns' else 'w + w~',
    }
    buffer = io.BytesIO()
    np.save(buffer, W_E)
    os.makedirs(out_dir, exist_ok=True)
    summary_text = json.dumps(summary, indent=2, ensure_ascii=False) + '\n'
    write_atomic({os.path.join(out_dir, 'W_E.npy'): buffer.getvalue(),
                  os.path.join(out_dir, 'embeddings.json'): summary_text.encode()})
    print(f"{method}: final loss {losses[-1]:.4f} in {wall_time:.0f}s; "
          f"wrote {out_dir}/W_E.npy ({VOCAB_SIZE} x {dim}, {n_seen:,} rows trained) and embeddings.json")
