# The original experiment, on one GPU: GPT-2 small (124M) trained from scratch on the book.
# python train.py config/gulliver.py
out_dir = 'out-gulliver'
data_dir = 'data/gulliver'
eval_interval = 100
log_interval = 100
eval_iters = 20
snapshot_interval = 100

n_layer = 12
n_head = 12
n_embd = 768
block_size = 256
batch_size = 32
dropout = 0.1

learning_rate = 6e-4
max_iters = 500
warmup_iters = 50
min_lr = 6e-5
