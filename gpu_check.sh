#!/usr/bin/env bash
# What the CPU could not prove, in one command on a CUDA machine (about 10 minutes on one
# H100-class GPU), written to one JSON file (default gpu_check.json):
#   1. the test suite on CUDA: the Triton kernels compiled and run for real, the CUDA-only tests
#      (among them the compiled decoding step against the eager one, in fp32 and bf16);
#   2. the Triton kernels against their PyTorch references, and a training step zip2zip against
#      plain, masked against unmasked (bench.py), at the default GPU model's sizes;
#   3. decoding, zip2zip against plain at batch 1 and 8, eager and with the compiled step (one
#      CUDA graph replay a step), with the ops a step dispatches; prefill, the KV cache's bytes per
#      byte of text and end to end, eager and compiled;
#   4. 100 steps of the default GPU job (train.py's defaults: bf16, compiled blocks) with compile
#      on and off: steps/s, MFU and the loader's headroom from the log.
# Each part runs on its own: one that fails is recorded in the JSON ("parts": its exit status and
# the end of its output) and the next one runs.
#
#     bash gpu_check.sh [out.json]
#
# GPU_CHECK_SMOKE=1 runs the same plumbing on the CPU with tiny settings and no test suite (the
# project's tests do, so that this command works the day a GPU runs it).
set -uo pipefail    # not -e: a failing part must not end the others
cd "$(dirname "$0")"
out=${1:-gpu_check.json}
work=$(mktemp -d)

part() {    # part NAME COMMAND...: its output in $work/NAME.txt, its exit status in $work/NAME.rc
    local name=$1 start=$SECONDS
    shift
    "$@" > "$work/$name.txt" 2>&1
    echo $? > "$work/$name.rc"
    echo "$name: exit status $(cat "$work/$name.rc"), $((SECONDS - start)) s"
}

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    device=cpu; bench=(--quick=True); steps=2
    job=(--n_layer=1 --n_head=2 --n_embd=16 --block_size=32 --batch_size=2 --gradient_accumulation_steps=1
         --eval_windows=2 --loader=sync --dataset=prose --log_interval=1)
else
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device here')" || exit 1
    # the default GPU job's model (train.py's TrainConfig), where a step is the GPU's work, not launches
    device=cuda; steps=100; job=(--eval_windows=32)
    bench=(--n_layer=8 --n_head=8 --n_embd=512 --block_size=1024 --train_batch_size=16)
    part tests python -m pytest -q tests --junitxml="$work/tests.xml"
fi
part bench python bench.py --device=$device --parts=kernels,train --rounds=3 "${bench[@]}" --json="$work/bench.json"
part decode python bench.py --device=$device --parts=decode --rounds=3 "${bench[@]}" --json="$work/decode.json"
part decode_compiled python bench.py --device=$device --parts=decode --rounds=3 --compile=True "${bench[@]}" \
    --json="$work/decode_compiled.json"
for compile in False True; do   # prefill, KV memory and end to end, eager and with the compiled step
    part "efficiency_$compile" python bench.py --device=$device --parts=prefill,memory,e2e --rounds=3 \
        --compile=$compile "${bench[@]}" --json="$work/efficiency_$compile.json"
done
for compile in True False; do
    part "train_$compile" python train.py --device=$device --max_iters=$steps --eval_interval=$steps \
        --log_interval=10 --sample_tokens=64 --max_seconds=0 --compile=$compile "${job[@]}" \
        --out_dir="$work/train_$compile"
done
python - "$work" "$out" <<'PY'
import json, os, re, sys, xml.etree.ElementTree as ET
work, out = sys.argv[1:]
path = lambda name: os.path.join(work, name)
report, parts = {}, {}
for rc in sorted(f for f in os.listdir(work) if f.endswith(".rc")):      # the parts that ran
    name = rc[:-3]
    parts[name] = {"exit_status": int(open(path(rc)).read())}
    if parts[name]["exit_status"]:
        parts[name]["output_tail"] = open(path(name + ".txt"), errors="replace").read()[-3000:]
report["parts"] = parts
for name in ("bench", "decode", "decode_compiled", "efficiency_False", "efficiency_True"):
    if parts.get(name, {}).get("exit_status") == 0:
        figures = json.load(open(path(name + ".json")))
        report[name] = figures["decode"] if name.startswith("decode") else figures
if os.path.exists(path("tests.xml")):      # written even when some tests fail
    suite = ET.parse(path("tests.xml")).getroot().find("testsuite")
    report["tests"] = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    report["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None]
for compile in ("True", "False"):
    if f"train_{compile}" not in parts:
        continue
    text = open(path(f"train_{compile}.txt"), errors="replace").read()
    lines = re.findall(r"iter (\d+): .*?, (\d+) ms, ([\d,]+) codes/s, ([\d,]+) bytes/s, ([\d.,]+) ([GT]FLOP/s)"
                       r"(?: \(MFU ([\d.]+)%\))?(?:, loader ([\d.]+)x)?", text)
    report.setdefault("train", {})[f"compile_{compile}"] = [
        {"iter": int(i), "ms": int(ms), "codes_per_s": float(c.replace(",", "")), "bytes_per_s": float(b.replace(",", "")),
         "flops": f"{f} {unit}", "mfu_percent": float(mfu) if mfu else None, "loader_headroom": float(h) if h else None}
        for i, ms, c, b, f, unit, mfu, h in lines]
    log = path(f"train_{compile}/log.json")
    evals = json.load(open(log))["evals"] if os.path.exists(log) else []
    if evals:
        report["train"][f"compile_{compile}_val"] = evals[-1]
json.dump(report, open(out, "w"), indent=1)
failed = [name for name, p in parts.items() if p["exit_status"]]
print(f"gpu_check: wrote {out}" + (f"; failed: {', '.join(failed)} (see \"parts\" in it)" if failed else ""))
sys.exit(1 if failed else 0)
PY
