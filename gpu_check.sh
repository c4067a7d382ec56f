#!/usr/bin/env bash
# What the CPU could not prove, in one command on a CUDA machine (about 7 minutes on one
# H100-class GPU), written to one JSON file (default gpu_check.json):
#   1. the test suite on CUDA: the Triton kernels compiled and run for real, the CUDA-only tests;
#   2. the Triton kernels against their PyTorch references, and a training step zip2zip against
#      plain, masked against unmasked (bench.py);
#   3. decoding, zip2zip against plain at batch 1 and 8, eager and with the compiled step (one
#      CUDA graph replay a step), with the ops a step dispatches;
#   4. 100 steps of the default GPU job (train.py's defaults: bf16, compiled blocks) with compile
#      on and off: steps/s, MFU and the loader's headroom from the log.
#
#     bash gpu_check.sh [out.json]
#
# GPU_CHECK_SMOKE=1 runs the same plumbing on the CPU with tiny settings and no test suite (the
# project's tests do, so that this command works the day a GPU runs it).
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-gpu_check.json}
work=$(mktemp -d)
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    device=cpu; bench=(--quick=True); steps=2
    job=(--n_layer=1 --n_head=2 --n_embd=16 --block_size=32 --batch_size=2 --gradient_accumulation_steps=1
         --eval_windows=2 --loader=sync --dataset=prose --log_interval=1)
else
    device=cuda; bench=(); steps=100; job=(--eval_windows=32)
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device here')"
    start=$SECONDS
    python -m pytest -q tests --junitxml="$work/tests.xml" > "$work/tests.txt" 2>&1 || true
    echo "tests: $(tail -n 1 "$work/tests.txt") ($((SECONDS - start)) s)"
fi
python bench.py --device=$device --parts=kernels,train --rounds=3 "${bench[@]}" --json="$work/bench.json"
python bench.py --device=$device --parts=decode "${bench[@]}" --json="$work/decode.json"
python bench.py --device=$device --parts=decode --compile=True "${bench[@]}" --json="$work/decode_compiled.json"
for compile in True False; do
    python train.py --device=$device --max_iters=$steps --eval_interval=$steps --log_interval=10 --sample_tokens=64 \
        --max_seconds=0 --compile=$compile "${job[@]}" --out_dir="$work/train_$compile" | tee "$work/train_$compile.txt"
done
python - "$work" "$out" <<'PY'
import json, os, re, sys, xml.etree.ElementTree as ET
work, out = sys.argv[1:]
read = lambda name: json.load(open(os.path.join(work, name)))
report = {"bench": read("bench.json"), "decode": read("decode.json")["decode"],
          "decode_compiled": read("decode_compiled.json")["decode"], "train": {}}
if os.path.exists(os.path.join(work, "tests.xml")):
    suite = ET.parse(os.path.join(work, "tests.xml")).getroot().find("testsuite")
    report["tests"] = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    report["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None]
for compile in ("True", "False"):
    text = open(os.path.join(work, f"train_{compile}.txt")).read()
    lines = re.findall(r"iter (\d+): .*?, (\d+) ms, ([\d,]+) codes/s, ([\d,]+) bytes/s, ([\d.,]+) ([GT]FLOP/s)"
                       r"(?: \(MFU ([\d.]+)%\))?(?:, loader ([\d.]+)x)?", text)
    report["train"][f"compile_{compile}"] = [
        {"iter": int(i), "ms": int(ms), "codes_per_s": float(c.replace(",", "")), "bytes_per_s": float(b.replace(",", "")),
         "flops": f"{f} {unit}", "mfu_percent": float(mfu) if mfu else None, "loader_headroom": float(h) if h else None}
        for i, ms, c, b, f, unit, mfu, h in lines]
    report["train"][f"compile_{compile}_val"] = read(f"train_{compile}/log.json")["evals"][-1]
json.dump(report, open(out, "w"), indent=1)
print(f"gpu_check: wrote {out}")
PY
