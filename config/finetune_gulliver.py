# Fine-tune the pretrained GPT-2 (124M) on the book, starting from the Hugging Face weights.
# python train.py config/finetune_gulliver.py
out_dir = 'out-gulliver-finetune'
init_from = 'gpt2'
eval_interval = 20
log_interval = 5
eval_iters = 20
always_save_checkpoint = False   # keep only the checkpoint with the best val loss

block_size = 256
batch_size = 8
gradient_accumulation_steps = 4
dropout = 0.1

learning_rate = 3e-5
decay_lr = False
max_iters = 100
