# The best model this 2-core CPU trains in under 5 minutes, evaluations included.
# python train.py config/gulliver_cpu.py
out_dir = 'out-gulliver-cpu'
eval_interval = 100
log_interval = 10
eval_iters = 20
snapshot_interval = 50

n_layer = 4
n_head = 4
n_embd = 256
block_size = 128
batch_size = 8
dropout = 0.0

learning_rate = 1e-3
max_iters = 350
lr_decay_iters = 350
warmup_iters = 20
min_lr = 1e-4
