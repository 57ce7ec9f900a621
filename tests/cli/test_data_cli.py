"""``kiln data pack | info | verify`` end to end, and a packed directory used by create_dataset."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from torchkiln.cli.main import app
from torchkiln.errors import RecipeError
from torchkiln.zoo import create_dataset


def test_pack_text_info_verify_and_load(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = {f"m{i}.py": f"def f{i}():\n    return {i}\n" * (i + 1) for i in range(5)}
    for name, text in texts.items():
        (src / name).write_text(text)
    out = tmp_path / "packed" / "train"
    res = CliRunner().invoke(app, ["data", "pack", str(src), "-o", str(out), "--glob", "*.py"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["data", "info", str(out)])
    assert res.exit_code == 0 and "5" in res.output, res.output
    res = CliRunner().invoke(app, ["data", "verify", str(out)])
    assert res.exit_code == 0, res.output

    ds = create_dataset(str(tmp_path / "packed"), "train")  # a directory of <split>.idx files
    assert len(ds) == 5
    got = sorted(bytes(ds[i][next(iter(ds[i]))].numpy().astype(np.uint8)).decode() for i in range(5))
    assert got == sorted(texts.values())
    with pytest.raises(RecipeError, match="has no val.idx"):
        create_dataset(str(tmp_path / "packed"), "val")
    with pytest.raises(RecipeError, match="single file, so it has no 'val' split"):
        create_dataset(str(out), "val")


def test_pack_jsonl_and_verify_detects_corruption(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"tokens": list(range(i + 1)), "label": i % 3}) for i in range(50)))
    out = tmp_path / "j"
    res = CliRunner().invoke(app, ["data", "pack", str(jsonl), "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = bytearray((tmp_path / "j.bin").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "j.bin").write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["data", "verify", str(out)])
    assert res.exit_code != 0
