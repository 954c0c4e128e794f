"""Generate the checked-in Python stubs from protos/ (``make protos``); ``--check`` fails when they are stale.

``--baseline`` rewrites tools/protos_baseline.json, the image of the released contract that ``buf breaking``
holds every later change to (``make protos-baseline``; see docs/api.md, "The contract"). Why a checked-in
baseline and not only ``--against .git#branch=main``: CI tests a clone of main itself, where comparing main with
main proves nothing; the baseline still catches a break that any commit since the last release made. Refresh it
only when releasing: additive changes pass without a refresh, a refresh makes them part of the frozen contract.

Only protos/loraplex is generated: protos/google/rpc is vendored for other languages' clients, and Python takes
those types from googleapis-common-protos.

Why the stubs live in ``registry/v1`` and ``engine/v1``: protoc names Python modules after the proto package,
so ``loraplex.registry.v1`` stubs import as ``loraplex.registry.v1.registry_service_pb2`` — exactly where the
namespace mapping installs ``registry/v1``. No import rewriting is needed.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# proto package folder -> checked-in destination
TARGETS = {
    Path("loraplex/registry/v1"): ROOT / "registry" / "v1",
    Path("loraplex/engine/v1"): ROOT / "engine" / "v1",
}
BASELINE = ROOT / "tools" / "protos_baseline.json"
INIT_TEXT = '"""Generated gRPC stubs (tools/gen_protos.py); do not edit."""\n'


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "loraplex").rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in TARGETS:
        (out_dir / package / "__init__.py").write_text(INIT_TEXT)


def stale_files(generated: Path) -> list[str]:
    problems: list[str] = []
    for package, dest in TARGETS.items():
        src = generated / package
        names = {p.name for p in src.iterdir() if p.is_file()}
        have = {p.name for p in dest.iterdir() if p.is_file()} if dest.exists() else set()
        problems += [f"missing {dest / n}" for n in sorted(names - have)]
        problems += [f"unexpected {dest / n}" for n in sorted(have - names)]
        problems += [
            f"stale {dest / n}" for n in sorted(names & have) if not filecmp.cmp(src / n, dest / n, shallow=False)
        ]
    return problems


def write_baseline(buf: str) -> None:
    """The contract as built now, without comments (they may change freely), pretty-printed for reviewable diffs."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.json"
        subprocess.run(
            [buf, "build", "--exclude-source-info", "--path", "protos/loraplex", "-o", str(image)], cwd=ROOT, check=True
        )
        BASELINE.write_text(json.dumps(json.loads(image.read_text()), indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the checked-in stubs are stale")
    parser.add_argument("--baseline", action="store_true", help="rewrite the breaking-change baseline (on release)")
    args = parser.parse_args()
    if args.baseline:
        write_baseline(str(Path(sys.executable).parent / "buf"))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp)
        generate(generated)
        if args.check:
            problems = stale_files(generated)
            for line in problems:
                print(line, file=sys.stderr)
            return 1 if problems else 0
        for package, dest in TARGETS.items():
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(generated / package, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
