"""
How the task YAMLs in this folder load their JSONL files, from any current directory.

lm-eval 0.4.13 passes dataset_kwargs straight to datasets.load_dataset, which reads a relative
data_files path from the current directory, not from the YAML's folder: `lm_eval --include_path
tasks` run anywhere but the repository root would not find the files. So each YAML names this
function as its custom_dataset (`!function local_data.load`, found next to the YAML), and lm-eval
calls it with the YAML's dataset_kwargs (and its metadata); it reads the files relative to this
folder. It builds the dataset in memory: nothing is downloaded or written to a datasets cache.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_files, **metadata):
    """{split: file name in this folder} -> a DatasetDict {split: Dataset of the file's records}.
    OSError naming tasks/prepare.py if a file is missing."""
    import datasets
    splits = {}
    for split, name in data_files.items():
        path = HERE / name
        if not path.exists():
            raise OSError(f"{path} is missing: restore it with git checkout or run python tasks/prepare.py")
        with open(path, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f])
    return datasets.DatasetDict(splits)
