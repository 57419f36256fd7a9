"""
Batches from the token files prepare.py writes: train.bin and val.bin are uint16 GPT-2 ids,
memory-mapped once and read as windows of block_size + 1 tokens.

A loss is in nats per token; bits_per_byte turns it into bits per UTF-8 byte of the text,
which does not depend on the tokenizer (prepare.py stores each split's byte count).

Two ways to choose the windows: random offsets (each batch independent, so some tokens are
seen many times before others are seen once: after drawing D target tokens from n, the
expected covered fraction is 1 - (1 - 1/n)^D ~ 1 - exp(-D/n)), or epochs of a shuffled
permutation of the non-overlapping windows 0, T, 2T, ..., each used once per epoch.

Under DDP the processes (ranks) share one optimizer step: split_batch gives each its part of
the global batch, random offsets come from a generator seeded per rank, and the epoch sampler
shuffles once for all ranks (the same seed) and deals each batch of windows out among them.
"""
import hashlib
import json
import math
import os

import numpy as np

from gulliver.tokenizer import EOT_TOKEN, VOCAB_SIZE

MASK_TOKEN = EOT_TOKEN  # the masked LM's [MASK]: <|endoftext|> never occurs inside the book


def open_split(data_dir, split):
    """The token ids of data_dir/{split}.bin as a read-only uint16 memmap."""
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')


def open_data(data_dir):
    """meta.json and both splits of a data_dir, checked against each other: the token files
    must hold the token counts and sha256 that meta.json records, and ids below vocab_size.
    Returns (meta, {'train': memmap, 'val': memmap}); ValueError with one line otherwise."""
    again = "run python prepare.py again"
    for name in ('train.bin', 'val.bin', 'meta.json'):
        if not os.path.exists(os.path.join(data_dir, name)):
            raise ValueError(f"no {data_dir}/{name}; run python prepare.py first (or pass --data_dir)")
    meta_path = os.path.join(data_dir, 'meta.json')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {meta_path} ({type(e).__name__}); {again}") from None
    counts = ('vocab_size', 'train_tokens', 'val_tokens', 'train_bytes', 'val_bytes')
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds no JSON object (damaged); {again}")
    missing = [key for key in (*counts, 'sha256') if key not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {', '.join(missing)} (damaged, or written by an older "
                         f"prepare.py); {again}")
    wrong = [key for key in counts if type(meta[key]) is not int] + ([] if isinstance(meta['sha256'], dict)
                                                                     else ['sha256'])
    if wrong:
        raise ValueError(f"{meta_path} has {', '.join(wrong)} of the wrong type (counts are integers, "
                         f"sha256 an object); {again}")
    data = {}
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        size = os.path.getsize(path)
        if size == 0 or size % 2:
            raise ValueError(f"{path} is not a file of uint16 token ids ({size} bytes); {again}")
        with open(path, 'rb') as f:
            digest = hashlib.file_digest(f, 'sha256').hexdigest()
        if size // 2 != meta[f'{split}_tokens'] or digest != meta['sha256'].get(f'{split}.bin'):
            raise ValueError(f"{path} ({size // 2:,} tokens) is not the file {meta_path} describes "
                             f"({meta[f'{split}_tokens']:,} tokens, another sha256); {again}")
        data[split] = open_split(data_dir, split)
        if data[split].max() >= meta['vocab_size']:
            raise ValueError(f"{path} holds token id {data[split].max()}, not below vocab_size "
                             f"{meta['vocab_size']}; {again}")
    return meta, data


def read_split(data_dir, split):
    """One split's token ids (a read-only uint16 memmap): checked by open_data where data_dir has the
    meta.json that prepare.py writes, else only as GPT-2 ids. ValueError with one line."""
    if os.path.exists(os.path.join(data_dir, 'meta.json')):
        return open_data(data_dir)[1][split]
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.isfile(path) or os.path.getsize(path) < 4 or os.path.getsize(path) % 2:
        raise ValueError(f"no token file {path}; run python prepare.py first (or pass --data_dir)")
    ids = open_split(data_dir, split)
    if ids.max() >= VOCAB_SIZE:
        raise ValueError(f"{path} is not a list of GPT-2 token ids; run python prepare.py again")
    return ids


def random_offsets(rng, n_tokens, block_size, batch_size):
    """batch_size window starts drawn uniformly from [0, n_tokens - block_size - 1]."""
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def every_window(n_tokens, block_size):
    """Windows that predict every token of a split once, from the second on: offsets 0, T, 2T, ...
    while a whole window fits, then one window that ends where the split ends. Returns (offsets,
    overlap): the last window's first `overlap` targets were predicted by the window before it
    (0 when the split ends on a window's edge), and are left out of the loss."""
    n_targets = n_tokens - 1
    offsets = list(range(0, n_targets - block_size + 1, block_size))
    overlap = 0
    if n_targets % block_size:
        offsets.append(n_tokens - 1 - block_size)
        overlap = block_size - n_targets % block_size
    return np.array(offsets), overlap


def epoch_offsets(state, rng, n_tokens, block_size, batch_size, rank=0, world_size=1):
    """This rank's batch_size windows of the epoch; state = {'order': array, 'pos': int} is updated.
    Every rank holds the same state and rng: the next batch_size * world_size windows of the
    shared order are dealt out, rank r taking every world_size-th from the r-th, so that each
    window is used once per epoch across all ranks. A new epoch (a fresh shuffle) starts when
    the current one has fewer windows left than that."""
    step = batch_size * world_size
    if state['pos'] + step > len(state['order']):
        state['order'], state['pos'] = rng.permutation(np.arange(0, n_tokens - block_size, block_size)), 0
    offsets = state['order'][state['pos'] + rank:state['pos'] + step:world_size]
    state['pos'] += step
    return offsets


class Sampler:
    """One rank's stream of training micro-batches, and the record of what it has drawn.

    sampler 'random' draws offsets from a generator seeded per rank; 'epoch' deals out a shuffle
    that every rank makes alike (epoch_offsets). For the masked LM the same per-rank generator
    chooses the masked positions. covered marks the train tokens used as targets so far (every
    rank's, once train.py has gathered them at an evaluation); targets_drawn counts this rank's.
    state() and restore() are each other's inverse: what a resumed rank needs to continue the
    very same stream (checkpoint.rank_state keeps it with the rank's other RNGs)."""

    def __init__(self, tokens, block_size, micro_batch, sampler, objective, vocab_size, seed, rank=0,
                 world_size=1):
        windows_per_epoch = (len(tokens) - 1) // block_size
        if sampler == 'epoch' and windows_per_epoch < micro_batch * world_size:
            raise ValueError(f"sampler='epoch' needs at least {micro_batch * world_size} windows of "
                             f"{block_size} train tokens (a micro-batch for each process); "
                             f"lower --batch_size or --block_size")
        self.tokens, self.block_size, self.micro_batch = tokens, block_size, micro_batch
        self.sampler, self.objective, self.vocab_size = sampler, objective, vocab_size
        self.rank, self.world_size = rank, world_size
        # random offsets and masking: each rank a stream of its own
        self.rng = np.random.default_rng(seed + rank)
        self.epoch_rng = np.random.default_rng(seed)   # one shuffle, the same on every rank
        self.epoch = {'order': np.zeros(0, dtype=np.int64), 'pos': 0}
        self.covered = np.zeros(len(tokens), dtype=bool)
        self.targets_drawn = 0

    def next_batch(self):
        """The next micro-batch (x, y), int64 arrays (micro_batch, block_size); marks its targets
        covered: every next token for the GPT, the masked positions only for the masked LM."""
        if self.sampler == 'epoch':
            offsets = epoch_offsets(self.epoch, self.epoch_rng, len(self.tokens), self.block_size,
                                    self.micro_batch, self.rank, self.world_size)
        else:
            offsets = random_offsets(self.rng, len(self.tokens), self.block_size, self.micro_batch)
        x, y = batch_at(self.tokens, offsets, self.block_size, self.objective, self.rng, self.vocab_size)
        positions = target_positions(offsets, y, causal=self.objective == 'clm')
        self.covered[positions] = True
        self.targets_drawn += len(positions)
        return x, y

    def state(self):
        return {'sampler': self.rng.bit_generator.state, 'epoch_rng': self.epoch_rng.bit_generator.state,
                'epoch_order': self.epoch['order'].copy(), 'epoch_pos': self.epoch['pos'],
                'targets_drawn': self.targets_drawn}

    def restore(self, state):
        self.rng.bit_generator.state, self.epoch_rng.bit_generator.state = (
            state['sampler'], state['epoch_rng'])
        self.epoch = {'order': np.asarray(state['epoch_order']), 'pos': state['epoch_pos']}
        self.targets_drawn = state['targets_drawn']


def batch_at(tokens, offsets, block_size, objective, rng, vocab_size):
    """The windows at these offsets as (x, y); for the masked LM ('mlm') masked with rng."""
    x, y = windows(tokens, offsets, block_size)
    return mask_tokens(x, rng, vocab_size) if objective == 'mlm' else (x, y)


def eval_batches(tokens, whole, n_windows, batch_size, block_size, objective, rng, vocab_size):
    """An evaluation's batches (x, y) of batch_size windows: with whole, every window of the split
    once (every_window; the targets that the window before already predicted are -1), else n_windows
    at random offsets drawn with rng. A last batch of fewer windows is filled up with rows of no
    target (y = -1): every batch has one shape, which a compiled model compiles once."""
    offsets, overlap = (every_window(len(tokens), block_size) if whole else
                        (random_offsets(rng, len(tokens), block_size, n_windows), 0))
    for start in range(0, len(offsets), batch_size):
        x, y = batch_at(tokens, offsets[start:start + batch_size], block_size, objective, rng, vocab_size)
        if start + batch_size >= len(offsets):
            y[-1, :overlap] = -1  # predicted already by the window before
        empty = batch_size - len(x)
        yield np.pad(x, ((0, empty), (0, 0))), np.pad(y, ((0, empty), (0, 0)), constant_values=-1)


def split_batch(batch_size, gradient_accumulation_steps, world_size):
    """The global batch of one optimizer step is batch_size * gradient_accumulation_steps
    sequences, whatever the number of processes. Each of world_size processes takes an equal
    share, in the fewest equal micro-batches of at most batch_size sequences (the most a
    forward pass holds). Returns (micro_batch, micro_steps); ValueError when the global batch
    does not split into world_size equal shares."""
    total = batch_size * gradient_accumulation_steps
    if total % world_size:
        raise ValueError(f"the global batch of {total} sequences (batch_size {batch_size} x "
                         f"gradient_accumulation_steps {gradient_accumulation_steps}) does not split over "
                         f"{world_size} processes; make it a multiple of {world_size}")
    share = total // world_size
    micro_steps = -(-share // batch_size)  # ceil
    while share % micro_steps:
        micro_steps += 1
    return share // micro_steps, micro_steps


def windows(tokens, offsets, block_size):
    """x = tokens[i : i+T], y = tokens[i+1 : i+T+1] for each offset i, as int64 arrays (B, T)."""
    x = np.stack([tokens[i:i + block_size] for i in offsets]).astype(np.int64)
    y = np.stack([tokens[i + 1:i + 1 + block_size] for i in offsets]).astype(np.int64)
    return x, y


def mask_tokens(x, rng, vocab_size, rate=0.15):
    """BERT's corruption: choose `rate` of the positions as targets; of those, 80% become
    MASK_TOKEN, 10% a random token, 10% stay. A row left with no target (likely in a short one:
    0.85^8 = 27% of rows of 8) gets one at a random position, or its loss would be 0/0.
    Returns (inputs, targets) with targets -1 (ignored by the loss) at the positions not chosen."""
    chosen = rng.random(x.shape) < rate
    empty = np.flatnonzero(~chosen.any(axis=1))
    chosen[empty, rng.integers(0, x.shape[1], len(empty))] = True
    action = rng.random(x.shape)
    inputs = np.where(chosen & (action < 0.8), MASK_TOKEN, x)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), rng.integers(0, vocab_size, x.shape), inputs)
    return inputs, np.where(chosen, x, -1)


def target_positions(offsets, y, causal):
    """Where in the split the targets of a batch are: window i predicts tokens offsets[i]+1 ..
    offsets[i]+T when causal, and only its masked positions offsets[i]+t (y >= 0) when not."""
    positions = offsets[:, None] + np.arange(y.shape[1]) + (1 if causal else 0)
    return positions[y >= 0]


def bits_per_byte(loss, n_tokens, n_bytes):
    """A mean loss in nats per token over a text of n_tokens tokens and n_bytes UTF-8 bytes, in
    bits per byte: loss * n_tokens / n_bytes / ln 2 (the total nats, over the bytes, in bits)."""
    return loss * n_tokens / n_bytes / math.log(2)
