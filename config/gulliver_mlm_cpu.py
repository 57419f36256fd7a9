# The CPU model of config/gulliver_cpu.py as a BERT-style masked LM: bidirectional attention,
# 15% of positions chosen and predicted (80% of them replaced by <|endoftext|>, which never
# occurs in the book and so serves as the mask token, 10% by a random token, 10% kept).
# python train.py config/gulliver_mlm_cpu.py
exec(open('config/gulliver_cpu.py').read())  # the same shape, budget and schedule
out_dir = 'out-gulliver-mlm-cpu'
objective = 'mlm'
snapshot_interval = None
