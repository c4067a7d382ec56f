# Add hypertokens (M=4) to the plain CPU model (python train.py config/plain_cpu.py first):
# every weight of the plain model is loaded, the hyper-encoder is new. On top of config/cpu.py.
#   python train.py config/adapt_cpu.py
init_from = "out-plain-cpu"
out_dir = "out-adapt-cpu"
max_subtokens = 4
learning_rate = 1e-3        # the trunk is trained already: a gentler peak than from scratch
min_lr = 1e-4
warmup_iters = 20
max_seconds = 240.0         # half the budget of pretraining
