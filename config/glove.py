# GloVe on the book:  python embeddings.py config/glove.py
method = 'glove'
out_dir = 'out-glove'
dim = 256          # the n_embd of the CPU GPT config, so the W_E matrices have the same shape
window = 5         # co-occurrences weighted 1/d up to 5 tokens apart
epochs = 25
batch_size = 4096
lr = 0.05          # AdaGrad, decaying linearly to 0
x_max = 100.0
alpha = 0.75
