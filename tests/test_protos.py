"""The generated read-API modules match protos/ (run `make protos` when this fails)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    load_generator().generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert fresh, "protoc generated nothing"
    for relative in fresh:
        checked_in = ROOT / relative
        assert checked_in.exists(), f"{relative} missing: run `make protos`"
        assert checked_in.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} is stale: run `make protos`"
        )
