# The plain GPT baseline of the CPU job (on top of config/cpu.py, applied first without CUDA):
# the same code and settings with max_subtokens=1, i.e. no hypertokens at all.
#   python train.py config/plain_cpu.py
out_dir = "out-plain-cpu"
max_subtokens = 1
