"""ReferenceBank with bad input: every parameter, query and saved file that is out of
range or malformed gives a ValueError / TypeError / KeyError (BankFormatError for files)
whose message names the argument or the file, never a crash inside faiss or a raw
numpy / faiss error; plus the precision and non-finite contracts of search."""
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastad.bank import BankFormatError, ReferenceBank

from test_bank import current, one_faiss_thread  # noqa: F401 (a fixture)

INT_PARAMS = {  # parameter: (index kind, lowest valid, highest valid)
    "nlist": ("ivf", 1, 2**31 - 1), "nprobe": ("ivf", 1, 2**31 - 1), "m": ("ivfpq", 1, 16),
    "nbits": ("ivfpq", 1, 16), "refine": ("ivfpq", 0, 4096), "hnsw_m": ("hnsw", 2, 1024),
    "ef_search": ("hnsw", 1, 2**31 - 1), "ef_construction": ("hnsw", 1, 2**31 - 1),
}


@pytest.mark.parametrize("make", [
    # the reproducers: SIGABRT / SIGSEGV inside faiss, ZeroDivisionError, OverflowError,
    # and a failure only at search time
    lambda: ReferenceBank(16, index="hnsw", hnsw_m=0),
    lambda: ReferenceBank(16, index="ivfpq", nlist=2, m=4, nbits=0),
    lambda: ReferenceBank(16, index="ivfpq", m=0),
    lambda: ReferenceBank(16, index="ivf", nprobe=-1),
    lambda: ReferenceBank(16, index="ivf", nlist=0),
], ids=["hnsw_m", "nbits", "m", "nprobe", "nlist"])
def test_reproducers_fail_in_the_constructor_naming_the_parameter(make, request):
    with pytest.raises(ValueError, match=f"`{request.node.callspec.id}` must be an integer in"):
        make()


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(INT_PARAMS)),
       value=st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(), st.none(),
                       st.text(max_size=3)))
def test_integer_parameters_in_range_or_named_error(name, value):
    kind, lo, hi = INT_PARAMS[name]
    valid = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    if name == "m" and valid and 16 % value:
        valid = False  # must divide dim
    if valid:
        ReferenceBank(16, index=kind, **{name: value})
    else:
        with pytest.raises(ValueError, match=f"`{name}`"):
            ReferenceBank(16, index=kind, **{name: value})


@pytest.mark.parametrize("params,match", [
    (dict(index="ivfpq", m=3), r"`m`=3 must divide dim=16"),
    (dict(index="ivf", recall_target=0), "`recall_target` must be a number in"),
    (dict(index="hnsw", recall_target=1.5), "`recall_target` must be a number in"),
    (dict(index="ivf", recall_target="high"), "`recall_target` must be a number in"),
    (dict(index="exact", recall_target=0.9), r"unknown parameters \['recall_target'\]"),
    (dict(index="ivf", gpu="yes"), "`gpu` must be None, True or False"),
    (dict(index="ivf", shard=1), "`shard` must be True or False"),
    (dict(index="exact", metric="IP"), "`metric` must be one of"),
])
def test_other_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        ReferenceBank(16, **params)


def test_build_checks_rows_against_nlist_and_nbits():
    bank = ReferenceBank(8, index="ivf", nlist=64)
    bank.add(torch.randn(20, 8))
    with pytest.raises(ValueError, match="20 rows, fewer than `nlist`=64"):
        bank.build(progress=False)
    bank = ReferenceBank(8, index="ivfpq", nlist=1, m=2, nbits=10)
    bank.add(torch.randn(100, 8))
    with pytest.raises(ValueError, match="`nbits`=10 needs at least 1024"):
        bank.build(progress=False)
    bank = ReferenceBank(8, index="ivf", nlist=1, recall_target=0.9)
    bank.add(torch.randn(50, 8))
    with pytest.raises(ValueError, match="`recall_target` needs at least 100 rows"):
        bank.build(progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_search_computes_in_the_bank_precision(dtype):
    """float16 rounds 1.0003 to 1.0: searching in the query's dtype would pick row 0."""
    bank = ReferenceBank(1, metric="l2")
    bank.add(torch.tensor([[1.0003], [0.9998]]))
    bank.build(progress=False)
    res = bank.search(torch.tensor([[1.0]], dtype=dtype), k=2)
    assert res.indices.tolist() == [[1, 0]]
    assert res.values.dtype == torch.float32
    torch.testing.assert_close(res.values, torch.tensor([[0.0002, 0.0003]]), atol=2e-7, rtol=0)


@pytest.fixture(scope="module")
def banks():
    """One small built bank of every kind and metric."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 8, generator=g)
    out = {}
    for kind, params in [("exact", {}), ("ivf", dict(nlist=4)), ("ivfpq", dict(nlist=2, m=4, nbits=4)),
                         ("hnsw", dict(hnsw_m=4))]:
        for metric in ("cosine", "l2", "ip"):
            bank = ReferenceBank(8, metric=metric, index=kind, **params)
            bank.add(rows)
            out[kind, metric] = bank.build(progress=False)
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
@pytest.mark.parametrize("kind", ["exact", "ivf", "ivfpq", "hnsw"])
def test_non_finite_query_raises_for_every_index(banks, kind, metric, bad):
    q = torch.randn(3, 8)
    q[1, 2] = bad
    with pytest.raises(ValueError, match="`query` contains NaN or infinite values"):
        banks[kind, metric].search(q)


@pytest.mark.parametrize("kind", ["exact", "ivf", "ivfpq", "hnsw"])
def test_query_type_shape_and_k(banks, kind):
    bank = banks[kind, "l2"]
    with pytest.raises(TypeError, match="`query` must be a torch.Tensor"):
        bank.search(np.zeros((2, 8), np.float32))
    with pytest.raises(TypeError, match="`query` must be floating point"):
        bank.search(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`query` must be \[N, 8\]"):
        bank.search(torch.zeros(2, 8, 1))
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 300\]"):
        bank.search(torch.zeros(2, 8), k=0)


def test_one_category_bank_needs_no_category_name():
    bank = ReferenceBank(4, metric="l2")
    bank.add(torch.eye(4), category="screw", image_ids="img0")
    bank.build(progress=False)
    res = bank.search(torch.eye(4)[2:3])
    assert res.indices.item() == 2
    assert bank.locate(res.indices) == ([["img0"]], torch.tensor([[2]]))
    bank.add(torch.eye(4), category="nut")
    bank.build(progress=False)
    with pytest.raises(ValueError, match=r"`category` is required for a bank of 2 categories: \['screw', 'nut'\]"):
        bank.search(torch.eye(4))
    with pytest.raises(KeyError, match="the bank is empty"):
        ReferenceBank(4).search(torch.eye(4))


# ---------------------------------------------------------------------- saved files
@pytest.fixture
def saved(tmp_path):
    bank = ReferenceBank(8, metric="l2", index="ivf", nlist=2)
    bank.add(torch.randn(40, 8), category="a")
    bank.build(progress=False)
    bank.save(tmp_path / "bank")
    return tmp_path / "bank"


def _rewrite(bank_path, fname, data: bytes):
    """Replace a file of the current version and fix its checksum in meta.json (so only the
    content check can catch it)."""
    folder = current(bank_path)
    (folder / fname).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    import hashlib

    meta["categories"][0]["checksums"][fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_meta_holding_a_list_names_the_file(saved):
    (current(saved) / "meta.json").write_text("[1, 2]")
    with pytest.raises(BankFormatError, match=r"meta.json must hold a JSON object, got a list"):
        ReferenceBank.load(saved)


@pytest.mark.parametrize("fname,match", [("0.faiss", "0.faiss is not a readable faiss index"),
                                         ("0.rows.npz", "0.rows.npz is not a readable row map")])
def test_garbage_files_name_the_file(saved, fname, match):
    _rewrite(saved, fname, b"garbage" * 50)
    with pytest.raises(BankFormatError, match=match):
        ReferenceBank.load(saved)


def test_wrong_index_kind_and_bad_row_map(saved, tmp_path):
    other = ReferenceBank(8, metric="l2", index="hnsw")
    other.add(torch.randn(40, 8), category="a")
    other.build(progress=False)
    other.save(tmp_path / "other")
    _rewrite(saved, "0.faiss", (current(tmp_path / "other") / "0.faiss").read_bytes())
    with pytest.raises(BankFormatError, match="0.faiss holds a faiss IndexHNSWFlat, not the 'ivf' index"):
        ReferenceBank.load(saved)
    import io

    buf = io.BytesIO()
    np.savez(buf, row_image=np.full(40, 7), row_patch=np.arange(40))
    _rewrite(tmp_path / "other", "0.rows.npz", buf.getvalue())
    with pytest.raises(BankFormatError, match="`row_image` points outside the 1 image ids"):
        ReferenceBank.load(tmp_path / "other")


def test_meta_with_bad_values_is_a_format_error(saved):
    meta_file = current(saved) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "index_params": {"nprobe": -1}}))
    with pytest.raises(BankFormatError, match="meta.json is incomplete or malformed.*`nprobe`"):
        ReferenceBank.load(saved)


def test_pointer_errors_name_the_pointer(saved):
    (saved / "CURRENT").write_text("../../etc\n")
    with pytest.raises(BankFormatError, match="CURRENT must name a version folder"):
        ReferenceBank.load(saved)
    (saved / "CURRENT").write_text("v-gone\n")
    with pytest.raises(BankFormatError, match="CURRENT names 'v-gone', which is missing"):
        ReferenceBank.load(saved, )


def test_save_refuses_files_and_foreign_folders(tmp_path):
    bank = ReferenceBank(4)
    bank.add(torch.randn(3, 4))
    bank.build(progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file exists and is not a folder"):
        bank.save(tmp_path / "file")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_text("x")
    with pytest.raises(FileExistsError, match="photos is a non-empty folder that holds no saved bank"):
        bank.save(tmp_path / "photos")
    assert os.listdir(tmp_path / "photos") == ["a.png"]


def test_format_1_banks_still_load_and_are_replaced_cleanly(saved, tmp_path):
    """Banks written before the pointer layout kept their files in the bank folder itself."""
    old = tmp_path / "old"
    os.rename(current(saved), old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    loaded = ReferenceBank.load(old)
    assert loaded.categories == ["a"] and len(loaded) == 40
    loaded.save(old)
    assert sorted(os.listdir(old)) == [".lock", "CURRENT", current(old).name]
    assert len(ReferenceBank.load(old)) == 40


def test_load_overrides_are_search_settings_named_as_the_callers(saved):
    with pytest.raises(ValueError, match=r"only search-time settings .* got \['nlist'\] \(saved: \{'nlist': 2\}\)"):
        ReferenceBank.load(saved, nlist=4)
    assert len(ReferenceBank.load(saved, nlist=2, dim=8)) == 40  # repeating a build setting is fine
    with pytest.raises(ValueError, match="`nprobe` must be an integer in") as info:
        ReferenceBank.load(saved, nprobe=0)
    assert not isinstance(info.value, BankFormatError)  # the caller's value, not a bad file
    assert ReferenceBank.load(saved, nprobe=2)._cats["a"].index.nprobe == 2
