# Adapt GPT-2 (124M, released weights) to zip2zip on the code data, with LoRA: adapters of rank
# 16 on every attention and MLP linear, the new hyper-encoder and reconstruction head trained in
# full, everything else frozen. Needs a GPU, `pip install transformers`, and the network once.
#   python train.py config/adapt_gpt2.py            (--lora_rank=0: full fine-tuning)
init_from = "gpt2"          # also gpt2-medium, gpt2-large, gpt2-xl
out_dir = "out-adapt-gpt2"
max_subtokens = 4
block_size = 1024
dropout = 0.0
lora_rank = 16
lora_alpha = 32.0
batch_size = 8
gradient_accumulation_steps = 4
learning_rate = 3e-4        # adapters and a new encoder: lower than pretraining
min_lr = 3e-5
warmup_iters = 50
max_iters = 1000
eval_interval = 200
