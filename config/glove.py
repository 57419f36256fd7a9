# GloVe on the book:  python embeddings.py config/glove.py
# (epochs, batch size and learning rate: embeddings.METHOD_DEFAULTS; dim 256, the n_embd of the CPU GPT config)
method = 'glove'
out_dir = 'out-glove'
