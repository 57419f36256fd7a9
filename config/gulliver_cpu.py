# The best model this 2-core CPU trains in under 5 minutes, evaluations included.
# python train.py config/gulliver_cpu.py
# Most of a step is the 50,257-wide vocabulary head, so the levers are there: bf16 autocast
# (this CPU multiplies bf16 matrices about 5x faster than fp32), a padded vocabulary, fused
# AdamW, and an allocator that keeps freed memory (set by train.py on the CPU).
out_dir = 'out-gulliver-cpu'
eval_interval = 100
log_interval = 10
eval_iters = 20
snapshot_interval = 50

n_layer = 4
n_head = 4
n_embd = 256
block_size = 256
batch_size = 8
dropout = 0.0      # dropout costs ~20% of the step here; the budget buys more steps instead
dtype = 'bfloat16'

learning_rate = 2e-3
max_iters = 400
lr_decay_iters = 400
warmup_iters = 50
min_lr = 1e-4
