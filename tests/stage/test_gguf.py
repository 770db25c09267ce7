"""convert_gguf and quantize_q8: what each is asked to write, and what each refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.config.artifacts import mmproj_gguf, mmproj_of, text_gguf
from src.stages.convert_gguf import jobs
from src.stages.quantize_q8 import FTYPES, quantize


def test_convert_writes_each_text_outtype_then_the_mmproj(tmp_path: Path) -> None:
    assert jobs(tmp_path, ["f32", "f16"], "f16") == [
        (text_gguf(tmp_path, "f32"), "f32", False), (text_gguf(tmp_path, "f16"), "f16", False),
        (mmproj_gguf(tmp_path, "f16"), "f16", True)]


@pytest.mark.parametrize("outtypes", [[], ["f16", "f16"]])
def test_convert_refuses_no_or_repeated_outtypes(tmp_path: Path, outtypes: list[str]) -> None:
    with pytest.raises(SystemExit, match="convert_gguf.text_outtypes"):
        jobs(tmp_path, outtypes, "f16")


def test_the_mmproj_is_found_whatever_its_outtype_and_must_be_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="expected one mmproj"):
        mmproj_of(tmp_path)
    mmproj_gguf(tmp_path, "f16").write_bytes(b"")
    assert mmproj_of(tmp_path) == mmproj_gguf(tmp_path, "f16")
    mmproj_gguf(tmp_path, "f32").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="found"):
        mmproj_of(tmp_path)


def test_quantize_refuses_an_unknown_ftype_before_touching_files(tmp_path: Path) -> None:
    assert "q8_0" in FTYPES
    with pytest.raises(SystemExit, match=r"quantize_q8.ftype='q4_k'"):
        quantize(tmp_path / "absent.gguf", tmp_path / "out.gguf", "q4_k")
    assert not any(tmp_path.iterdir())


def test_a_failed_quantize_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / "not-a-model.gguf"
    src.write_bytes(b"GGUF but not really")
    with pytest.raises(RuntimeError, match="llama_model_quantize"):
        quantize(src, tmp_path / "out" / "text-q8_0.gguf", "q8_0")
    assert not (tmp_path / "out" / "text-q8_0.gguf").exists()
