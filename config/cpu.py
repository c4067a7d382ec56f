# The CPU job: what `python train.py` runs on a machine without CUDA (applied automatically,
# before the command line). About 10 minutes on 2 cores, 8 of them training. The output layer
# (50257 x n_embd) costs most of each step at this size, so the model is narrow, and a time
# budget (not a step count) ends the run and its learning-rate schedule.
out_dir = "out-cpu"
block_size = 256            # codes: ~550 base tokens of code at M=4
batch_size = 4              # small batches, more steps: ~400 steps in the time (M=4)
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0               # a fraction of one pass over the data: nothing to regularise
bias = False
recon_max_entries = 32      # each entry costs M rows of output-layer logits; a sample is enough
learning_rate = 2e-3        # a small model and few steps: a high rate
min_lr = 2e-4
warmup_iters = 20
max_iters = 100000          # not reached: max_seconds ends the run
max_seconds = 480.0
eval_interval = 100
eval_windows = 96           # 96 x 256 base tokens: ~50 kB of pycode val
sample_tokens = 128
# Measured on 2 shared cores, 60 s, M=4 (codes/s): thread loader 455 (torch on 2 threads),
# 375 (1 thread); sync 355; process 340 (1 thread), 162 (2 threads: a third busy process
# makes torch's two OpenMP threads wait on each other). The GPU default stays "process".
loader = "thread"
num_workers = 1
compile = False             # compiling costs more than it saves in 8 minutes on a CPU
