"""What the scripts share, apart from the method (zip2zip.py): settings, one-line errors and
checkpoint loading (cli), the method's input checks (checks), the out_dir's checkpoints, log and
lock (outdir), training batches (loader), speed and MFU (meter), LoRA and GPT-2 weights (adapt)."""
