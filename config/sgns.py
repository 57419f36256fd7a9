# Skip-gram with negative sampling on the book:  python embeddings.py config/sgns.py
method = 'sgns'
out_dir = 'out-sgns'
dim = 256          # the n_embd of the CPU GPT config, so the W_E matrices have the same shape
window = 5         # each word draws a span of 1..5 tokens on each side
epochs = 15
batch_size = 1024
lr = 0.05          # SGD, decaying linearly to 0
negatives = 5
subsample = 1e-3
