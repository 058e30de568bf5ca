"""okd_scale: Online Knowledge Distillation of autoregressive language models at DeepSpeed scale."""

__version__ = "0.1.0"

# the oldest versions with what the code uses (pyproject.toml's floors say the same)
FLOORS = {
    "torch": ("2.5", "torch.serialization.safe_globals, for the weights-only checkpoint loads"),
    "transformers": ("4.56", "from_pretrained(dtype=...) and a tensor of positions as logits_to_keep"),
    "deepspeed": ("0.16", "engine.was_step_applied() and save_checkpoint(exclude_frozen_parameters=...)"),
    "peft": ("0.13", "LoRA on chosen layers (layers_to_transform) and disable_adapter()"),
}


def dependency_problems(found: dict) -> list:
    """For {package: installed version or None}, one message per package older than its floor in FLOORS."""
    from packaging.version import InvalidVersion, Version

    problems = []
    for name, (floor, why) in FLOORS.items():
        version = found.get(name)
        try:
            old = version is not None and Version(version.split("+")[0]) < Version(floor)
        except InvalidVersion:
            old = False
        if old:
            problems.append(f"{name} {version} is older than {floor}, which okd_scale needs for {why}: "
                            f"pip install '{name}>={floor}'")
    return problems


def _installed(name: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # not installed (yet): its own import error will say so
        return None


_problems = dependency_problems({name: _installed(name) for name in FLOORS})
if _problems:
    raise ImportError("okd_scale: " + "; ".join(_problems))
