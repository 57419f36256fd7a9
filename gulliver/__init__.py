"""
The helpers of the scripts at the top of the repository: what they share, one concern a module.
Nothing here is run directly, and nothing here imports a script.

    atomic        files written whole or not at all (temporary file, fsync, os.replace)
    checkpoint    ckpt.pt and best.pt: what they hold, writing, loading and the rules of a resume
    circuits      inside the model: residual stream, logit lens, layer-0 query-key decomposition
    comparison    the studies of analyze.py's --compare report: several tables side by side
    configurator  settings from config files and --key=value, each held to a rule
    data          token files, the training sampler, evaluation batches, bits per byte
    download      one careful HTTP download (timeouts, retries, no partial file)
    machine       what this machine does fastest, measured: matmul peak, CPU dtype, decode dtype
    onset         when and why W_pos takes shape: its snapshots, and its gradient's signal and noise
    optim         Muon, and the optimizer step that a non-finite gradient skips on the device
    pretrained    GPT-2 in the Hugging Face format, read and written
    processes     torchrun's ranks, the clock and stop they agree on, the signals that stop a run
    report        figures, tables and plain values for analyze.py's report
    runlog        log.jsonl, loss.png and the W_E / W_pos snapshots of a run
    schedule      training progress and the learning rate that goes with it
    sections      the studies of analyze.py's report on one model: each computed, then written up
    tokenizer     the GPT-2 BPE from the vendored ranks file
"""
