# The best model a 2-core CPU trains in 5 minutes, start-up and final evaluation included, on
# any CPU. Nothing here is tuned to one processor: the run stops after max_seconds of training
# and the learning rate decays to min_lr on that clock (a fast CPU takes more steps, a slow one
# fewer), and dtype 'auto' times the vocabulary head in fp32 and in bf16 before it picks (bf16
# on CPUs with bf16 matrix units, fp32 where bf16 is emulated).
# python train.py config/gulliver_cpu.py
out_dir = 'out-gulliver-cpu'
eval_interval = 200
log_interval = 10
eval_iters = 20     # the train loss: the same 20 batches of 1,024 tokens at every evaluation; val: all of it
snapshot_interval = 50

n_layer = 4
n_head = 4
n_embd = 256
block_size = 128   # steps of 1,024 tokens ran 15-35% faster per token than steps of 2,048 on the CPU
batch_size = 8
dropout = 0.0      # dropout costs ~20% of the step here; the budget buys more steps instead
dtype = 'auto'

optimizer = 'muon'  # the blocks' matrices; W_E, W_pos, biases and gains stay with AdamW (gulliver/optim.py)
learning_rate = 1.5e-3
beta2 = 0.99       # a small batch: a longer memory for the second moment
max_seconds = 260  # + 10-30 s of start-up and final evaluation, by the CPU (4 min 45-53 s in all on the slowest met)
max_iters = 20000  # an upper bound that a 2-core CPU does not reach within max_seconds
warmup_iters = 50
min_lr = 1e-4
cooldown = 0.3     # the peak until 70% of the run, then a line to min_lr: 0.08-0.09 lower val than a cosine
