"""Index at scale (issue 5): training checks, template segments, search parameters
through wrappers, deletes, compaction, reindex without re-embedding, mmap, eval.

Synthetic vectors (``append(texts, embeddings=...)``) and a small fake embedder
keep these fast; the real-embedder paths (search, neighbours) use a copy of the
20-document store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import retrostore
from _checkout import checkout_cli_module
from retrostore import IndexTrainingError, InvalidInputError, RetrostoreError
from retrostore.index.policy import default_factory
from retrostore.index.training import check_sample, suggest_factory, train_template

from faiss import clone_index as faiss_clone


class FakeEmbedder:
    """Fixed fingerprint, default tokenizer; embedding text is an error (vectors come precomputed)."""

    def __init__(self, dim=64):
        self.dim = dim
        self.fingerprint = {"kind": "test", "name": "fake", "model_sha256": "f" * 64, "dim": dim}
        self.tokenizer_path = retrostore.default_tokenizer_path()

    def embed(self, texts):
        raise AssertionError("the embedder was called")


_CENTRES = np.random.default_rng(123).standard_normal((64, 64)).astype(np.float32)


def _vectors(rng, n, dim=64, uniform=False):
    """Unit vectors around 64 fixed centres (like text embeddings, clustered), or uniform on the sphere."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if not uniform:
        x = _CENTRES[rng.integers(0, len(_CENTRES), n), :dim] + 0.5 * x
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fill(st, rng, n, dim=64, start=0):
    """Append n one-chunk documents with synthetic vectors; returns the vectors."""
    vecs = _vectors(rng, n, dim)
    st.append([f"d{start + i}" for i in range(n)], embeddings=vecs)
    return vecs


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# -- training checks ---------------------------------------------------------
@pytest.mark.parametrize("factory", ["IVF1024,Flat", "IVF64,PQ8", "OPQ16_64,IVF16,PQ16x4fs", "PQ16", "IVF16,PQ32x4fs",
                                     "PCA32,IVF128,SQ8"])
def test_too_small_training_set_is_a_clear_error(factory, rng):
    x = _vectors(rng, 600)
    with pytest.raises(IndexTrainingError) as err:
        check_sample(factory, len(x), 64, "ip")
    msg = str(err.value)
    assert "600" in msg and "39 per centroid" in msg and "Use '" in msg
    fit = suggest_factory(factory, len(x), 64, "ip")
    assert f"'{fit}'" in msg
    train_template(fit, 64, "ip", x)  # the suggestion really trains on these vectors


def test_reindex_with_too_few_vectors_leaves_the_store_intact(tmp_path, rng):
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder()) as st:
        _fill(st, rng, 500)
        st.commit()
        with pytest.raises(IndexTrainingError, match="IVF"):
            st.reindex("IVF256,PQ8", progress=False)
        assert st.version == 1 and st.manifest["index"]["factory"] == "Flat" and st.verify() == []
        assert sorted(p.name for p in (tmp_path / "s" / "index").iterdir()) == \
            sorted(e["path"].split("/")[1] for e in st.manifest["index"]["segments"])


def test_factory_strings_that_cannot_take_ids(tmp_path, rng):
    with pytest.raises(InvalidInputError, match="IDMap"):
        retrostore.create(tmp_path / "idmap", embedder=FakeEmbedder(), index="IDMap,Flat")
    with pytest.raises(InvalidInputError, match="drop the IDMap component: 'IVF64,Flat'"):  # (helper-43: the
        retrostore.create(tmp_path / "idmap", embedder=FakeEmbedder(), index="IVF64,Flat,IDMap")  # input repeated)
    with pytest.raises(InvalidInputError, match="cannot build"):
        retrostore.create(tmp_path / "bad", embedder=FakeEmbedder(), index="IVF,NoSuchCodec")
    # helper-46: a store of IVF8,ITQ,SH64 segfaulted (FAISS 1.15 frees a cloned spectral hash's transform twice)
    with pytest.raises(InvalidInputError, match="spectral hash"):
        retrostore.create(tmp_path / "sh", embedder=FakeEmbedder(), index="IVF8,ITQ,SH64")
    # HNSW cannot take ids: segments use sequential ids, holes go through an ID map.
    with retrostore.create(tmp_path / "hnsw", embedder=FakeEmbedder(), index="HNSW16",
                           index_params={"efSearch": 64}) as st:
        vecs = np.concatenate([_fill(st, rng, 300, start=i * 300) for i in range(1)])
        st.commit()
        for i in range(1, 9):  # enough commits for a tier merge (HNSW cannot merge natively: rebuilt)
            vecs = np.concatenate([vecs, _fill(st, rng, 40, start=300 + i * 40)])
            st.commit()
        assert len(st.manifest["index"]["segments"]) < 9
        _, ids = st.search_vectors(vecs[:20], 1)
        assert (ids[:, 0] == np.arange(20)).all()
        st.delete([3, 4])
        st.commit()
        st.compact(progress=False)
        assert st.verify() == []
        _, ids = st.search_vectors(vecs[:20], 1)
        assert ids[3, 0] != 3 and ids[4, 0] != 4 and (ids[5:, 0] == np.arange(5, 20)).all()
        assert st.info()["index"]["params"]["efSearch"] == 64


def test_explicit_factory_trains_at_the_commit_with_enough_vectors(tmp_path, rng):
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="IVF16,SQ8",
                           index_params={"nprobe": 16}) as st:
        _fill(st, rng, 300)
        st.commit()
        info = st.info()["index"]
        assert info["factory"] == "Flat" and info["target"] == "IVF16,SQ8" and "Flat until" in info["hint"]
        _fill(st, rng, 400, start=300)  # 700 >= 39 * 16
        st.commit()
        m = st.manifest["index"]
        assert m["factory"] == "IVF16,SQ8" and m["template"] and m["trained"]["vectors"] == 700
        assert m["params"] == {"nprobe": 16}
        template = m["template"]
        _fill(st, rng, 50, start=700)  # a small commit clones the template: one new segment of 50
        st.commit()
        m = st.manifest["index"]
        assert m["template"] == template and m["segments"][-1]["count"] == 50
        for i in range(7):  # eight segments of one tier merge natively (IVF merge_from, same quantizer)
            _fill(st, rng, 50, start=750 + 50 * i)
            st.commit()
        m = st.manifest["index"]
        assert [e["count"] for e in m["segments"]] == [700, 400] and m["template"] == template
        x = st._head.version.stored_vectors(0, len(st))
        _, ids = st.search_vectors(x[700:720], 1)
        assert (ids[:, 0] == np.arange(700, 720)).mean() > 0.9
        assert st.verify() == []


# -- search parameters -------------------------------------------------------
def test_nprobe_reaches_the_ivf_through_opq(tmp_path, rng):
    dim = 16  # OPQ trains a 256-centroid PQ 50 times: keep it small
    x = _vectors(rng, 10000, dim, uniform=True)
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(dim), index="OPQ4,IVF64,Flat") as st:
        st.append([f"d{i}" for i in range(len(x))], embeddings=x)
        st.commit()
        assert st.manifest["index"]["factory"] == "OPQ4,IVF64,Flat"
        assert st.info()["index"]["params"]["nprobe"] == 16  # retrostore's default: nlist / 4 (at least 8)
        q = _vectors(rng, 50, dim, uniform=True)
        truth = np.argsort(-(q @ x.T), axis=1)[:, :10]

        def recall(ids):
            return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])

        _, i1 = st.search_vectors(q, 10, params={"nprobe": 1})
        _, i64 = st.search_vectors(q, 10, params={"nprobe": 64})
        assert recall(i64) > 0.99 and recall(i1) < 0.9  # nprobe=64 probes every list: exact
        assert st._head.version.index.effective({"nprobe": 64})["nprobe"] == 64
        assert st._head.version.index.effective()["nprobe"] == 16  # the per-query value did not stick
        _, again = st.search_vectors(q, 10)
        assert recall(i1) < recall(again) < recall(i64)
        st.reindex(params={"nprobe": 64}, progress=False)  # the store's parameter
        assert st.info()["index"]["params"]["nprobe"] == 64
        assert recall(st.search_vectors(q, 10)[1]) > 0.99
        with pytest.raises(InvalidInputError, match="unknown search parameter 'nprob'"):
            st.search_vectors(q, 10, params={"nprob": 3})
        with pytest.raises(InvalidInputError, match=r"in \[1, "):
            st.search_vectors(q, 10, params={"nprobe": -1})


@pytest.mark.parametrize("factory", ["HNSW0", "HNSW1", "IVF16_HNSW0,Flat", "HNSW0,SQ8", "IVF0,Flat",
                                     "IVF1000000000,Flat", "NSG1"])
def test_factory_numbers_faiss_would_crash_on_are_refused(tmp_path, factory):
    """FAISS accepts these strings, then aborts/segfaults at the first add (HNSW M < 2), fails
    every search (nlist 0) or throws bad_alloc (a billion lists): refused at create."""
    with pytest.raises(InvalidInputError, match="outside"):
        retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index=factory)
    assert not (tmp_path / "s").exists()


def test_per_query_params_are_restored_and_ranges_checked(tmp_path, rng):
    """max_codes and ht given for one query must not stick (they made every later search
    return -1); nprobe must be >= 1 and fit FAISS's int, per query and per store."""
    for factory, once in (("IVF4,Flat", {"max_codes": 1}), ("IVF4,PQ8x4", {"ht": 1})):
        with retrostore.create(tmp_path / factory, embedder=FakeEmbedder(), index=factory) as st:
            _fill(st, rng, 1000)
            st.commit()
            q = _vectors(rng, 5)
            before = st.search_vectors(q, 5)[1]
            st.search_vectors(q, 5, params=once)
            assert (st.search_vectors(q, 5)[1] == before).all()
            assert set(st.info()["index"]["params"]) == {"nprobe", "nlist", "rerank"}
            for bad in ({"nprobe": 0}, {"nprobe": 2**64}, {"efSearch": 0}):
                with pytest.raises(InvalidInputError, match="must be a finite number in"):
                    st.search_vectors(q, 5, params=bad)
            for bad in ({"efSearch": 1.5}, {"nprobe": 2.5}, {"rerank": 3.2}):  # FAISS would truncate them
                with pytest.raises(InvalidInputError, match="must be a whole number"):
                    st.search_vectors(q, 5, params=bad)
            assert st.search_vectors(q, 5, params={"nprobe": 2.0})[1].shape == (5, 5)
    with pytest.raises(InvalidInputError, match="nprobe = 0 would make every search fail"):
        retrostore.create(tmp_path / "z", embedder=FakeEmbedder(), index="IVF4,Flat", index_params={"nprobe": 0})


_HUGE_PARAMS = """
import resource, sys
sys.path.insert(0, sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails here, not the test run
import numpy as np, retrostore
from test_index import FakeEmbedder
st = retrostore.open(sys.argv[1], embedder=FakeEmbedder())
q = np.ones((4, 64), np.float32) / 8
base = st.search_vectors(q, 5)[1]
for params in ({"nprobe": 2**31 - 1}, {"nprobe": 10**8}, {"efSearch": 2**31 - 1}, {"quantizer_efSearch": 2**31 - 1},
               {"k_factor_rf": 2.0**31 - 1}):
    assert st.search_vectors(q, 5, params=params)[1].shape == (4, 5), params
assert (st.search_vectors(q, 5)[1] == base).all()  # (and nothing stuck)
assert st.search_vectors(np.ones((500, 64), np.float32) / 8, 1000)[1].shape == (500, 1000)
print("ok")
"""


def test_an_ivf_quantizers_efsearch_given_for_one_search_does_not_stick(tmp_path, rng):
    """helper-35: FAISS gives an IVF's HNSW quantizer a plain efSearch too, which was never read
    back: one search with efSearch 1 changed every later answer of the handle (and of a server)."""
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="IVF64_HNSW4,Flat",
                           index_params={"nprobe": 1}) as st:
        _fill(st, rng, 3000)
        st.commit()
        q = _vectors(rng, 200)
        before = st.search_vectors(q, 5)[1]
        st.search_vectors(q, 5, params={"efSearch": 1})
        assert (st.search_vectors(q, 5)[1] == before).all()
        assert st.info()["index"]["params"]["quantizer_efSearch"] == 16


@pytest.mark.parametrize("factory", ["IVF16,PQ16x4fs", "HNSW16,Flat", "IVF16,Flat,RFlat"])
def test_search_parameters_past_what_the_index_holds_are_bounded(tmp_path, rng, factory):
    """One search with nprobe = 10**8 aborted the process (std::bad_alloc inside FAISS's IVF
    fast-scan search: a served store's worker died with one request), efSearch = 2**31 - 1
    raised MemoryError: FAISS allocates what they ask for per query. They are bounded by what the
    index holds (params.bounded), which finds all it can."""
    path = tmp_path / "s"
    stored = {"k_factor_rf": 2.0**31 - 1} if "RFlat" in factory else None  # (bounded for k = 1 at open, helper-35)
    with retrostore.create(path, embedder=FakeEmbedder(), index=factory, index_params=stored) as st:
        _fill(st, rng, 1000)
        st.commit()
    done = subprocess.run([sys.executable, "-c", _HUGE_PARAMS, str(path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_training_waits_for_enough_live_vectors(tmp_path, rng):
    """Deleted vectors do not count toward a factory's training threshold: crossing it by total
    count with too few live vectors must not make every commit fail (it did)."""
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="IVF16,Flat") as st:  # needs 624
        _fill(st, rng, 400)
        st.commit()
        st.delete(range(0, 400, 2))
        st.commit()
        _fill(st, rng, 300, start=400)  # 700 in total, 500 live
        st.commit()
        assert st.manifest["index"]["factory"] == "Flat"
        _fill(st, rng, 200, start=700)  # 700 live
        st.commit()
        assert st.manifest["index"]["factory"] == "IVF16,Flat" and st.manifest["index"]["trained"]["vectors"] == 700
        assert st.verify() == []


def test_scalar_quantizer_trains_on_more_than_64_vectors(tmp_path, rng):
    from retrostore.index.training import MIN_TRAIN_SIZE, default_train_size

    assert default_train_size("SQ8", 10**6, 64, "ip") == MIN_TRAIN_SIZE
    assert default_train_size("SQ8", 5000, 64, "ip") == 5000
    assert default_train_size("IVF4096,PQ8", 10**9, 64, "ip") == 64 * 4096


def test_k_larger_than_the_probed_lists_gives_minus_one(tmp_path, rng):
    x = _vectors(rng, 2000)
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="IVF32,Flat",
                           index_params={"nprobe": 1}) as st:
        st.append([f"d{i}" for i in range(1500)], embeddings=x[:1500])
        st.commit()
        st.append([f"d{i}" for i in range(1500, 2000)], embeddings=x[1500:])
        st.commit()
        st.delete([int(i) for i in range(0, 2000, 7)])
        st.commit()
        scores, ids = st.search_vectors(x[:5], 400)
        assert (ids == -1).any(axis=1).all()  # one list (~60 vectors per segment) cannot fill 400
        for row_s, row_i in zip(scores, ids):
            valid = row_i[row_i >= 0]
            assert len(valid) == len(set(valid.tolist())) and not (valid % 7 == 0).any()
            assert np.isneginf(row_s[row_i < 0]).all() and (row_i[: len(valid)] >= 0).all()
        # every id returned really is in a probed list: its exact score matches the returned one
        s, i = st.search_vectors(x[:1], 400)
        ok = i[0] >= 0
        stored = x.copy()  # the first batch was re-encoded from the float16 Flat phase, the second as given
        stored[:1500] = x[:1500].astype(np.float16)
        np.testing.assert_allclose(s[0][ok], stored[i[0][ok]] @ x[0], atol=1e-5)


def test_a_graph_returns_k_results_beyond_its_ef_search(tmp_path, rng):
    """FAISS's HNSW returns at most efSearch results: a search for more raises efSearch to k for
    that call (found by a helper session: k = 5,000 gave ~3,000 ids of 51,429), then restores it."""
    x = _vectors(rng, 3000)
    with retrostore.create(tmp_path / "g", embedder=FakeEmbedder(), index="HNSW16",
                           index_params={"efSearch": 32}) as st:
        st.append([f"d{i}" for i in range(3000)], embeddings=x)
        st.commit()
        _, ids = st.search_vectors(x[:3], 2500)
        assert (ids >= 0).all() and all(len(set(r.tolist())) == 2500 for r in ids)
        _, few = st.search_vectors(x[:3], 10)
        np.testing.assert_array_equal(few[:, 0], np.arange(3))
        assert st.info()["index"]["params"]["efSearch"] == 32
        assert st.search_vectors(x[:1], 10, params={"efSearch": 300})[1].shape == (1, 10)
    with pytest.raises(InvalidInputError, match="cannot form an array"):
        with retrostore.open(tmp_path / "g") as st:
            st.search_vectors([[0.1] * x.shape[1], [0.1] * 3], 5)


def test_exact_batches_split_by_range_equal_brute_force(tmp_path, rng, monkeypatch):
    """A batch on an exact store runs on one OpenMP thread, from SPLIT_FLAT_MIN_WORK as ranges side by
    side, each on one thread (FAISS's own threads spin at ~400 barriers on a shared machine): the
    answers are brute force's, deleted chunks stay out, and the caller's OpenMP setting is kept."""
    from retrostore.index import search as search_module

    splits = []
    real = search_module._split_flat_search
    monkeypatch.setattr(search_module, "_split_flat_search", lambda *a: splits.append(a[3]) or real(*a))
    n = 19_385
    x = _vectors(rng, n, uniform=True)
    with retrostore.create(tmp_path / "f", embedder=FakeEmbedder(), index="Flat", threads=2) as st:
        st.append([f"d{i}" for i in range(n)], embeddings=x)
        st.commit()
        stored = st._stored_vectors(np.arange(n)).astype(np.float32)  # (float16: the index's own values)
        q = _vectors(rng, 64, uniform=True)
        for batch in (q[:8], q):  # below and above the store's BLAS threshold (36 queries of 64-d)
            before = faiss.omp_get_max_threads()
            scores, ids = st.search_vectors(batch, 10)
            assert faiss.omp_get_max_threads() == before
            full = batch @ stored.T  # brute force: the same k best scores (ids may differ only at ties)
            np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :10], atol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(full, ids, 1), scores, atol=1e-5)
            assert all(len(set(row)) == 10 for row in ids.tolist())
        assert splits == [1, 1]  # 8 and 64 queries x 19,385 x 64-d: below SPLIT_FLAT_MIN_WORK, one thread
        monkeypatch.setattr(search_module, "SPLIT_FLAT_MIN_WORK", 1_000_000)
        for batch in (q[:8], q):
            scores, ids = st.search_vectors(batch, 10)
            full = batch @ stored.T
            np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :10], atol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(full, ids, 1), scores, atol=1e-5)
        assert splits == [1, 1, 2, 2] and faiss.omp_get_max_threads() == before
        best = ids[:, 0]
        st.delete(best.tolist())
        st.commit()
        _, ids = st.search_vectors(q, 10)
        assert not np.isin(ids, best).any() and (ids >= 0).all()


@pytest.mark.parametrize("factory", ["HNSW16", "IVF16,Flat"])
def test_batches_split_by_queries_equal_single_queries(tmp_path, rng, monkeypatch, factory):
    """Graph and IVF batches run as parts of >= SPLIT_MIN_QUERIES queries side by side, each on one
    OpenMP thread (FAISS's threads spin at each region's end beside other jobs): every row equals
    the same query searched alone, and the caller's OpenMP setting is kept."""
    from retrostore.index import search as search_module

    parts = []
    real = search_module._split_by_queries
    monkeypatch.setattr(search_module, "_split_by_queries",
                        lambda fn, q: parts.append(min(2, len(q) // search_module.SPLIT_MIN_QUERIES)) or real(fn, q))
    x = _vectors(rng, 3000)
    with retrostore.create(tmp_path / "g", embedder=FakeEmbedder(), index=factory, threads=2) as st:
        st.append([f"d{i}" for i in range(3000)], embeddings=x)
        st.commit()
        q = x[:37] + 0.01
        before = faiss.omp_get_max_threads()
        scores, ids = st.search_vectors(q, 10)
        assert faiss.omp_get_max_threads() == before and parts[-1] == 2
        for i in range(len(q)):
            s1, i1 = st.search_vectors(q[i : i + 1], 10)
            np.testing.assert_array_equal(ids[i], i1[0])
            np.testing.assert_allclose(scores[i], s1[0], rtol=1e-6)
        _, few = st.search_vectors(q[:9], 10)  # one part: on one thread
        np.testing.assert_array_equal(few, ids[:9])


INTERRUPTED_SPLIT = """
import gc, signal, sys, time
import numpy as np, retrostore
from retrostore.threads import call_pool
sys.path.insert(0, {tests!r})
from test_index import FakeEmbedder
x = np.random.default_rng(0).standard_normal((40_000, 384)).astype(np.float32)
with retrostore.create({path!r}, embedder=FakeEmbedder(384), index="Flat", threads=2) as st:
    st.append([f"d{{i}}" for i in range(len(x))], embeddings=x)
    st.commit()
st = retrostore.open({path!r}, threads=2, embedder=FakeEmbedder(384))
for _ in range(2):  # the pool busy (another thread embedding): the search's other range waits, then runs
    call_pool().submit(time.sleep, 1.5)
signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
signal.setitimer(signal.ITIMER_REAL, 0.7)
t0 = time.monotonic()
try:
    st.search_vectors(x[:1000], 10)
except KeyboardInterrupt:  # raised once the other range has run (it waited 1.5 s for a pool thread)
    print("interrupted", "after-its-parts" if time.monotonic() - t0 > 1.4 else "before-its-parts-ended")
st.close()
gc.collect()
junk = [np.ones(1 << 20) for _ in range(50)]
time.sleep(2.5)
print("alive")
"""


def test_an_interrupted_split_search_waits_for_its_parts(tmp_path):
    """helper-49: a search interrupted while a pool thread still scanned its range returned, the store
    was closed and the index freed under that thread: a segfault (exit 139)."""
    script = INTERRUPTED_SPLIT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "s"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["interrupted", "after-its-parts", "alive"], (
        out.returncode, out.stdout, out.stderr[-2000:])


SEARCH_IN_POOL = """
import sys
import numpy as np, retrostore
from retrostore.threads import call_pool
sys.path.insert(0, {tests!r})
from test_index import FakeEmbedder, _vectors
x = _vectors(np.random.default_rng(0), 3000)
with retrostore.create({path!r}, embedder=FakeEmbedder(), index="HNSW16", threads=2) as st:
    st.append([f"d{{i}}" for i in range(3000)], embeddings=x)
    st.commit()
    futures = [call_pool().submit(st.search_vectors, x[:32], 5) for _ in range(4)]  # fresh pool threads
    got = [f.result(timeout=60)[1] for f in futures]
    want = np.concatenate([st.search_vectors(x[i:i + 1], 5)[1] for i in range(32)])
    print(all((g == want).all() for g in got))
"""


def test_a_search_inside_a_pool_task_runs_whole(tmp_path):
    """helper-49: two call-pool tasks each searching a batch waited for each other's parts for ever."""
    script = SEARCH_IN_POOL.format(tests=str(Path(__file__).parent), path=str(tmp_path / "g"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["True"], (out.returncode, out.stderr[-2000:])


SHARED_SELECTOR = """
import faiss, numpy as np
from retrostore.index.search import _segment_search
rng = np.random.default_rng(0)
xb = rng.standard_normal((3000, 64)).astype(np.float32)
index = faiss.IndexIDMap(faiss.IndexFlatIP(64))  # what compact makes of a Flat segment with holes
index.add_with_ids(xb, np.arange(0, 6000, 2))
q = rng.standard_normal((64, 64)).astype(np.float32)
faiss.omp_set_num_threads(2)
want = np.concatenate([_segment_search(index, q[i:i + 1], 10, True, outside=[(100, 200)])[1] for i in range(64)])
ok = all((_segment_search(index, q, 10, True, outside=[(100, 200)])[1] == want).all() for _ in range(300))
print(ok, bool(((want >= 100) & (want < 200)).any()))
"""


def test_split_parts_never_share_a_selector(tmp_path):
    """helper-50: the parts of a batch split by queries shared one FAISS parameters object, into which
    IndexIDMap (a compacted segment) swaps its own selector during each search: a segfault."""
    out = subprocess.run([sys.executable, "-c", SHARED_SELECTOR], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["True", "False"], (out.returncode, out.stderr[-2000:])


# -- deletes and compaction ------------------------------------------------
@pytest.fixture
def real_store(tmp_path, built_store):
    path = tmp_path / "copy.rstore"
    shutil.copytree(built_store, path)
    (path / "LOCK").unlink(missing_ok=True)
    return path


def test_deleted_documents_are_never_returned(real_store, embedder, small_docs):
    base64_doc = 19  # library/base64.rst, the last of the 20 documents
    query = "decode base64 encoded data back into bytes"
    with retrostore.open(real_store, "a", embedder=embedder) as st:
        hits = st.search(query, k=5)
        assert any(h.doc_id == base64_doc for h in hits)
        doc = st.get_document(base64_doc)
        chunk_ids = np.array(doc.chunk_ids)
        assert st.delete(base64_doc) == 1 and st.delete([base64_doc]) == 0
        assert any(h.doc_id == base64_doc for h in st.search(query, k=5))  # staged, not committed
        v_before = st.version
        st.commit()
        assert st.manifest["min_reader_version"] == 3  # deletes need 2, float16 Flat segments 3
        n = len(st)
        for k in (5, n):
            assert all(h.doc_id != base64_doc for h in st.search(query, k=k))
        _, ids = st.search_vectors(st._head.version.stored_vectors(0, n), 10)
        assert not np.isin(ids, chunk_ids).any()
        tokens = st.chunker.chunk_many([small_docs[base64_doc]["text"]])[0][0].token_ids
        nb = st.neighbors(np.asarray(tokens)[None, :], k=4)
        assert not np.isin(nb.chunk_ids, chunk_ids).any() and (nb.chunk_ids >= 0).all()
        out = st.precompute_neighbors(real_store.parent / "nb.npy", k=3, progress=False)
        arr = np.load(out)
        assert not np.isin(arr, chunk_ids).any()
        assert (arr[chunk_ids] == -1).all()  # deleted chunks query nothing
        with pytest.raises(InvalidInputError, match="deleted"):
            st.get_document(base64_doc)
        with pytest.raises(InvalidInputError, match="deleted"):
            st.get_chunks([int(chunk_ids[0])])
        with pytest.raises(InvalidInputError, match="outside the committed range"):
            st.delete(len(small_docs) + 5)
        assert st.verify() == []
    with retrostore.open(real_store, version=v_before, embedder=embedder) as old:
        assert any(h.doc_id == base64_doc for h in old.search(query, k=5))  # time travel until compact


def test_compact_purges_every_file_and_keeps_ids(real_store, embedder):
    with retrostore.open(real_store, "a", embedder=embedder) as st:
        gone = [3, 19]
        gone_chunks = np.concatenate([np.array(st.get_document(d).chunk_ids) for d in gone])
        keep_doc = st.get_document(7)
        st.delete(gone)
        st.commit()
        v = st.compact(progress=False)
        assert st.version == v and st.verify() == []
        info = st.info()
        assert info["deletes"]["purged_documents"] == 2 and info["deletes"]["purged_chunks"] == len(gone_chunks)
        assert info["vectors"] == len(st) - len(gone_chunks) and len(st.manifest["index"]["segments"]) == 1
        assert [int(p.name[9:21]) for p in (real_store / "versions").glob("manifest-*.json")] == [v]
        for d in gone:
            assert st._table.get_doc(d) is None
        assert all(r is None for r in [st._table.get_doc(d) for d in gone])
        assert st.get_document(7).text == keep_doc.text and st.get_document(7).chunk_ids == keep_doc.chunk_ids
        from retrostore.storage.vectors import RawVectors

        raw = RawVectors(real_store, st.manifest["vectors"]["files"], 384)
        assert not raw.take(gone_chunks).any()
        hits = st.search("decode base64 encoded data back into bytes", k=len(st))
        assert not np.isin([h.chunk_id for h in hits], gone_chunks).any()
        assert len(hits) == len(st) - len(gone_chunks)
        st.append("a new document after the purge")
        st.commit()
        assert st.verify() == []
    with retrostore.open(real_store) as r:
        assert r.verify() == []
    # a purged store ships: pack counted its records against the ids, not the ids less the purged ones
    retrostore.pack(real_store, real_store.parent / "purged.tar")
    retrostore.unpack(real_store.parent / "purged.tar", real_store.parent / "unpacked.rstore")
    with retrostore.open(real_store.parent / "unpacked.rstore") as r:
        assert r.verify() == [] and r.info()["deletes"]["purged_documents"] == 2
        assert all(r._table.get_doc(d) is None for d in gone)


def test_compact_interrupted_after_its_manifest_is_finished_by_the_next_writer(real_store, embedder, monkeypatch):
    from retrostore.storage.chunktable import ChunkTable

    class Crash(Exception):
        pass

    original = ChunkTable.purge

    def crashing(self, docs, before_commit, version):
        def publish_then_crash(chain):
            before_commit(chain)  # the manifest is published ...
            raise Crash("... and the process dies before LMDB commits")
        return original(self, docs, publish_then_crash, version)

    with retrostore.open(real_store, "a", embedder=embedder) as st:
        st.delete([2, 5])
        st.commit()
        monkeypatch.setattr(ChunkTable, "purge", crashing)
        with pytest.raises(Crash):
            st.compact(progress=False)
        monkeypatch.setattr(ChunkTable, "purge", original)
        assert st._table.get_doc(2) is not None  # LMDB still holds the records
        v = st.version
    with retrostore.open(real_store, "a", embedder=embedder) as st:  # recovery finishes the purge
        assert st.version == v and st._table.get_doc(2) is None and st._table.get_doc(5) is None
        assert st.verify() == []


def test_reindex_without_re_embedding(tmp_path, rng):
    x = _vectors(rng, 3000)
    path = tmp_path / "s"
    with retrostore.create(path, embedder=FakeEmbedder()) as st:
        st.append([f"d{i}" for i in range(len(x))], embeddings=x)
        st.commit()
        st.delete([10, 11])
        st.commit()
    with retrostore.open(path, "a", embedder=FakeEmbedder()) as st:  # embed() raises
        v = st.reindex("IVF32,PQ16x4", train_size=2000, seed=7, params={"nprobe": 32, "rerank": 20}, progress=False)
        m = st.manifest["index"]
        assert v == 3 and m["factory"] == "IVF32,PQ16x4" and m["trained"]["sample"] == 2000
        assert m["trained"]["seed"] == 7 and m["params"] == {"nprobe": 32, "rerank": 20}
        assert st.verify() == []
        ev = st.evaluate(queries=200, k=10)
        assert ev["recall_at_k"] >= 0.95 and ev["params"]["nprobe"] == 32 and ev["params"]["rerank"] == 20
        _, ids = st.search_vectors(x[:50], 5)
        assert not np.isin(ids, [10, 11]).any()
        assert (ids[:10, 0] == np.arange(10)).all()
        st.reindex("auto", progress=False)  # small store: back to exact Flat
        assert st.manifest["index"]["factory"] == "Flat" and st.verify() == []


def test_eval_and_reindex_refuse_a_k_or_seed_they_cannot_honour(tmp_path, rng):
    """helper-16: k at or above the store's size read padding as the k-th exact score (recall 0.0 on an
    exact index) or allocated queries x k x dim floats (a bare MemoryError); a negative seed, and a
    huge thread count (a segmentation fault in OpenMP), crashed instead of saying what to give."""
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="Flat") as st:
        _fill(st, rng, 300)
        st.commit()
        assert st.evaluate(queries=20, k=299)["recall_at_k"] == 1.0  # every other vector: all found
        for k in (300, 100_000):
            with pytest.raises(InvalidInputError, match=rf"k={k} is more than the 299 neighbours .* k <= 299"):
                st.evaluate(queries=20, k=k)
        for seed in (-1, 1.5, "a", True):
            with pytest.raises(InvalidInputError, match=r"seed=.* must be an int in \[0, 2\*\*63 - 1\]"):
                st.evaluate(queries=20, seed=seed)
            with pytest.raises(InvalidInputError, match=r"seed=.* must be an int in \[0, 2\*\*63 - 1\]"):
                st.reindex("IVF4,Flat", seed=seed, progress=False)
        assert st.version == 1 and st.manifest["index"]["factory"] == "Flat" and st.verify() == []
    for threads in (0, -3, 10**5, "2", 2.0, True, [2]):
        with pytest.raises(InvalidInputError, match=r"threads=.* must be an int in \[1, \d+\]"):
            retrostore.open(tmp_path / "s", threads=threads)
    with retrostore.open(tmp_path / "s", threads=np.int64(1)) as st:
        assert st.threads == 1


def test_reindex_needs_the_vectors(tmp_path, rng):
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), keep_vectors=False, index="IVF8,PQ8x4") as st:
        _fill(st, rng, 1000)
        st.commit()  # trained from the exact Flat phase, no raw vectors needed
        assert st.manifest["index"]["factory"] == "IVF8,PQ8x4"
        with pytest.raises(RetrostoreError, match="keep_vectors=False"):
            st.reindex("IVF16,Flat", progress=False)
        with pytest.raises(RetrostoreError, match="keep_vectors=False"):
            st.evaluate(queries=10)


def test_fast_scan_lists_merge_exactly(rng):
    """FAISS 1.15's merge_from aborts the process on IVF fast-scan lists (BlockInvertedLists.add_entries
    copies past a list whose length is a multiple of its block's bytes): merge_fast_scan merges them
    list by list, to exactly the index that adding every vector with its id gives."""
    from retrostore.index.merge import is_fast_scan, merge_fast_scan

    x = _vectors(rng, 12_000, uniform=True)
    for factory in ("IVF8,PQ8x4fs", "IVF16,PQ16x4fs"):
        template = train_template(factory, 64, "ip", x[:2000])
        parts = [(0, 1500), (1500, 1501), (3000, 3400), (4000, 7072), (8000, 12_000)]  # 3,072: 24 and 12 blocks
        segs = []
        for a, b in parts:
            seg = faiss_clone(template)
            seg.add(x[a:b])
            segs.append((seg, a))
        merged = faiss_clone(template)
        assert is_fast_scan(merged)
        merge_fast_scan(merged, segs)
        ref = faiss_clone(template)
        ids = np.concatenate([np.arange(a, b) for a, b in parts])
        ref.add_with_ids(x[ids], ids)
        assert merged.ntotal == ref.ntotal == len(ids)
        for index in (merged, ref):
            index.nprobe = 4
        d1, i1 = merged.search(x[:200], 20)
        d2, i2 = ref.search(x[:200], 20)
        assert (i1 == i2).all() and (d1 == d2).all()


@pytest.mark.parametrize("factory,dim", [("IVF4,PQ48x4fs", 384), ("IVF4,PQ8x4fs", 64), ("IVF4,PQ5x4fs", 30),
                                         ("IVF4,PQ3x4fs", 30), ("IVF4,PQ192x4fs", 384)])
def test_pq4_layout_packs_as_faiss_packer(factory, dim, rng):
    """PQ4Layout (the merge's whole-list packing) gives FAISS's CodePacker's blocks byte for byte, and
    unpacks them back, for even and odd sub-quantizer counts and lists that end inside a block."""
    from retrostore.index.merge import PQ4Layout

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    packer = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).packer
    layout = PQ4Layout.of(packer)
    nvec, cs, bs = layout.nvec, layout.code_size, layout.block_size
    m = int(factory.split("PQ")[1].split("x")[0])
    for n in (1, 31, 32, 33, 100):
        codes = rng.integers(0, 256, (n, cs), dtype=np.uint8)
        if m % 2:
            codes[:, -1] &= 15  # odd M: the last byte's top half is no sub-quantizer's
        flat = np.zeros(layout.blocks(n) * nvec * cs, np.uint8)
        flat[: n * cs] = codes.ravel()
        ref = np.zeros(layout.blocks(n) * bs, np.uint8)
        for b in range(layout.blocks(n)):
            packer.pack_all(faiss.swig_ptr(flat[b * nvec * cs:]), faiss.swig_ptr(ref[b * bs:]))
        assert np.array_equal(layout.pack(codes), ref)
        assert np.array_equal(layout.unpack(ref, n), codes)


def test_fast_scan_store_merges_tiers_and_compacts(tmp_path, rng):
    """A fast-scan store through tier merges (8 segments of one tier) and a compaction with deletes."""
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="IVF16,PQ8x4fs",
                           index_params={"nprobe": 16, "rerank": 200}) as st:
        parts = [_fill(st, rng, 1000)]
        st.commit()
        assert st.manifest["index"]["factory"] == "IVF16,PQ8x4fs"
        for b in range(1, 10):
            parts.append(_fill(st, rng, 600, start=1000 + 600 * (b - 1)))
            st.commit()
        assert len(st.manifest["index"]["segments"]) < 10  # eight 600-vector segments merged into one
        x = np.concatenate(parts)
        _, ids = st.search_vectors(x[::97], 1)
        assert (ids[:, 0] == np.arange(0, len(x), 97)).mean() > 0.97
        st.delete(range(0, 200))
        st.commit()
        st.compact(progress=False)
        assert len(st.manifest["index"]["segments"]) == 1 and st.info()["vectors"] == len(x) - 200
        _, ids = st.search_vectors(x[300::97], 1)
        assert (ids[:, 0] == np.arange(300, len(x), 97)).mean() > 0.97
        assert st.verify() == []


def test_vectors_files_at_their_final_size_are_not_merged(tmp_path, rng, monkeypatch):
    """A tier merge of IVF segments merges the small vectors files under it and leaves those of
    FINAL_VECTORS_BYTES or more alone (rewriting them saves nothing; issue 17's ingest): the files
    still tile the ids, every row reads back, verify and compact pass, a reader opens it."""
    from retrostore.store import batch
    from retrostore.storage.vectors import RawVectors

    monkeypatch.setattr(batch, "FINAL_VECTORS_BYTES", 50_000)  # 500 float16 64-d rows: 64.1 KB; 100: 12.9 KB
    sizes = [1000, 500, 500, 100, 100, 100, 500, 100, 100]  # after the first, eight segments of one tier
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="IVF16,PQ8x4fs",
                           index_params={"nprobe": 16, "rerank": 200}) as st:
        parts, start = [], 0
        for n in sizes:
            parts.append(_fill(st, rng, n, start=start))
            start += n
            st.commit()
        m = st.manifest
        assert [s["count"] for s in m["index"]["segments"]] == [1000, 2000]  # the eight newest merged
        files = [(e["first_id"], e["count"]) for e in m["vectors"]["files"]]
        assert files == [(0, 1000), (1000, 500), (1500, 500), (2000, 300), (2300, 500), (2800, 200)]
        x = np.concatenate(parts)
        raw = RawVectors(st.path, m["vectors"]["files"], 64)
        assert np.allclose(raw.take(np.arange(len(x))), x, atol=1e-3)
        _, ids = st.search_vectors(x[::37], 1)
        assert (ids[:, 0] == np.arange(0, len(x), 37)).mean() > 0.97
        assert st.verify() == []
        st.delete([3, 1500])
        st.commit()
        st.compact(progress=False)
        assert st.verify() == []
    with retrostore.open(tmp_path / "s") as rd:
        assert rd.verify() == [] and len(rd) == len(x)


@pytest.mark.parametrize("n_files", [1, 7])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_raw_vectors_score_candidates_across_files(tmp_path, rng, n_files, metric):
    """RawVectors.scores (re-ranking) against numpy on the same float16 rows: candidates spread
    over one or several files, one query or a batch, -1 and out-of-range ids giving NaN."""
    from retrostore.storage.vectors import RawVectors, write_store_vectors

    (tmp_path / "vectors").mkdir()
    x = rng.standard_normal((700, 32)).astype(np.float16)
    cuts = np.linspace(0, len(x), n_files + 1).astype(int)
    entries = [{**write_store_vectors(tmp_path, f"vectors/v{i}.npy", x[a:b], "float16", []),
                "first_id": int(a), "count": int(b - a)} for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
    raw = RawVectors(tmp_path, entries, 32)
    xf = x.astype(np.float32)
    for n in (1, 5):
        q = rng.standard_normal((n, 32)).astype(np.float32)
        ids = rng.integers(0, len(x), (n, 40))
        ids[:, 3] = -1
        ids[:, 7] = len(x) + 5
        got = raw.scores(ids, q, metric)
        rows = xf[np.clip(ids, 0, len(x) - 1)]
        want = (np.einsum("nkd,nd->nk", rows, q) if metric == "ip" else ((rows - q[:, None]) ** 2).sum(-1))
        valid = (ids >= 0) & (ids < len(x))
        assert np.isnan(got[~valid]).all()
        assert np.allclose(got[valid], want[valid], rtol=1e-5, atol=1e-4)
    # files not starting at id 0 (never in a store: verify checks that they tile from 0): ids below
    # the first file are NaN, as ids beyond the last
    late = RawVectors(tmp_path, [{**e, "first_id": e["first_id"] + 100} for e in entries], 32)
    q = rng.standard_normal((1, 32)).astype(np.float32)
    got = late.scores(np.array([[5, 105, 115, 99]]), q, metric)
    assert np.isnan(got[0, [0, 3]]).all() and not np.isnan(got[0, [1, 2]]).any()
    assert np.isnan(late.scores(np.array([[1, 2]]), q, metric)).all()


def _four_commits_with_deletes(st, rng) -> tuple[np.ndarray, np.ndarray]:
    """1,000 vectors (the commit that trains), three commits of 400, then chunks 5, 1200 and 1700
    deleted; returns the vectors and queries near every 37th of them."""
    parts = [_fill(st, rng, 1000)]
    st.commit()
    for b in range(3):
        parts.append(_fill(st, rng, 400, start=1000 + 400 * b))
        st.commit()
    st.delete([5, 1200, 1700])
    st.commit()
    x = np.concatenate(parts)
    q = x[::37] + 0.05
    return x, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_reader_merges_fast_scan_segments_in_memory(tmp_path, rng):
    """A read-only handle's first search merges a streamed store's fast-scan segments into one
    in-memory index (issue 17: per-segment probing cost 1.6x raw FAISS at 1M vectors): the answers
    are those of the segments here (ids and scores, deleted documents left out, per-query
    parameters; ties among equal code scores may order differently on larger stores), the next
    version reuses the merged index, the files never change, a writer never merges."""
    path = tmp_path / "s"
    params = {"nprobe": 8, "rerank": 20}
    with retrostore.create(path, embedder=FakeEmbedder(), index="IVF16,PQ8x4fs", index_params=params) as st:
        x, q = _four_commits_with_deletes(st, rng)
        want = st.search_vectors(q, 10)
        want_np = st.search_vectors(q, 10, params={"nprobe": 2})
        assert len(st._head.version.segments) == 4  # a writer keeps its segments
    files = sorted((p.name, p.stat().st_size) for p in path.rglob("*") if p.is_file() and p.name != "lock.mdb")

    with retrostore.open(path) as rd:
        assert rd.info()["index"]["segments_searched"] == 4  # opening merges nothing
        rd.search_vectors(q[:1], 10)  # the first search merges
        merged = rd._head.version.segments
        assert len(merged) == 1 and merged[0].count == len(x)  # deleted chunks stay indexed until compact
        assert rd.info()["index"]["segments_searched"] == 1
        assert rd._head._segments == {}  # the segments are no one's any more: freed
        got = rd.search_vectors(q, 10)
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
        got_np = rd.search_vectors(q, 10, params={"nprobe": 2})
        assert np.array_equal(got_np[1], want_np[1])
        assert not np.isin(got[1], [5, 1200, 1700]).any()

        with retrostore.open(path, mode="a", embedder=FakeEmbedder()) as st:
            _fill(st, rng, 400, start=2200)
            st.commit()
            want2 = st.search_vectors(q, 10)
        rd.refresh()
        segs = rd._head.version.segments
        assert len(segs) == 2 and segs[0] is merged[0]  # the merged index serves the next version too
        rd.search_vectors(q[:1], 10)
        assert len(rd._head.version.segments) == 1
        assert np.array_equal(rd.search_vectors(q, 10)[1], want2[1])
        with retrostore.open(path) as fresh:  # a follower's lists are a fresh reader's, in the same order
            a, b = rd.search_vectors(q, 50, params={"rerank": 0}), fresh.search_vectors(q, 50, params={"rerank": 0})
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    after = sorted((p.name, p.stat().st_size) for p in path.rglob("*") if p.is_file() and p.name != "lock.mdb")
    assert {f for f in files if f[0].startswith("seg-")} <= set(after)  # merged in memory only


def test_flat_fast_scan_codes_concatenate_as_add_writes_them(rng):
    """concat_flat_fast_scan gives the bytes that adding every vector to one index gives, also where
    FAISS's merge_from leaves stale bytes in the last block's unused slots (a base that held more
    codes: helper-14 found merged segment files that differed from build to build); blocks of 64
    codes are refused (FAISS's merge_from scrambles them)."""
    from retrostore.index.merge import concat_flat_fast_scan, is_flat_fast_scan

    x = _vectors(rng, 3000)
    template = faiss.index_factory(64, "PQ16x4fs", faiss.METRIC_INNER_PRODUCT)
    template.train(x)

    def built(lo, hi):
        index = faiss.clone_index(template)
        index.add(x[lo:hi])
        return index

    def codes(index):
        index = faiss.downcast_index(index)
        return faiss.rev_swig_ptr(index.codes.get(), index.codes.size()).copy()

    for n1, n2 in [(1000, 245), (7, 9), (32, 5), (64, 64)]:
        base = faiss.clone_index(template)
        base.add(x)
        base.reset()  # keeps its buffer: merge_from's new codes land on stale bytes
        concat_flat_fast_scan(base, [built(0, n1), built(n1, n1 + n2)])
        assert base.ntotal == n1 + n2 and np.array_equal(codes(base), codes(built(0, n1 + n2)))
    wide = faiss.index_factory(64, "PQ16x4fs_64", faiss.METRIC_INNER_PRODUCT)
    assert not is_flat_fast_scan(wide)
    with pytest.raises(InvalidInputError, match="blocks of 32"):
        concat_flat_fast_scan(wide, [])


def test_fast_scan_in_blocks_of_64_merges_by_re_encoding(tmp_path, rng):
    """FAISS 1.15's merge_from scrambles fast-scan codes in blocks of 64 (helper-14: recall@10 0.88
    after a writer's tier merge, 0.54 after a reader's merge in memory, against 0.998): such
    segments merge by re-encoding the stored vectors, and a reader searches them as written."""
    path = tmp_path / "s"
    with retrostore.create(path, embedder=FakeEmbedder(), index="PQ16x4fs_64", index_params={"rerank": 20}) as st:
        _fill(st, rng, 1500)
        st.commit()
        for b in range(9):  # eight segments of one tier merge into one
            _fill(st, rng, 40, start=1500 + 40 * b)
            st.commit()
        assert st.manifest["index"]["factory"] == "PQ16x4fs_64" and len(st.manifest["index"]["segments"]) < 10
        assert st.evaluate(queries=200, k=10)["recall_at_k"] > 0.97
    with retrostore.open(path) as rd:
        assert rd.evaluate(queries=200, k=10)["recall_at_k"] > 0.97
        assert rd.info()["index"]["segments_searched"] == len(rd.manifest["index"]["segments"])  # not merged


def test_inspect_says_when_an_explicit_factory_will_train(tmp_path, rng):
    """A store created with a factory that needs training says how many vectors it takes (39 per
    centroid of its largest stage: 16 x 39 for 4-bit PQ) and how many are still to go."""
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="PQ16x4fs") as st:
        _fill(st, rng, 300)
        st.commit()
        pending = st.info()["index"]["pending"]
        assert pending["at_vectors"] == 624 and pending["train_sample"] == 624
        assert "reaches 624 vectors" in pending["what"] and "324 to go" in pending["what"]
        _fill(st, rng, 400, start=300)
        st.commit()
        assert st.manifest["index"]["factory"] == "PQ16x4fs" and st.info()["index"]["pending"] is None
    with retrostore.create(tmp_path / "t", embedder=FakeEmbedder(), index="PQ16x4fs", train_size=500) as st:
        _fill(st, rng, 300)
        st.commit()
        pending = st.info()["index"]["pending"]
        assert pending["at_vectors"] is None and "train_size 500 is below the 624" in pending["what"]


def test_reader_merges_flat_fast_scan_segments_in_memory(tmp_path, rng):
    """The 16-byte recipe (docs/index.md: a flat fast-scan code, no IVF lists) is merged in memory
    too: consecutive segments' codes concatenate into one index, which answers as the segments do
    (ids and scores, deleted documents left out); segments with holes are never concatenated."""
    from retrostore.index.merge import flat_fast_scan_run, is_flat_fast_scan

    path = tmp_path / "s"
    with retrostore.create(path, embedder=FakeEmbedder(), index="PQ16x4fs", index_params={"rerank": 20}) as st:
        x, q = _four_commits_with_deletes(st, rng)
        assert st.manifest["index"]["factory"] == "PQ16x4fs"
        want = st.search_vectors(q, 10)
        assert len(st._head.version.segments) == 4  # a writer keeps its segments
        segs = st._head.version.segments
        assert flat_fast_scan_run(segs) and not flat_fast_scan_run([segs[0], segs[2]])
    with retrostore.open(path) as rd:
        rd.search_vectors(q[:1], 10)  # the first search merges
        merged = rd._head.version.segments
        assert len(merged) == 1 and merged[0].count == len(x) and is_flat_fast_scan(merged[0].index)
        got = rd.search_vectors(q, 10)
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
        assert not np.isin(got[1], [5, 1200, 1700]).any()


def test_default_index_follows_the_store_size(tmp_path, rng, monkeypatch):
    """Flat, then an HNSW graph, then IVF fast-scan + re-ranking trained once (issue 17); the re-ranking
    depth follows the store's size at every commit (issue 19); inspect says what is pending."""
    from retrostore.index import policy

    assert default_factory(4_999, 384) == "Flat"
    assert default_factory(5_000, 384) == "HNSW32,SQfp16"
    assert default_factory(50_000, 384, keep_vectors=False) == "Flat"  # no raw vectors: nothing could train later
    assert default_factory(51_429, 384, trained=True) == "IVF1024,PQ48x4fs"  # 24-byte codes: one per 8 dims
    assert default_factory(100_000, 384) == "IVF1024,PQ48x4fs"
    assert default_factory(1_000_000, 384) == "IVF512,PQ48x4fs"  # centroids <= 1 byte/vector
    assert default_factory(5_000_000, 384) == "IVF2048,PQ48x4fs"
    assert default_factory(1_000_000, 768) == "IVF256,PQ96x4fs"
    assert default_factory(1_000_000, 384, keep_vectors=False) == "IVF512,SQ8"
    assert default_factory(1_000_000, 384, mmap=True) == "IVF512,PQ8"  # fast-scan codes cannot be mapped
    assert default_factory(3000, 64, trained=True) == "IVF64,PQ8x4fs"
    assert policy.default_rerank(100_000) == policy.default_rerank(3_200_000) == 100
    assert policy.default_rerank(5_000_000) == 153  # 1,530 candidates for k = 10: 1/3,277 of the store
    assert policy.default_params("IVF1024,PQ48x4fs", keep_vectors=True, n=5_000_000) == {"nprobe": 256, "rerank": 153}
    assert policy.default_params("IVF64,SQ8", keep_vectors=False) == {"nprobe": 16}  # nlist / 4
    assert policy.default_params("HNSW32,SQfp16", keep_vectors=True, n=50_000) == {"efSearch": 128}
    monkeypatch.setattr(policy, "EXACT_MAX", 500)
    monkeypatch.setattr(policy, "AUTO_TRAIN_MIN", 3000)
    monkeypatch.setattr(policy, "RERANK_FRACTION", 1 / 5)  # 10 x rerank candidates = 1/5 of the store
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder()) as st:
        _fill(st, rng, 400)
        st.commit()
        m = st.manifest["index"]
        assert m["factory"] == "Flat" and m["target"] == "auto"
        pending = st.info()["index"]["pending"]
        assert pending["factory"] == "HNSW32,SQfp16" and pending["at_vectors"] == 500 and pending["train_sample"] == 0
        _fill(st, rng, 600, start=400)
        st.commit()  # 1,000 vectors: the graph, built from the stored vectors (nothing trained)
        m = st.manifest["index"]
        assert m["factory"] == "HNSW32,SQfp16" and not m["template"] and m["params"] == {"efSearch": 128}
        pending = st.info()["index"]["pending"]
        assert pending["factory"] == "IVF64,PQ8x4fs" and pending["at_vectors"] == 3000 and pending["train_sample"] == 3000
        assert "training 'IVF64,PQ8x4fs'" in st.info()["index"]["hint"]
        assert st.evaluate(queries=100, k=10)["recall_at_k"] > 0.95
        _fill(st, rng, 2000, start=1000)
        st.commit()
        m = st.manifest["index"]
        assert m["factory"] == "IVF64,PQ8x4fs" and m["template"] and m["trained"]["vectors"] == 3000
        assert m["params"] == {"nprobe": 16, "rerank": 100}  # nlist / 4; max(100, ceil(3000 / 5 / 10))
        assert st.info()["index"]["pending"] is None and st.info()["index"]["hint"] is None
        assert st.verify() == []
        ev = st.evaluate(queries=100, k=10)
        assert ev["recall_at_k"] > 0.9 and ev["params"]["nprobe"] == 16
        _fill(st, rng, 100, start=3000)  # small commit: cloned template, no retraining, rerank follows the size
        st.commit()
        m = st.manifest["index"]
        assert m["trained"]["vectors"] == 3000 and m["segments"][-1]["count"] == 100 and m["params"]["rerank"] == 100
        _fill(st, rng, 45_000, start=3100)  # 16x the trained size: never retrained by a commit; inspect says so
        st.commit()
        m = st.manifest["index"]
        assert m["trained"]["vectors"] == 3000 and m["factory"] == "IVF64,PQ8x4fs" and m["params"]["rerank"] == 962
        assert "would train 'IVF1024,PQ8x4fs' now" in st.info()["index"]["hint"]


# -- exact segments at vector_dtype precision (format 3) ----------------------
def test_flat_segments_are_float16_and_every_handle_searches_the_same(tmp_path, small_docs, embedder):
    from retrostore.storage.segments import FP16

    texts = [d["text"] for d in small_docs]
    queries = embedder.embed(["How do I encode bytes as base64?", "a list of strings", "print a float"])
    found = {}
    for dtype in ("float16", "float32"):
        path = tmp_path / dtype
        with retrostore.create(path, embedder=embedder, vector_dtype=dtype) as st:
            chunks = st.chunker.chunk_many(texts)
            vecs = embedder.embed([t[c.start : c.end] for t, doc in zip(texts, chunks) for c in doc])  # float32
            half = vecs.astype(np.float16).astype(np.float32)
            st.append(texts[:10], embeddings=vecs[:sum(map(len, chunks[:10]))], chunks=chunks[:10])
            st.commit()
            st.append(texts[10:], embeddings=vecs[sum(map(len, chunks[:10])):], chunks=chunks[10:])
            st.commit()
            m = st.manifest
            writer = st.search_vectors(queries, 10)
            stored = st._head.version.stored_vectors(0, len(vecs))
        segs = m["index"]["segments"]
        if dtype == "float16":
            assert all(e["codec"] == FP16 for e in segs) and m["min_reader_version"] == 3
            assert m["format_version"] == 4  # format 4: raw vectors files with block checksums
            # the file holds 2 bytes per value (plus FAISS's header), the index in memory exactly those values
            assert sum(e["size"] for e in segs) < len(vecs) * 384 * 2 + 1024 * len(segs)
            np.testing.assert_array_equal(stored, half)
        else:
            assert not any("codec" in e for e in segs)
            np.testing.assert_array_equal(stored, vecs)
        for kw in ({}, {"mmap": True}):  # a fresh reader (decoded to float32 Flat), a mapped one (SQfp16)
            with retrostore.open(path, **kw) as st:
                assert st.verify() == []
                scores, ids = st.search_vectors(queries, 10)
                np.testing.assert_array_equal(ids, writer[1])
                np.testing.assert_allclose(scores, writer[0], rtol=0, atol=1e-6)
        found[dtype] = writer
    # float16 storage of real embeddings: the same top-10 sets as float32, scores within 1e-3
    for a, b in zip(found["float16"][1], found["float32"][1]):
        assert set(a) == set(b)
    np.testing.assert_allclose(np.sort(found["float16"][0]), np.sort(found["float32"][0]), atol=1e-3)


def test_exact_store_keeps_its_vectors_in_its_segments(tmp_path, rng):
    from retrostore.storage.vectors import RawVectors

    path = tmp_path / "s"
    x = _vectors(rng, 1600)
    half = x.astype(np.float16).astype(np.float32)
    with retrostore.create(path, embedder=FakeEmbedder(), index="Flat") as st:
        for i in range(8):  # eight commits of one tier: a merge
            st.append([f"d{j}" for j in range(200 * i, 200 * i + 200)], embeddings=x[200 * i : 200 * i + 200])
            st.commit()
        assert len(st.manifest["index"]["segments"]) == 1 and st.manifest["vectors"]["files"] == []
        assert not any((path / "vectors").iterdir()) and st.verify() == []
        assert st.info()["files"]["vectors_in_index"]
        np.testing.assert_array_equal(st._head.version.stored_vectors(0, 1600), half)
        assert st.evaluate(queries=50, k=10)["recall_at_k"] == 1.0
        st.delete([5, 6])
        st.commit()
        st.compact(progress=False)
        assert st.manifest["vectors"]["files"] == [] and st.verify() == []
        st.reindex("IVF16,SQ8", progress=False)  # needs raw vectors from now on: written from the segments
        files = st.manifest["vectors"]["files"]
        assert [(e["first_id"], e["count"]) for e in files] == [(0, 1600)] and st.verify() == []
        assert not st.info()["files"]["vectors_in_index"]
        raw = RawVectors(path, files, 64).rows(0, 1600)
        assert not raw[[5, 6]].any()  # purged chunks: zeros, as compact leaves them
        live = np.setdiff1d(np.arange(1600), [5, 6])
        np.testing.assert_array_equal(raw[live], half[live])
        st.append(["d1600"], embeddings=_vectors(rng, 1))  # files, once written, keep tiling the ids
        st.commit()
        assert [(e["first_id"], e["count"]) for e in st.manifest["vectors"]["files"]] == [(0, 1600), (1600, 1)]
        assert st.verify() == []
    with retrostore.create(tmp_path / "a", embedder=FakeEmbedder(), index="Flat") as st:
        _fill(st, rng, 300)
        st.commit()
        st.reindex("auto", progress=False)  # still Flat, but auto will train: files from now on
        assert st.manifest["index"]["factory"] == "Flat"
        assert [(e["first_id"], e["count"]) for e in st.manifest["vectors"]["files"]] == [(0, 300)]
        assert st.verify() == []


def test_a_codec_the_file_does_not_hold_is_corruption(tmp_path, rng):
    from retrostore import CorruptStoreError
    from retrostore.storage import manifest as _manifest

    def damaged(name, dtype, edit):
        path = tmp_path / name
        with retrostore.create(path, embedder=FakeEmbedder(), vector_dtype=dtype) as st:
            _fill(st, rng, 100)
            st.commit()
            body = st.manifest
        edit(body["index"]["segments"][0])
        (path / "manifest.json").write_bytes(_manifest.encode_manifest(body))
        return path

    cases = [
        (damaged("f32", "float32", lambda e: e.update(codec="fp16")), r"codec 'fp16'.*IndexFlat"),
        (damaged("fp8", "float16", lambda e: e.update(codec="fp8")), r"codec 'fp8'.*only codec is 'fp16'"),
        (damaged("none", "float16", lambda e: e.pop("codec")), r"index is Flat.*IndexScalarQuantizer.*no codec"),
    ]
    for path, match in cases:
        for mmap in (False, True):  # a mapped handle serves fp16 files as they are: checked all the same
            with pytest.raises(CorruptStoreError, match=r"seg-.*" + match):
                retrostore.open(path, mmap=mmap)


def test_a_users_sqfp16_index_is_not_exact(tmp_path, rng):
    """Only segments retrostore stored as float16 count as exact: an ``SQfp16`` factory rounds
    the vectors it is given, so reading them back, evaluating and re-ranking use the raw vectors."""
    x = _vectors(rng, 500, uniform=True)
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="SQfp16", vector_dtype="float32",
                           index_params={"rerank": 4}) as st:
        st.append([f"d{i}" for i in range(len(x))], embeddings=x)
        st.commit()
        assert st.manifest["index"]["factory"] == "SQfp16" and "codec" not in st.manifest["index"]["segments"][0]
        np.testing.assert_array_equal(st._head.version.stored_vectors(0, len(x)), x)  # the float32 files, not the codes
        assert st.info()["index"]["params"]["rerank"] == 4
        scores, _ = st.search_vectors(x[:5], 3)
        # re-scored from the float32 vectors: 1 to float32 precision (the float16 codes give ~1e-4 off)
        np.testing.assert_allclose(scores[:, 0], np.einsum("nd,nd->n", x[:5], x[:5]), rtol=0, atol=1e-6)


# -- memory mapping ----------------------------------------------------------
def test_mmap_search_matches_and_is_recorded(tmp_path, rng):
    path = tmp_path / "s"
    x = _vectors(rng, 1500)
    with retrostore.create(path, embedder=FakeEmbedder(), index="IVF16,PQ8x4", mmap=True) as st:
        st.append([f"d{i}" for i in range(len(x))], embeddings=x)
        st.commit()
    assert json.loads((path / "manifest.json").read_text())["body"]["settings"]["mmap"] is True
    with retrostore.open(path, embedder=FakeEmbedder()) as a, retrostore.open(path, mmap=False) as b:
        assert a.info()["index"]["mmap"] and not b.info()["index"]["mmap"]
        for s in (a, b):
            assert s.verify() == []
        np.testing.assert_array_equal(a.search_vectors(x[:20], 5)[1], b.search_vectors(x[:20], 5)[1])
    with retrostore.open(path, "a", embedder=FakeEmbedder()) as st:  # a writer over mapped segments
        assert st.info()["index"]["mmap"]
        for i in range(8):  # tier merges copy the mapped sources (merge_from empties its source)
            _fill(st, rng, 30, start=1500 + 30 * i)
            st.commit()
        assert len(st.manifest["index"]["segments"]) == 2
        st.delete([0, 1])
        st.commit()
        st.compact(progress=False)
        assert st.verify() == [] and st.info()["vectors"] == 1738
    with pytest.raises(InvalidInputError, match="fast-scan"):
        retrostore.create(tmp_path / "fs", embedder=FakeEmbedder(), index="IVF16,PQ16x4fs", mmap=True)
    with retrostore.create(tmp_path / "fs2", embedder=FakeEmbedder(), index="IVF16,PQ16x4fs") as st:
        _fill(st, rng, 1000)
        st.commit()
    with pytest.raises(InvalidInputError, match="fast-scan"):
        retrostore.open(tmp_path / "fs2", mmap=True)


def test_cli_reindex_compact_eval(tmp_path, rng):
    from click.testing import CliRunner

    mod = checkout_cli_module()
    path = tmp_path / "s"
    with retrostore.create(path, embedder=FakeEmbedder()) as st:
        _fill(st, rng, 2000)
        st.commit()
    runner = CliRunner()
    res = runner.invoke(mod.cli, ["reindex", str(path), "--index", "IVF16,Flat", "--param", "nprobe=4", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(mod.cli, ["reindex", str(path), "--index", "IVF4096,PQ8", "-q"])
    assert res.exit_code == 1 and "IndexTrainingError" in res.output and "Use '" in res.output
    res = runner.invoke(mod.cli, ["delete", str(path), "1", "2", "2"])
    assert res.exit_code == 0 and "deleted 2 documents (0 already deleted)" in res.output, res.output
    res = runner.invoke(mod.cli, ["delete", str(path), "2", "3"])
    assert res.exit_code == 0 and "deleted 1 document (1 already deleted)" in res.output, res.output
    res = runner.invoke(mod.cli, ["compact", str(path), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(mod.cli, ["eval", str(path), "--queries", "50", "--k", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["k"] == 5 and 0 <= out["recall_at_k"] <= 1 and out["params"]["nprobe"] == 4
    assert out["latency_ms"]["p50"] > 0
    res = runner.invoke(mod.cli, ["eval", str(path), "--queries", "50", "--param", "nprobe=16"])
    assert res.exit_code == 0 and "recall@10" in res.output, res.output


_COMPACT_FAST_SCAN = r"""
import sys
import numpy as np
import retrostore
sys.path.insert(0, sys.argv[2])
from test_index import FakeEmbedder, _fill
rng = np.random.default_rng(0)
with retrostore.create(sys.argv[1], embedder=FakeEmbedder(), index="IVF8,PQ8x4fs",
                       index_params={"nprobe": 8, "rerank": 100}) as st:
    parts, start = [], 0
    for n in (3000, 3072, 1500, 1, 3400, 3072):  # list lengths that fill whole blocks (see the merge test)
        parts.append(_fill(st, rng, n, start=start))
        start += n
        st.commit()
    x = np.concatenate(parts)
    st.delete(range(0, 100))
    st.commit()
    before = st.search_vectors(x[100::37], 1)[1]
    st.compact(progress=False)
    assert len(st.manifest["index"]["segments"]) == 1 and st.info()["vectors"] == len(x) - 100
    _, ids = st.search_vectors(x[100::37], 1)
    truth = np.arange(100, len(x), 37)
    assert (ids[:, 0] >= 100).all() and (ids[:, 0] == truth).mean() >= (before[:, 0] == truth).mean() - 0.02 > 0.88
    assert st.verify() == []
print("ok")
"""


def test_compact_of_a_fast_scan_store_never_aborts(tmp_path):
    """compact merged fast-scan segments with FAISS's merge_from, which aborts the process on lists
    that fill whole blocks ("corrupted double-linked list", seen on a 700k-chunk default store), and
    purged with remove_ids: it now merges list by list (merge_fast_scan) and drops purged ids there.
    In a child process, so that a regression fails this test instead of killing the test run."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _COMPACT_FAST_SCAN, str(tmp_path / "s"), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])


def test_batches_of_an_ip_store_take_blas_and_faiss_settings_are_restored(tmp_path, rng, monkeypatch):
    """FAISS 1.15 ships distance_compute_blas_threshold = 128,000 (queries x dim): batches under 333
    queries of 384-d scanned every vector once per query, 3-8x slower than BLAS on 2 cores
    (benchmarks/flat_batch.py). A store lowers it while it searches a batch of an inner-product
    index, and restores it after; never for L2 (BLAS's |x|^2 + |y|^2 - 2xy loses precision on large
    norms), never a user's own value, and importing retrostore changes nothing."""
    import subprocess
    import sys

    import retrostore.index.search as S

    probe = "import faiss; a = faiss.cvar.distance_compute_blas_threshold; import retrostore; " \
            "print(a, faiss.cvar.distance_compute_blas_threshold)"
    before, after = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                   timeout=120).stdout.split()
    assert before == after
    if faiss.cvar.distance_compute_blas_threshold != 128_000:
        pytest.skip("this FAISS does not ship 128,000")
    seen = []
    real = S._segment_search

    def spy(*args):
        seen.append(faiss.cvar.distance_compute_blas_threshold)
        return real(*args)

    monkeypatch.setattr(S, "_segment_search", spy)
    for metric in ("ip", "l2"):
        with retrostore.create(tmp_path / metric, embedder=FakeEmbedder(), index="Flat", metric=metric) as st:
            _fill(st, rng, 500)
            st.commit()
            q = _vectors(rng, 64)
            for batch, lowered in ((q, metric == "ip"), (q[:1], False), (q[:8], False)):  # 8 x 64 < 2,304
                seen.clear()
                st.search_vectors(batch, 5)
                assert seen == [S.BLAS_THRESHOLD if lowered else 128_000], (metric, len(batch), seen)
                assert faiss.cvar.distance_compute_blas_threshold == 128_000
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 500)  # the user's own choice
    with retrostore.open(tmp_path / "ip") as st:
        seen.clear()
        st.search_vectors(q, 5)
    assert seen == [500] and faiss.cvar.distance_compute_blas_threshold == 500


def test_a_batch_finds_what_single_queries_find(tmp_path, rng):
    """Batches above the BLAS threshold (16 x 64-d here is below it; 64 queries above) and single
    queries: the same neighbours from an exact store, scores equal to float rounding."""
    with retrostore.create(tmp_path / "s", embedder=FakeEmbedder(), index="Flat") as st:
        _fill(st, rng, 3000)
        st.commit()
        q = _vectors(rng, 64)
        for batch in (q[:16], q):
            scores, ids = st.search_vectors(batch, 10)
            for row in range(len(batch)):
                s1, i1 = st.search_vectors(batch[row : row + 1], 10)
                np.testing.assert_array_equal(ids[row], i1[0])
                np.testing.assert_allclose(scores[row], s1[0], rtol=0, atol=1e-5)
