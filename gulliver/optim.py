"""
The optimizers' side of a training step: Muon for the blocks' matrices, and step_unless, the
step that a non-finite loss or gradient skips on the device.

Muon: momentum, orthogonalised, for the 2-D weight matrices of the blocks.

For a weight W (m x n) with gradient G, one step is

    B = mu B + (1 - mu) G                    momentum (an exponential average)
    U = orth((1 - mu) G + mu B)              Nesterov: the update looks one step ahead
    W = (1 - lr wd) W - lr 0.2 sqrt(max(m, n)) U

where orth(M) replaces M = U S V^T by about U V^T: every direction the update moves gets a
step of about the same size, however small its singular value. 0.2 sqrt(max(m, n)) scales the
update to the RMS that AdamW's updates have, so one learning rate serves both optimizers.

orth runs five steps of a quintic Newton-Schulz iteration, X <- a X + (b A + c A^2) X with
A = X X^T, from X = M / |M|_F. The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) raise
every singular value that is not tiny into about [0.7, 1.2] in five steps, not to exactly 1,
which training does not need. These are matrix products of the weight's size, so their dtype
matters on the CPU: bf16 halves the work where a CPU has bf16 units, and is many times slower
where it emulates bf16 (the CPU config's Muon step, one thread: 9.2 s there against 0.34 s in
fp32). So the dtype is the run's: train.py passes bf16 when it trains in bf16, fp32 otherwise.

With ns_dtype bf16 the arithmetic is that of torch.optim.Muon(adjust_lr_fn='match_rms_adamw'),
step for step (tests/test_model.py checks they are equal).
"""
import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(M, steps=5, dtype=torch.bfloat16, eps=1e-7):
    """About U V^T for M = U S V^T, by the Newton-Schulz iteration above, computed in dtype."""
    a, b, c = NS_COEFFICIENTS
    X = M.to(dtype)
    tall = M.size(0) > M.size(1)
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller Gram matrix
        X = X.T
    X = X / X.norm().clamp(min=eps)  # every singular value now <= 1
    for _ in range(steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (see the module docstring). ns_dtype: the dtype of the
    Newton-Schulz products, a property of the machine and not of the run, so it is kept out
    of the state dict: a run resumed on another CPU takes that CPU's."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, skip=None):
        """One step for every parameter with a gradient. skip: None, or a 0-d flag on the parameters'
        device (1.0 or 0.0) that skips the step where it is 1. The step computes the new momentum B'
        and weight W' aside and writes B <- where(skip, B, B'), W <- where(skip, W, W'): the flag is
        selected on, never read on the host, and nothing is copied before the step. (A blend
        W + (1 - skip)(W' - W) cannot skip: a skipped step's gradient is not finite, and NaN * 0 is
        NaN.) A buffer that a skipped first step creates stays zeros, how Muon starts it."""
        keep = None if skip is None else skip.bool()
        for group in self.param_groups:
            lr, mu = group['lr'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p)
                buffer = state['momentum_buffer']
                new_buffer = buffer.lerp(p.grad, 1 - mu)
                update = orthogonalize(p.grad.lerp(new_buffer, mu), group['ns_steps'], self.ns_dtype)
                new_p = p.mul(1 - lr * group['weight_decay'])
                new_p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
                for old, new in ((buffer, new_buffer), (p, new_p)):
                    if keep is None:
                        old.copy_(new)
                    else:
                        torch.where(keep, old, new, out=old)


def step_unless(optimizers, skip):
    """Step every optimizer, except where skip (a 0-d float32 tensor on the parameters' device,
    1.0 or 0.0) is 1: then the parameters and the optimizer state stay exactly as they were.
    Decided on the device: skip is never read on the host, so the CPU does not wait here for
    the backward pass to finish. Fused AdamW takes skip as its found_inf flag and leaves
    everything untouched (its step count included); Muon takes it as step(skip=...), which
    selects between the old values and the new on the device. Any other optimizer has neither,
    and its step raises a TypeError at the unexpected keyword."""
    for opt in optimizers:
        if opt.defaults.get('fused'):
            opt.grad_scale, opt.found_inf = None, skip
            opt.step()
            del opt.grad_scale, opt.found_inf
        else:
            opt.step(skip=skip)


class SkippedSteps:
    """The steps that step_unless skipped, counted on the device: update(skip) after every step
    queues three tiny kernels and reads nothing, so the host never waits for the step there;
    read() brings the counts to the host, at a log, eval or stop iteration."""

    def __init__(self, device, iter_num):
        self.in_a_row, self.longest, self.since_read = (torch.zeros((), device=device) for _ in range(3))
        self.read_at = iter_num  # the iteration of the last read

    def update(self, skip):
        """skip: the step's 0-d flag, 1.0 where it was skipped."""
        self.in_a_row = (self.in_a_row + 1) * skip
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.since_read += skip

    def read(self, iter_num):
        """(steps skipped since the last read, the longest run of them in a row, the steps since the last
        read); a run of skips that goes on across a read counts whole at the next."""
        skipped, longest, steps = (int(self.since_read.item()), int(self.longest.item()),
                                   iter_num - self.read_at)
        self.since_read.zero_()
        self.longest.zero_()
        self.read_at = iter_num
        return skipped, longest, steps
