"""The gpu-proof sweep (tools/proof/reproduce.py --preset gpu-proof) on a GPU machine without network: its inputs
packed here into two folders that travel in two back-to-back device calls, then joined and run there.

    python -m tools.proof.gpu_proof pack [--dest .gpu_proof]            # here: `make gpu-proof-pack`
    python -m tools.proof.gpu_proof run [--src .gpu_proof] [--mirror DIR] [reproduce.py arguments ...]
                                                                  # there: `make gpu-proof`

`pack` splits the teacher's GGUF file (98 MB, more than one call carries) into DEST/a (the first bytes, beside
the wheels of `make gpu-wheels`, which travel with it) and DEST/b (the rest, the manifest with the file's
sha256 and the ShareGPT splits of the preset, made here where the package is). The parts are sized so that
each call, with the working tree, stays under the device's 64 MiB.

`run` joins the parts, checks the sha256, imports the teacher (tools/demo/import_gguf.py) and runs the sweep into
sweeps/gpu-proof; with --mirror every finished cell and the table are copied to DIR as they are written (the
call's $OUT, which comes back even when the call runs out of time). A second call resumes: finished cells
are skipped, a half-trained method resumes from its checkpoint while the machine is warm.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tools import ROOT
CALL_LIMIT = 64 * 2**20  # what one device call carries: the working tree and its carried paths
MARGIN = 2 * 2**20
GGUF_NAME = "teacher.gguf"


class GpuProofError(RuntimeError):
    pass


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def tree_bytes() -> int:
    """Bytes of what every call sends besides its carried paths: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return _size([ROOT / f for f in out.split("\0") if f])


def pack(dest: Path, demo_dir: Path, wheels: Path) -> dict:
    """DEST/a and DEST/b (see the module docstring); returns the manifest."""
    from tools.demo.import_gguf import default_gguf_path
    from tools.demo.run import prepare_assets
    from tools.proof import experiments, reproduce

    if not any(wheels.glob("*.whl")):
        raise GpuProofError(f"no wheels in {wheels}: run `make gpu-wheels` first (they travel with part a)")
    prepare_assets(demo_dir)
    gguf = default_gguf_path()
    args = argparse.Namespace(data_dir=None, demo_dir=str(demo_dir), teacher=str(demo_dir / "teacher"),
                              preset="gpu-proof")
    data = reproduce.proof_data(args, experiments.presets()["gpu-proof"])
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "a").mkdir(parents=True)
    (dest / "b" / "sharegpt").mkdir(parents=True)
    for f in data.values():
        shutil.copy2(f, dest / "b" / "sharegpt" / f.name)
    base = tree_bytes()
    first = CALL_LIMIT - base - _size(wheels.glob("*.whl")) - MARGIN
    total = gguf.stat().st_size
    rest = total - first + _size((dest / "b" / "sharegpt").iterdir())
    if first <= 0 or base + rest + MARGIN > CALL_LIMIT:
        raise GpuProofError(f"the parts do not fit two calls of {CALL_LIMIT >> 20} MiB: working tree {base >> 20} MiB, "
                            f"wheels, GGUF {total >> 20} MiB and data; ignore what need not travel")
    with open(gguf, "rb") as src:
        (dest / "a" / f"{GGUF_NAME}.0").write_bytes(src.read(first))
        (dest / "b" / f"{GGUF_NAME}.1").write_bytes(src.read())
    manifest = {"gguf": gguf.name, "bytes": total, "sha256": _sha256([gguf]), "parts": [first, total - first],
                "data": {f.name: f.stat().st_size for f in data.values()}}
    (dest / "b" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for part in ("a", "b"):
        extra = _size(wheels.glob("*.whl")) if part == "a" else 0
        size = _size((dest / part).rglob("*")) + extra + base
        print(f"gpu_proof: part {part}: {size / 2**20:.1f} MiB with the working tree"
              + (f" and {wheels}" if part == "a" else ""))
    return manifest


def unpack(src: Path, demo_dir: Path) -> None:
    """The teacher imported from the joined GGUF into DEMO_DIR/teacher, the splits into DEMO_DIR/sharegpt."""
    from tools.demo.import_gguf import import_gguf

    manifest_file = src / "b" / "manifest.json"
    parts = [src / "a" / f"{GGUF_NAME}.0", src / "b" / f"{GGUF_NAME}.1"]
    missing = [str(p) for p in [manifest_file, *parts] if not p.is_file()]
    if missing:
        raise GpuProofError(f"missing {', '.join(missing)}: carry {src}/a (with .whl) in one call, then {src}/b in "
                            "the next while the machine is warm (README, \"On a GPU\")")
    manifest = json.loads(manifest_file.read_text())
    if not (demo_dir / "teacher" / "config.json").is_file():
        sizes = [p.stat().st_size for p in parts]
        if sizes != manifest["parts"] or _sha256(parts) != manifest["sha256"]:
            raise GpuProofError(f"the GGUF parts in {src} do not join to {manifest['gguf']} (sizes {sizes}, expected "
                                f"{manifest['parts']}, or sha256 differs): pack them again")
        joined = Path("/tmp") / "okd_scale_gpu_proof" / manifest["gguf"]
        joined.parent.mkdir(parents=True, exist_ok=True)
        with open(joined, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
        import_gguf(joined, demo_dir / "teacher", overwrite=True)
    (demo_dir / "sharegpt").mkdir(parents=True, exist_ok=True)
    for name in manifest["data"]:
        if not (demo_dir / "sharegpt" / name).is_file():
            shutil.copy2(src / "b" / "sharegpt" / name, demo_dir / "sharegpt" / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="here: the two parts")
    pk.add_argument("--dest", default=str(ROOT / ".gpu_proof"))
    pk.add_argument("--wheels", default=str(ROOT / ".whl"))
    pk.add_argument("--demo-dir", default=str(ROOT / "demo_out"))
    rn = sub.add_parser("run", help="there: join, import, sweep")
    rn.add_argument("--src", default=str(ROOT / ".gpu_proof"))
    rn.add_argument("--demo-dir", default=str(ROOT / "demo_out"))
    args, rest = p.parse_known_args(argv)  # run: the rest goes to tools/proof/reproduce.py, e.g. --mirror $OUT
    if rest and args.cmd == "pack":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "pack":
            pack(Path(args.dest), Path(args.demo_dir), Path(args.wheels))
            return 0
        unpack(Path(args.src), Path(args.demo_dir))
    except GpuProofError as e:
        print(f"gpu_proof: error: {e}", file=sys.stderr)
        return 2
    from tools.proof import reproduce

    return reproduce.main(["--preset", "gpu-proof", "--demo-dir", args.demo_dir, *rest])


if __name__ == "__main__":
    sys.exit(main())
