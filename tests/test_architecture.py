"""The layering rules of docs/architecture.md, checked on the code as it is.

import-linter's contracts (pyproject.toml, also run by `make lint`) cover the imports inside ``reid_core``; this file
runs them and adds what import-linter does not check: the jobs' own imports, private names used across modules, and
references to files outside the repository.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted([*ROOT.glob("reid_core/**/*.py"), *ROOT.glob("jobs/*.py")])
# Only these modules may import these packages (docs/architecture.md, "Where the rules are enforced").
OWNERS = {
    "mlflow": {"reid_core/tracking.py"},
    "s3fs": {"reid_core/storage.py"},
    "boto3": {"reid_core/storage.py"},
    "botocore": {"reid_core/storage.py"},
    "pyarrow": {"reid_core/storage.py"},
    "obstore": {"reid_core/storage.py"},
}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import statement in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    kept = re.findall(r"^(.+) KEPT$", result.stdout, flags=re.M)
    assert len(kept) >= 6, result.stdout  # every contract of pyproject.toml ran


def test_only_the_io_modules_import_mlflow_and_object_storage_jobs_included():
    offenders = []
    for path in PRODUCT:
        rel = path.relative_to(ROOT).as_posix()
        for module, _, line in _imports(path):
            top = module.split(".")[0]
            if top in OWNERS and rel not in OWNERS[top]:
                offenders.append(f"{rel}:{line} imports {module}")
    assert PRODUCT and not offenders, "\n".join(offenders)


def test_no_private_names_across_modules():
    """``from reid_core.x import _name`` and ``module._name`` on an imported reid_core module are refused."""
    offenders = []
    for path in sorted([*PRODUCT, *ROOT.glob("devstack/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reid_core"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
                    aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("reid_core"):
                        aliases.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not offenders, "\n".join(offenders)


def test_nothing_refers_outside_the_repository():
    """A user clones only this repository: no file may send the reader to the team's notes beside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked
    pattern = re.compile(r"\.\./shared|\b(?:METHOD|DESIGN|STYLE|STACK-NOTES)\.md\b")
    offenders = []
    for rel in tracked:
        path = ROOT / rel
        if path.suffix in {".png", ".jpg"} or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_the_method_and_the_architecture_are_documented_in_the_repository():
    for name, must_mention in {
        "docs/method.md": ("Δ", "λ1", "weighted", "critic", "CondenseNet", "Dual-Stream", "LSRO", "mINP"),
        "docs/architecture.md": ("storage.py", "tracking.py", "make lint", "ray job submit", "devstack", "workflows"),
    }.items():
        text = (ROOT / name).read_text()
        missing = [word for word in must_mention if word not in text]
        assert not missing, f"{name} does not mention {missing}"


# Files that still import a job in process; each is to call a workflow instead (issue #14, "thin jobs").
JOB_IMPORTS_NOT_YET_MOVED: set[str] = set()


def test_nothing_imports_a_job():
    """A job is argparse, the summary and one workflow call: its logic lives in ``reid_core/workflows``, which tests
    call directly. Tests may run a job (a subprocess, ``ray job submit``, ``runpy`` as ``__main__``), never import it:
    no ``jobs/`` on ``sys.path``, no job file loaded as a module, no ``import <job>``."""
    jobs = {path.stem for path in ROOT.glob("jobs/*.py")}
    offenders = []
    sources = [*ROOT.glob("reid_core/**/*.py"), *ROOT.glob("jobs/*.py"), *ROOT.glob("devstack/*.py"),
               *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]  # fmt: skip
    for path in sorted(sources):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                named = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named = [node.module.split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                loads = node.func.attr in ("spec_from_file_location", "import_module")
                if not loads and node.func.attr not in ("insert", "append"):
                    continue  # ast.get_source_segment re-splits the file: only for the calls that matter
                call = ast.get_source_segment(text, node) or ""
                extends = not loads and call.startswith("sys.path.")
                named = ["jobs"] if (loads or extends) and re.search(r"\bjobs\b", call) else []
            else:
                continue
            if set(named) & (jobs | {"jobs"}):
                offenders.append(f"{rel}:{node.lineno}: {ast.get_source_segment(text, node)}")
    left = [o for o in offenders if o.split(":")[0] not in JOB_IMPORTS_NOT_YET_MOVED]
    assert not left, "\n".join(left)
