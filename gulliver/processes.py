"""
The processes of a training run: the ranks that torchrun starts (one process without it), the clock
and stop flag they agree on at every step, the signals that stop a run, and their end together.

Ctrl-C (SIGINT) or SIGTERM, what torchrun, Slurm and Kubernetes send, asks a run to finish its step,
save and stop; a second signal exits at once. The checkpoint on disk is whole either way (a save
writes a temporary file and renames it). Under DDP a signal reaches one rank or all: the ranks
agree at every step, so all of them stop after the same one.
"""
import os
import signal
import sys

import torch


def start_processes(device, backend):
    """This process's place among those torchrun started (RANK, LOCAL_RANK and WORLD_SIZE in the
    environment; one process without them): (ddp, rank, world_size, device, host_group). Under DDP on
    CUDA each rank takes its own GPU, the processes talk over backend, and host_group, over gloo, is
    where they agree on things the host holds (the clock, a stop): an all-reduce of a GPU tensor
    would make the host wait for the GPU. On the CPU every group is gloo, and host_group None."""
    if 'RANK' not in os.environ:
        return False, 0, 1, device, None
    cuda = device.startswith('cuda')
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend if cuda else 'gloo')
    host_group = torch.distributed.new_group(backend='gloo') if cuda else None
    return True, int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device, host_group


def agree(elapsed, stop, master, group):
    """One all-reduce (max) a step over group: rank 0's clock (the others send 0), and whether any
    rank was signalled. Over gloo, on the CPU: an all-reduce of a GPU tensor makes the host wait."""
    shared = torch.tensor([elapsed if master else 0.0, stop], dtype=torch.float64)
    torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX, group=group)
    return shared[0].item(), shared[1].item() > 0


class StopSignals:
    """Catches SIGINT and SIGTERM once installed: .name is then the name of the first signal that
    asked this process to stop (None before), and a second signal exits at once."""

    def __init__(self):
        self.name = None

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        if self.name:
            sys.exit(f"{signal.Signals(signum).name} again: exiting now, without saving")
        self.name = signal.Signals(signum).name
        notice = f"\n{self.name}: finishing this step, then saving\n"
        os.write(sys.stderr.fileno(), notice.encode())  # not print(): the handler may interrupt a print


def end_processes(model):
    """Tear the ranks down together, then leave at once: everything is written, and gloo's transport
    threads, left to the interpreter's own exit, sometimes abort it ("terminate called ...")."""
    torch.distributed.barrier()
    del model  # DDP's reducer holds the process group
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
