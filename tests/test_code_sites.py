"""Where the code loads models and deletes files: only at the sites ``docs/reliability.md`` (part B, "What was
checked") lists, each with its rule. A new site fails here until it is added there, with its rule."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    [*ROOT.glob("reid_core/**/*.py"), *ROOT.glob("jobs/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("devstack/*.py")]
)

MODEL_LOADS = re.compile(r"\bmlflow\.(?:pytorch|pyfunc|models)\.load_model\(|\bmlflow\.\w+\.load_model\(")
DELETES = re.compile(
    r"\brmtree\(|\bos\.(?:remove|unlink|rmdir|removedirs)\(|\.unlink\(|\.rm\(|\.rm_file\(|\.rmdir\(|delete_objects?\b"
    r"|\bdelete_files\("
)

# file -> how many matches it may hold (each listed in docs/reliability.md with its rule)
ALLOWED_MODEL_LOADS = {"reid_core/tracking.py": 1}  # tracking.load_pytorch_model, after check_model_files
ALLOWED_DELETES = {
    "reid_core/storage.py": 2,  # delete_files: its definition and its fs.rm of exactly the URLs it is given
    "reid_core/tracking.py": 1,  # the model's code folder in load_pytorch_model's own temporary download
    "devstack/stack.py": 2,  # Stack.down: the stack's own state and env files, and the sockets of the SeaweedFS it started
    "reid_core/workflows/packing.py": 1,  # the old pack's files, as shards.pack_files lists them (write_pack)
    "reid_core/workflows/distractors.py": 1,  # the old set's files, as check_output accepts them
    "reid_core/workflows/node_check.py": 1,  # its own previous gpu_check.json, the one name it writes
}


def matches(pattern: re.Pattern) -> dict[str, int]:
    found: dict[str, int] = {}
    for path in SOURCES:
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())  # comments do not count
        code = re.sub(r'"""(?:.|\n)*?"""', "", code)  # nor docstrings
        n = len(pattern.findall(code))
        if n:
            found[str(path.relative_to(ROOT))] = n
    return found


def test_models_are_loaded_only_through_the_checked_loader():
    assert matches(MODEL_LOADS) == ALLOWED_MODEL_LOADS


def test_files_are_deleted_only_at_the_listed_sites():
    assert matches(DELETES) == ALLOWED_DELETES
