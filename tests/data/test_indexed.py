"""The memory-mapped indexed dataset: round trips, random access, workers, corruption, crashes."""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from torchkiln.data.indexed import (
    FORMAT_VERSION,
    DatasetFormatError,
    Field,
    IndexedDataset,
    IndexedDatasetWriter,
    dataset_paths,
    verify_indexed_dataset,
    write_indexed_dataset,
)
from torchkiln.errors import KilnError

FIELDS = {
    "tokens": Field("int32", (None,)),
    "pairs": Field("float32", (None, 2)),
    "image": Field("uint8", (3, 8, 8)),
    "label": Field("int64", ()),
    "weight": "float64",
}


def make_samples(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 40))
        out.append(
            {
                "tokens": rng.integers(0, 50_000, size=k).astype(np.int32),
                "pairs": rng.standard_normal((int(rng.integers(0, 5)), 2)).astype(np.float32),
                "image": rng.integers(0, 256, size=(3, 8, 8)).astype(np.uint8),
                "label": np.int64(i % 7),
                "weight": float(rng.random()),
            }
        )
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name].numpy(), np.asarray(value), err_msg=name)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    samples = make_samples(300)
    stem = tmp_path_factory.mktemp("indexed") / "corpus"
    write_indexed_dataset(stem, samples, FIELDS, chunk_size=4096)
    return stem, samples


def test_round_trip_every_field_type(packed) -> None:
    stem, samples = packed
    ds = IndexedDataset(stem)
    assert len(ds) == len(samples)
    assert list(ds.fields) == list(FIELDS)  # field order kept
    for i in range(len(samples)):
        assert_same(ds[i], samples[i])
    assert ds[0]["label"].shape == () and ds[0]["image"].shape == (3, 8, 8)
    assert ds[-1]["label"].item() == samples[-1]["label"]
    np.testing.assert_array_equal(ds.lengths("tokens"), [len(s["tokens"]) for s in samples])
    np.testing.assert_array_equal(ds.lengths("pairs"), [len(s["pairs"]) for s in samples])
    with pytest.raises(IndexError):
        ds[len(samples)]
    with pytest.raises(ValueError, match="fixed shape"):
        ds.lengths("image")


def test_paths_accept_stem_idx_and_bin(packed) -> None:
    stem, samples = packed
    for p in (stem, str(stem) + ".idx", str(stem) + ".bin"):
        assert len(IndexedDataset(p)) == len(samples)


def test_random_access_and_batches(packed) -> None:
    stem, samples = packed
    ds = IndexedDataset(stem)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(samples), size=64)
    for i in idx:
        assert_same(ds[int(i)], samples[int(i)])
    batch = ds.__getitems__(idx.tolist())
    for got, i in zip(batch, idx, strict=True):
        assert_same(got, samples[int(i)])
    collated = ds.get_batch(idx, pad_value=-1)
    lengths = collated["tokens_lengths"].numpy()
    for row, i in enumerate(idx):
        want = samples[int(i)]["tokens"]
        assert lengths[row] == len(want)
        np.testing.assert_array_equal(collated["tokens"][row, : len(want)].numpy(), want)
        assert (collated["tokens"][row, len(want) :] == -1).all()
        np.testing.assert_array_equal(collated["image"][row].numpy(), samples[int(i)]["image"])
    assert len(ds.__getitems__([])) == 0


def test_gathered_batch_collates_like_single_reads(packed) -> None:
    from torch.utils.data import DataLoader, default_collate

    from torchkiln.data import SampleBatch, collate_samples, pad_collate

    stem, samples = packed
    fixed = IndexedDataset(stem, fields=["image", "label"])
    idx = [5, 0, 7, 7, 2]
    batch = fixed.__getitems__(idx)
    assert isinstance(batch, SampleBatch) and len(batch) == len(idx)
    assert len(batch[1:3]) == 2 and list(batch[0]) == ["image", "label"]
    one = default_collate([fixed[i] for i in idx])
    for got in (collate_samples(batch), default_collate(batch)):
        assert set(got) == set(one) and all(torch.equal(got[k], one[k]) for k in one)
    assert fixed.default_collate_fn is collate_samples
    # variable-length fields: no default collate; padding collates read the batch as a list of samples
    tokens = IndexedDataset(stem, fields=["tokens"])
    assert tokens.default_collate_fn is None
    padded = pad_collate(tokens.__getitems__(idx))
    assert torch.equal(padded["input_ids"], pad_collate([tokens[i] for i in idx])["input_ids"])
    # DataLoader calls __getitems__ and then the collate: same batches as per-sample reads
    loader = DataLoader(fixed, batch_size=4, collate_fn=collate_samples)
    first = next(iter(loader))
    want = default_collate([fixed[i] for i in range(4)])
    assert all(torch.equal(first[k], want[k]) for k in want)


def test_subset_of_fields_and_no_warnings(packed, recwarn) -> None:
    stem, samples = packed
    ds = IndexedDataset(stem, fields=["label", "tokens"])
    assert list(ds[3]) == ["label", "tokens"]
    assert not [w for w in recwarn if "writable" in str(w.message)]
    with pytest.raises(KeyError):
        IndexedDataset(stem, fields=["nope"])


def test_writes_to_tensors_never_reach_the_file(packed) -> None:
    stem, samples = packed
    ds = IndexedDataset(stem)
    ds[5]["image"].fill_(0)  # copy-on-write mapping: private to this process
    assert_same(IndexedDataset(stem)[5], samples[5])
    verify_indexed_dataset(stem)


def test_pickle_drops_mapping(packed) -> None:
    stem, samples = packed
    ds = IndexedDataset(stem)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._regions is None
    assert_same(clone[7], samples[7])


def _label_collate(batch):
    return [{k: v.clone() for k, v in s.items()} for s in batch]


def test_multiworker_dataloader(packed) -> None:
    stem, samples = packed
    ds = IndexedDataset(stem)
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=_label_collate, shuffle=False)
    seen = [s for batch in loader for s in batch]
    assert len(seen) == len(samples)
    for got, want in zip(seen, samples, strict=True):
        assert_same(got, want)


def test_infer_fields_and_writer_checks(tmp_path: Path) -> None:
    ds = write_indexed_dataset(
        tmp_path / "inf",
        [
            {"x": torch.arange(3), "y": 1, "img": np.zeros((2, 2), np.float32)},
            {"x": [4], "y": 0, "img": np.ones((2, 2))},
        ],
    )
    assert ds.fields["x"] == Field("int64", (None,))
    assert ds.fields["y"] == Field("int64", ())
    assert ds.fields["img"] == Field("float32", (2, 2))
    with IndexedDatasetWriter(tmp_path / "chk", {"x": ("int32", (None,)), "y": "int64"}) as w:
        with pytest.raises(ValueError, match="do not match"):
            w.add({"x": [1]})
        with pytest.raises(ValueError, match="cannot be stored"):
            w.add({"x": np.array([1.5]), "y": 1})
        with pytest.raises(ValueError, match="does not fit"):
            w.add({"x": np.zeros((2, 2), np.int32), "y": 1})
        w.add({"x": [1, 2], "y": 3})
    assert len(IndexedDataset(tmp_path / "chk")) == 1


def test_exception_in_writer_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "boom", {"x": "int64"}) as w:
        w.add({"x": 1})
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset(tmp_path: Path) -> None:
    ds = write_indexed_dataset(tmp_path / "empty", [], {"x": ("int32", (None,))})
    assert len(ds) == 0 and len(ds.lengths("x")) == 0
    verify_indexed_dataset(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ corruption


def _fresh(tmp_path: Path, checksums: bool = True) -> tuple[Path, list]:
    samples = make_samples(40, seed=3)
    stem = tmp_path / "c"
    write_indexed_dataset(stem, samples, FIELDS, checksums=checksums, chunk_size=1024)
    return stem, samples


def test_missing_truncated_wrong_version(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="index file not found"):
        IndexedDataset(tmp_path / "none")
    stem, _ = _fresh(tmp_path)
    _, idx, bin_ = dataset_paths(stem)
    assert issubclass(DatasetFormatError, KilnError)

    data = bin_.read_bytes()
    bin_.write_bytes(data[:-10])
    with pytest.raises(DatasetFormatError, match=r"c\.bin: at byte \d+: .*truncated"):
        IndexedDataset(stem)
    bin_.write_bytes(data)

    raw = idx.read_bytes()
    idx.write_bytes(raw[:-3])
    with pytest.raises(DatasetFormatError, match=r"c\.idx: at byte"):
        IndexedDataset(stem)
    idx.write_bytes(raw[:8] + struct.pack("<I", FORMAT_VERSION + 1) + raw[12:])
    with pytest.raises(DatasetFormatError, match=f"c\\.idx: at byte 8: format version {FORMAT_VERSION + 1}"):
        IndexedDataset(stem)
    idx.write_bytes(raw)
    bin_.write_bytes(data[:8] + struct.pack("<I", 99) + data[12:])
    with pytest.raises(DatasetFormatError, match="at byte 8: format version 99"):
        IndexedDataset(stem)
    bin_.write_bytes(b"NOTKILN!" + data[8:])
    with pytest.raises(DatasetFormatError, match="at byte 0: expected magic"):
        IndexedDataset(stem)


def test_index_of_another_data_file_is_refused(tmp_path: Path) -> None:
    a, _ = _fresh(tmp_path)
    b = tmp_path / "other"
    write_indexed_dataset(b, make_samples(40, seed=3), FIELDS, chunk_size=1024)
    os.replace(str(b) + ".bin", str(a) + ".bin")  # same size, different token
    with pytest.raises(DatasetFormatError, match="belongs to another data file"):
        IndexedDataset(a)


def test_verify_finds_payload_corruption(tmp_path: Path) -> None:
    stem, _ = _fresh(tmp_path)
    bin_ = dataset_paths(stem)[2]
    data = bytearray(bin_.read_bytes())
    data[-100] ^= 0xFF
    bin_.write_bytes(bytes(data))
    IndexedDataset(stem)  # opening does not read the payload
    with pytest.raises(DatasetFormatError, match=r"c\.bin: at bytes \d+\.\.\d+: crc32"):
        verify_indexed_dataset(stem)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["idx", "bin"]),
    action=st.sampled_from(["flip", "truncate"]),
    where=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
    checksums=st.booleans(),
)
def test_random_corruption_is_refused_or_harmless(
    tmp_path_factory, which, action, where, mask, checksums
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    stem, samples = _fresh(tmp, checksums=checksums)
    path = dataset_paths(stem)[1 if which == "idx" else 2]
    data = bytearray(path.read_bytes())
    pos = int(where * len(data))
    if action == "flip":
        data[pos] ^= mask
    else:
        del data[pos:]
    path.write_bytes(bytes(data))
    try:
        ds = IndexedDataset(stem)
        report = verify_indexed_dataset(stem)
    except DatasetFormatError as exc:
        assert str(path.name) in str(exc)
        return
    # Only payload bytes of a data file without checksums (or padding) may get this far.
    assert which == "bin" and action == "flip" and pos >= 64
    assert not report["checksums"] or pos >= report["checksummed_bytes"]
    for i in range(len(ds)):  # different data perhaps, but never another kind of failure
        item = ds[i]
        assert set(item) == set(FIELDS)
    ds.__getitems__(list(range(len(ds))))


# ------------------------------------------------------------------------------------------ killed writer

_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from torchkiln.data.indexed import IndexedDatasetWriter
    stem, phase = sys.argv[1], sys.argv[2]
    w = IndexedDatasetWriter(stem, {"x": ("int32", (None,)), "y": "int64"})
    for i in range(2000):
        w.add({"x": np.arange(i % 50, dtype=np.int32), "y": i})
    if phase == "close":
        import os
        real = os.replace
        def slow_replace(a, b):  # pause between the two renames
            real(a, b)
            print("renamed", flush=True)
            import time; time.sleep(60)
        os.replace = slow_replace
        w.close()
    else:
        print("writing", flush=True)
        import time
        while True:
            w.add({"x": np.arange(10, dtype=np.int32), "y": 0})
            time.sleep(0.001)
    """
)


@pytest.mark.parametrize("phase", ["add", "close"])
@pytest.mark.parametrize("existing", [False, True])
def test_killed_writer_leaves_no_dataset_that_opens(tmp_path: Path, phase: str, existing: bool) -> None:
    stem = tmp_path / "killed"
    if existing:  # an older dataset at the same path must not survive half-replaced
        write_indexed_dataset(stem, [{"x": np.arange(3, dtype=np.int32), "y": 1}])
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(stem), phase], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() in ("writing", "renamed"), line
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    if existing and phase == "add":  # killed before finalizing: the old dataset is untouched
        ds = IndexedDataset(stem)
        assert len(ds) == 1 and ds[0]["x"].tolist() == [0, 1, 2]
        verify_indexed_dataset(stem)
        return
    with pytest.raises(DatasetFormatError):  # killed between the renames: nothing opens
        IndexedDataset(stem)


def test_a_damaged_reserved_header_field_is_refused(tmp_path: Path) -> None:
    stem, _ = _fresh(tmp_path, checksums=False)
    idx = dataset_paths(stem)[1]
    data = bytearray(idx.read_bytes())
    data[21] ^= 1  # inside the reserved u32 at 20..24, which the index crc does not cover
    idx.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"c\.idx: at byte 20: reserved field"):
        IndexedDataset(stem)
