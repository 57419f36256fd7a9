# Skip-gram with negative sampling on the book:  python embeddings.py config/sgns.py
# (epochs, batch size and learning rate: embeddings.METHOD_DEFAULTS; dim 256, the n_embd of the CPU GPT config)
method = 'sgns'
out_dir = 'out-sgns'
