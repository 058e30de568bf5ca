"""The wheels the GPU machine lacks for okd_scale and its tests, in one folder that travels with a device run.

    python -m tools.gpu.wheels [--dest .whl]            # `make gpu-wheels`

The GPU machine (CPython 3.12 on x86-64 Linux, no network) has torch, transformers, peft and most of
what okd_scale needs (DEVICE_HAS, from the machine's package list); WHEELS are the rest, at the versions
this project is tested with. Binary wheels come from `pip download --only-binary=:all:` for that
interpreter and platform; packages published only as source (BUILT) become pure-Python wheels through
`pip wheel --no-deps` (DeepSpeed's ops then compile just in time there, when one is used). Then the
folder is checked: one version of each package, every wheel installable on CPython 3.12 x86-64, and
every requirement (Requires-Dist, extras aside) met by a wheel in the folder or a package of the machine.
There: `python3 -m pip install --no-index --no-deps --target DIR .whl/*.whl` and DIR on PYTHONPATH
(`make gpu-check` does both).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tools import ROOT

# package -> version: what okd_scale, its tools and its tests import that the machine does not have
WHEELS = {
    "deepspeed": "0.19.8",
    "hjson": "3.1.0",  # deepspeed
    # deepspeed; 2.11 rather than the newest, whose typing-extensions>=4.16 the machine may not meet
    "pydantic": "2.11.7",
    "pydantic-core": "2.33.2",
    "annotated-types": "0.7.0",
    "typing-inspection": "0.4.1",
    "datasets": "5.2.0",
    "dill": "0.4.1",  # datasets
    "multiprocess": "0.70.19",  # datasets
    "rouge-score": "0.1.2",
    "nltk": "3.10.4",  # rouge-score
    "defusedxml": "0.7.1",  # nltk
    "trl": "1.16.0",  # tools/bench/peers.py (the `bench` extra) and its test
    "gguf": "0.19.0",  # tools/demo/import_gguf.py: the gpu-proof teacher (the `gguf` extra)
}
BUILT = {"deepspeed", "rouge-score"}  # source distributions only: built here as pure-Python wheels

# The nvidia-h200 machine's own packages (its package list, read 2026-11-17); never carried.
DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())

PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MARKER_ENV = {"python_version": PYTHON_VERSION, "python_full_version": PYTHON_VERSION + ".3", "os_name": "posix",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "platform_python_implementation": "CPython", "implementation_name": "cpython", "extra": ""}
MAX_MIB = 32  # the whole tree that travels must stay under 64 MiB


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_wheels: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def fetch(dest: Path) -> None:
    """Download or build every wheel of WHEELS into `dest` (those already there are kept)."""
    have = {canonical(w.name.split("-")[0]): w for w in dest.glob("*.whl")}
    for name, version in WHEELS.items():
        old = have.get(canonical(name))
        if old is not None and old.name.split("-")[1] == version:
            continue
        if old is not None:
            old.unlink()
        print(f"gpu_wheels: {name}=={version} ({'build' if name in BUILT else 'download'})", flush=True)
        if name in BUILT:
            with tempfile.TemporaryDirectory() as tmp:  # build outside the tree, keep only the wheel
                pip("wheel", "--no-deps", "--no-cache-dir", "-w", tmp, f"{name}=={version}")
                for w in Path(tmp).glob("*.whl"):
                    w.rename(dest / w.name)
        else:
            platforms = [a for p in PLATFORMS for a in ("--platform", p)]
            pip("download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
                "--implementation", "cp", *platforms, "--platform", "any", "-d", str(dest), f"{name}=={version}")


def supported(wheel: Path) -> bool:
    """Whether a wheel installs on CPython 3.12 on x86-64 Linux (manylinux, glibc 2.28 or older)."""
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    py = tuple(int(x) for x in PYTHON_VERSION.split("."))
    platforms = list(PLATFORMS) + ["linux_x86_64"]
    ok = set(cpython_tags(py, platforms=platforms)) | set(compatible_tags(py, "cp312", platforms=platforms))
    return bool(set(parse_wheel_filename(wheel.name)[3]) & ok)


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist entries that apply on the machine (extras and other platforms aside)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(MARKER_ENV):
            out.append(str(req))
    return out


def check(dest: Path) -> list[str]:
    """Problems with the folder: duplicates, wheels for another interpreter or platform, unmet requirements."""
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    problems, bundled = [], {}
    for w in sorted(dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(w.name)
        if name in bundled:
            problems.append(f"two versions of {name}: {bundled[name][1]} and {version} (keep one: pip refuses both)")
        bundled[name] = (w, version)
        if not supported(w):
            problems.append(f"{w.name}: not installable on CPython {PYTHON_VERSION} x86-64 Linux")
        if name in DEVICE_HAS:
            problems.append(f"{w.name}: the GPU machine has {name} already (carrying another copy shadows it)")
    for name in WHEELS:
        if canonical(name) not in bundled:
            problems.append(f"{name}=={WHEELS[name]} is missing from {dest}")
    for name, (w, _) in bundled.items():
        for text in requirements(w):
            req = Requirement(text)
            dep = canonical(req.name)
            if dep in bundled:
                if req.specifier and not req.specifier.contains(bundled[dep][1], prereleases=True):
                    problems.append(f"{w.name} needs {text}; {dest} has {dep} {bundled[dep][1]}")
            elif dep not in DEVICE_HAS:
                problems.append(f"{w.name} needs {text}: neither in {dest} nor on the GPU machine; add it to WHEELS")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=str(ROOT / ".whl"), help="the folder (default: .whl, git-ignored)")
    p.add_argument("--check-only", action="store_true", help="check the folder without fetching")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not args.check_only:
        fetch(dest)
    problems = check(dest)
    size = sum(w.stat().st_size for w in dest.glob("*.whl"))
    for w in sorted(dest.glob("*.whl")):
        print(f"  {w.name}  {w.stat().st_size / 2**20:.2f} MiB")
    print(f"gpu_wheels: {len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}")
    if size > MAX_MIB * 2**20:
        problems.append(f"{dest} holds {size / 2**20:.1f} MiB, more than {MAX_MIB} MiB (the travelling tree's "
                        f"limit is 64 MiB in all)")
    for line in problems:
        print(f"gpu_wheels: error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
