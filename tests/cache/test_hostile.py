"""Hostile and broken caches: a manifest never leads a reader outside its directory, a damaged shard is never
trained on, and a manifest of the wrong structure or an unreadable shard is a clear error (CLI exit 2), with
nothing in the cache changed."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch

import kvdistill.cache.reader as reader_mod
import kvdistill.cache.verify as verify_mod
from kvdistill.cache import CacheReader, CacheWriter, cache_info, make_meta, merge_parts, verify_cache
from kvdistill.cache.manifest import MANIFEST, structure_problems
from kvdistill.cli import main
from kvdistill.compress import Compression
from kvdistill.errors import CacheError

IDS = [f"s{i}" for i in range(4)]  # 2 shards of 2


def meta() -> dict:
    comp = Compression(kind="full", dtype="bfloat16").to_dict()
    return make_meta("org/tiny", {"num_layers": 1, "num_kv_heads": 2, "head_dim": 4}, "tok", comp, "data")


def sample(sid: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(sid[1:]))
    T = 3 + int(sid[1:])
    return {
        "token_ids": torch.arange(T),
        "positions": torch.arange(T),
        "spans": torch.stack([torch.arange(T), torch.arange(T) + 1], -1),
        "keys_l0": torch.randn(2, T, 4, generator=gen).bfloat16(),  # (H_kv, T, D)
        "values_l0": torch.randn(2, T, 4, generator=gen).bfloat16(),
    }


@pytest.fixture
def root(tmp_path) -> Path:
    """tmp/cache: a healthy 2-shard cache; tmp/outside/x.safetensors: a valid shard that is not the
    cache's."""
    cache = tmp_path / "cache"
    with CacheWriter(cache, meta(), shard_size=2) as w:
        for sid in IDS:
            w.add(sid, sample(sid))
    assert verify_cache(cache) == []
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.safetensors").write_bytes((cache / "shard-00000.safetensors").read_bytes())
    return tmp_path


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under `directory`: (kind, mtime_ns, sha256 of a file / target of a symlink)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(directory))] = ("link", st.st_mtime_ns, os.readlink(p))
        elif p.is_dir():
            out[str(p.relative_to(directory))] = ("dir", st.st_mtime_ns, None)
        else:
            out[str(p.relative_to(directory))] = (
                "file",
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def edit_manifest(cache: Path, change) -> None:
    m = json.loads((cache / MANIFEST).read_text())
    change(m)
    (cache / MANIFEST).write_text(json.dumps(m))


def squash(text: str) -> str:
    """`text` without whitespace: rich wraps long lines, even inside a long path."""
    return "".join(text.split())


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr without whitespace, see `squash`) of `kvdistill ARGS` run in-process; any exception
    other than SystemExit (a traceback) fails the test."""
    argv, sys.argv = sys.argv, ["kvdistill", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = argv
    return code, squash(capsys.readouterr().err)


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Resolved paths of every file the cache code opens for shard data (safetensors or sha256)."""
    seen: list[Path] = []
    for mod in (reader_mod, verify_mod):
        for name in ("safe_open", "sha256_file"):
            real = getattr(mod, name)

            def spy(path, *a, _real=real, **kw):
                seen.append(Path(path).resolve())
                return _real(path, *a, **kw)

            monkeypatch.setattr(mod, name, spy)
    return seen


# ------------------------------------------------------------------------------ paths out of the cache
def _parent(root: Path) -> str:
    edit_manifest(root / "cache", lambda m: m["shards"][0].update(file="../outside/x.safetensors"))
    return "shards[0].file '../outside/x.safetensors'"


def _absolute(root: Path) -> str:
    target = str(root / "outside" / "x.safetensors")
    edit_manifest(root / "cache", lambda m: m["shards"][0].update(file=target))
    return f"shards[0].file is the absolute path '{target}'"


def _etc_passwd(root: Path) -> str:
    edit_manifest(root / "cache", lambda m: m["shards"][1].update(file="/etc/passwd"))
    return "shards[1].file is the absolute path '/etc/passwd'"


def _deep_parent(root: Path) -> str:
    edit_manifest(root / "cache", lambda m: m["shards"][1].update(file="sub/../../../../../../../etc/passwd"))
    return "shards[1].file 'sub/../../../../../../../etc/passwd' resolves to /etc/passwd"


def _symlink_shard(root: Path) -> str:
    shard = root / "cache" / "shard-00001.safetensors"
    shard.unlink()
    shard.symlink_to(root / "outside" / "x.safetensors")
    return "shards[1].file 'shard-00001.safetensors' resolves through a symlink to"


def _symlink_dir(root: Path) -> str:
    (root / "cache" / "sub").symlink_to(root / "outside", target_is_directory=True)
    edit_manifest(root / "cache", lambda m: m["shards"][0].update(file="sub/x.safetensors"))
    return "shards[0].file 'sub/x.safetensors' resolves through a symlink to"


HOSTILE = {
    "parent": _parent,
    "absolute": _absolute,
    "etc_passwd": _etc_passwd,
    "deep_parent": _deep_parent,
    "symlink_shard": _symlink_shard,
    "symlink_dir": _symlink_dir,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_manifest_paths_out_of_the_cache_are_refused_everywhere(root, case, capsys, opened):
    cache = root / "cache"
    names = HOSTILE[case](root)
    before = snapshot(root)

    problems = verify_cache(cache)
    assert len(problems) == 1 and names in problems[0] and "not inside its cache directory" in problems[0]
    assert "restore it" in problems[0] and "re-extract" in problems[0]
    for open_it in (cache_info, CacheReader):
        with pytest.raises(CacheError, match="not inside its cache directory") as err:
            open_it(cache)
        assert names in err.value.problem and "re-extract" in err.value.fix
    for command in ("verify", "info"):
        code, err = run_cli(capsys, "cache", command, str(cache))
        assert code == 2, (command, err)
        assert squash(names) in err and "fix:" in err and "Traceback" not in err

    assert opened == []  # nothing at all was opened for shard data, inside or out
    assert snapshot(root) == before


def test_hostile_part_manifest_is_not_merged(root, capsys):
    parts = root / "parts"
    for i, ids in enumerate((IDS[:2], IDS[2:])):
        with CacheWriter(parts, meta(), shard_size=2, part=str(i)) as w:
            for sid in ids:
                w.add(sid, sample(sid))
    part1 = parts / "manifest.part-1.json"
    m = json.loads(part1.read_text())
    m["shards"][0]["file"] = "../outside/x.safetensors"
    part1.write_text(json.dumps(m))
    before = snapshot(root)
    with pytest.raises(CacheError, match=r"manifest\.part-1\.json names shard files not inside") as err:
        merge_parts(parts)
    assert "shards[0].file '../outside/x.safetensors'" in err.value.problem
    code, err_text = run_cli(capsys, "cache", "merge", str(parts))
    assert code == 2 and squash("shards[0].file '../outside/x.safetensors'") in err_text
    assert snapshot(root) == before and not (parts / MANIFEST).exists()


def test_symlinks_inside_the_cache_are_followed(root):
    """A shard that is a symlink to a file inside the cache directory is fine."""
    cache = root / "cache"
    (cache / "store").mkdir()
    shard = cache / "shard-00000.safetensors"
    shard.rename(cache / "store" / shard.name)
    shard.symlink_to(Path("store") / shard.name)
    assert verify_cache(cache) == []
    assert torch.equal(CacheReader(cache).get("s1")["keys_l0"], sample("s1")["keys_l0"])


# ------------------------------------------------------------------------------ damaged shard values
def flip_exponent_bit(shard: Path) -> None:
    """Flip the lowest exponent bit of the first value of the shard's first key tensor: the value doubles or
    halves, silently (no inf or NaN), and the file stays valid safetensors."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = min(k for k in header if k.endswith("/keys_l0"))
    byte, mask = {"BF16": (0, 0x80), "F16": (1, 0x04), "F32": (2, 0x80)}[
        header[name]["dtype"]
    ]  # little-endian
    data[8 + n + header[name]["data_offsets"][0] + byte] ^= mask
    shard.write_bytes(bytes(data))


def test_flipped_bit_in_every_shard_is_refused_on_first_use(root, capsys):
    cache = root / "cache"
    shards = sorted(cache.glob("shard-*.safetensors"))
    for shard in shards:
        flip_exponent_bit(shard)
    assert sum("fails its checksum" in p for p in verify_cache(cache)) == len(shards) == 2
    assert run_cli(capsys, "cache", "verify", str(cache))[0] == 1
    before = snapshot(root)

    reader = CacheReader(cache)  # opening reads only the manifest
    for sid, shard in (("s0", shards[0]), ("s3", shards[1])):
        for _ in range(2):  # refused again on a second try: a damaged shard never counts as checked
            with pytest.raises(CacheError, match=f"shard {shard.name} of .* fails its checksum") as err:
                reader.get(sid)
            assert f"kvdistill cache verify {cache}" in err.value.fix and "re-extract" in err.value.fix
    with pytest.raises(CacheError, match="fails its checksum"):
        reader.teacher_kv(["s1", "s2"])  # what a cached teacher calls in training
    assert snapshot(root) == before


def test_only_the_damaged_shard_is_refused(root):
    cache = root / "cache"
    flip_exponent_bit(cache / "shard-00001.safetensors")
    reader = CacheReader(cache)
    assert torch.equal(reader.get("s1")["keys_l0"], sample("s1")["keys_l0"])
    with pytest.raises(CacheError, match="shard shard-00001.safetensors of .* fails its checksum"):
        reader.get("s2")


def test_size_change_is_refused_before_hashing(root, monkeypatch):
    """safetensors itself refuses a file with bytes beyond its header's tensors; a size that differs from the
    manifest's is refused from one stat, before the file is hashed."""
    cache = root / "cache"
    size = (cache / "shard-00000.safetensors").stat().st_size
    edit_manifest(cache, _set("shards.0.bytes", size + 8))
    hashed = []
    monkeypatch.setattr(reader_mod, "sha256_file", lambda p: hashed.append(p) or "0" * 64)
    with pytest.raises(CacheError, match=rf"is {size} bytes, the manifest says {size + 8} \(truncated\)"):
        CacheReader(cache).get("s0")
    assert hashed == []


def test_clean_cache_hashes_each_shard_once_per_reader(root, monkeypatch):
    cache = root / "cache"
    hashed: list[str] = []
    real = reader_mod.sha256_file
    monkeypatch.setattr(
        reader_mod, "sha256_file", lambda p, **kw: hashed.append(Path(p).name) or real(p, **kw)
    )
    reader = CacheReader(cache)
    assert hashed == []  # lazy: nothing hashed before a shard is used
    for _ in range(3):
        for sid in IDS:
            got = reader.get(sid)
            for name, want in sample(sid).items():
                assert torch.equal(got[name], want.to(got[name].dtype)), (sid, name)
        reader.teacher_kv(IDS)
    assert sorted(hashed) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    reader.close()
    reader.get("s0")  # reopened after close: already checked by this reader
    assert len(hashed) == 2
    CacheReader(cache).get("s0")  # a new reader checks again
    assert hashed.count("shard-00000.safetensors") == 2


# --------------------------------------------------------------------------- manifests of the wrong structure
def _set(path: str, value):
    """A change to the manifest: set (or with value DROP, delete) the key at dotted `path`."""

    def change(m):
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is DROP:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


DROP = object()
WRONG_STRUCTURE = {
    "shards_is_a_number": (_set("shards", 5), "shards is 5 (a number), expected a list"),
    "samples_is_a_list": (_set("samples", []), "samples is [] (an array), expected an object"),
    "sample_entry_is_a_list": (
        _set("samples.s1", [0, 1]),
        "samples['s1'] is [0, 1] (an array), expected an object",
    ),
    "sample_lacks_index": (
        _set("samples.s2.index", DROP),
        "samples['s2'].index is null, expected an integer",
    ),
    "sample_shard_is_a_string": (
        _set("samples.s0.shard", "0"),
        "samples['s0'].shard is '0', expected an integer",
    ),
    "sample_shard_is_a_bool": (
        _set("samples.s0.shard", True),
        "samples['s0'].shard is true, expected an integer",
    ),
    "shard_entry_is_a_string": (
        _set("shards.0", "shard-00000.safetensors"),
        "shards[0] is 'shard-00000.safetensors'",
    ),
    "shard_lacks_file": (_set("shards.1.file", DROP), "shards[1].file is null, expected a file name"),
    "shard_lacks_sha256": (
        _set("shards.0.sha256", DROP),
        "shards[0].sha256 is null, expected 64 lowercase hex",
    ),
    "shard_bytes_negative": (_set("shards.0.bytes", -1), "shards[0].bytes is -1, expected an integer >= 0"),
    "shard_num_samples_string": (_set("shards.1.num_samples", "2"), "shards[1].num_samples is '2'"),
    "no_samples_key": (_set("samples", DROP), "missing key(s) ['samples']"),
    "no_teacher_key": (_set("teacher", DROP), "missing key(s) ['teacher']"),
    "teacher_is_a_string": (
        _set("teacher", "org/tiny"),
        "teacher is 'org/tiny' (a string), expected an object",
    ),
    "geometry_layers_string": (
        _set("teacher.geometry.num_layers", "1"),
        "teacher.geometry.num_layers is '1'",
    ),
    "compression_is_a_list": (_set("compression", ["full"]), 'compression is ["full"] (an array)'),
    "compression_layers_string": (_set("compression.layers", "0"), "compression.layers is '0'"),
    "compression_dtype_list": (_set("compression.dtype", ["bf16"]), 'compression.dtype is ["bf16"]'),
    "complete_is_a_string": (_set("complete", "yes"), "complete is 'yes', expected true or false"),
    "tokenizer_is_a_number": (_set("tokenizer", 3), "tokenizer is 3, expected a fingerprint string"),
}


def _write_raw(text: bytes | str):
    def write(cache: Path):
        p = cache / MANIFEST
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return write


def _manifest_is_a_dir(cache: Path):
    (cache / MANIFEST).unlink()
    (cache / MANIFEST).mkdir()


UNREADABLE_MANIFEST = {
    "top_level_list": (_write_raw("[1, 2]"), "the manifest is [1, 2] (an array), expected an object"),
    "top_level_null": (_write_raw("null"), "the manifest is null, expected an object"),
    "not_utf8": (_write_raw(b'{"a": "\xff\xfe"}'), "cannot be read (UnicodeDecodeError"),
    "deep_nesting": (_write_raw("[" * 200_000 + "]" * 200_000), "is not valid JSON"),
    "empty_file": (_write_raw(""), "is not valid JSON"),
    "manifest_is_a_dir": (_manifest_is_a_dir, "cannot be read (IsADirectoryError"),
}


def _check_refused(root: Path, capsys, expected: str) -> None:
    cache = root / "cache"
    before = snapshot(root)
    problems = verify_cache(cache)
    assert len(problems) == 1 and expected in problems[0], problems
    for open_it in (cache_info, CacheReader):
        with pytest.raises(CacheError) as err:
            open_it(cache)
        assert expected in err.value.problem and err.value.fix
    for command in ("verify", "info"):
        code, err_text = run_cli(capsys, "cache", command, str(cache))
        assert code == 2 and squash(expected) in err_text and "fix:" in err_text, (command, err_text)
    assert snapshot(root) == before


@pytest.mark.parametrize("case", list(WRONG_STRUCTURE))
def test_manifest_of_the_wrong_structure_is_a_clear_error(root, case, capsys):
    change, expected = WRONG_STRUCTURE[case]
    edit_manifest(root / "cache", change)
    _check_refused(root, capsys, expected)
    assert "has the wrong structure" in verify_cache(root / "cache")[0]


@pytest.mark.parametrize("case", list(UNREADABLE_MANIFEST))
def test_unreadable_manifest_is_a_clear_error(root, case, capsys):
    write, expected = UNREADABLE_MANIFEST[case]
    write(root / "cache")
    _check_refused(root, capsys, expected)


def test_every_structure_problem_is_listed_at_once(root):
    m = json.loads((root / "cache" / MANIFEST).read_text())
    m.update(shards=5, samples=[], teacher="x", complete="no")
    problems = structure_problems(m)
    assert len(problems) == 4
    with pytest.raises(CacheError, match=r"has the wrong structure \(4 problem\(s\)\)"):
        (root / "cache" / MANIFEST).write_text(json.dumps(m))
        CacheReader(root / "cache")


def test_sample_pointing_at_a_missing_slot(root, capsys):
    """Well formed, but inconsistent: verify lists it (exit 1), the reader refuses to open the cache."""
    cache = root / "cache"
    edit_manifest(cache, _set("samples.s3.shard", 7))
    assert "sample 's3' points at shard 7, the manifest lists 2 shards" in verify_cache(cache)
    with pytest.raises(CacheError, match="points samples at slots its shards do not hold: sample 's3'"):
        CacheReader(cache)
    assert run_cli(capsys, "cache", "verify", str(cache))[0] == 1


# ------------------------------------------------------------------------------ unreadable shards
def _garbage(shard: Path):
    shard.write_bytes(b"this is not a safetensors file")


def _truncated(shard: Path):
    shard.write_bytes(shard.read_bytes()[:40])


def _empty(shard: Path):
    shard.write_bytes(b"")


def _huge_header(shard: Path):
    shard.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")


def _directory(shard: Path):
    shard.unlink()
    shard.mkdir()


UNREADABLE_SHARD = {
    "garbage": _garbage,
    "truncated": _truncated,
    "empty": _empty,
    "huge_header": _huge_header,
    "directory": _directory,
}


@pytest.mark.parametrize("case", list(UNREADABLE_SHARD))
def test_unreadable_shard_is_a_clear_error(root, case, capsys):
    cache = root / "cache"
    UNREADABLE_SHARD[case](cache / "shard-00001.safetensors")
    before = snapshot(root)
    with pytest.raises(CacheError, match="shard shard-00001.safetensors of .* cannot be read") as err:
        cache_info(cache)
    assert f"kvdistill cache verify {cache}" in err.value.fix
    code, err_text = run_cli(capsys, "cache", "info", str(cache))
    assert code == 2 and "shard-00001.safetensors" in err_text and "cannotberead" in err_text
    problems = verify_cache(cache)
    assert problems and all("shard-00001" in p or "'s2'" in p or "'s3'" in p for p in problems), problems
    assert run_cli(capsys, "cache", "verify", str(cache))[0] == 1
    reader = CacheReader(cache)
    assert torch.equal(reader.get("s0")["keys_l0"], sample("s0")["keys_l0"])  # the other shard still reads
    with pytest.raises(CacheError, match="shard-00001.safetensors"):
        reader.get("s2")
    assert snapshot(root) == before


# ------------------------------------------------------------------------------ second round (issue 26)
def test_a_shard_changed_in_place_after_its_check_is_checked_again(root):
    """A shard changed in place after its one-time hash was read through mmap."""
    cache = root / "cache"
    reader = CacheReader(cache)
    assert torch.equal(reader.get("s0")["keys_l0"], sample("s0")["keys_l0"])  # hashed and opened
    shard = cache / "shard-00000.safetensors"
    flip_exponent_bit(shard)  # same size, written in place: a new mtime
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks: make the change visible
    before = snapshot(root)
    for sid in ("s0", "s1"):
        with pytest.raises(CacheError, match="shard shard-00000.safetensors of .* fails its checksum"):
            reader.get(sid)
    assert snapshot(root) == before


def test_a_cache_holding_non_finite_kv_fails_verify(root, capsys):
    """A cache holding inf passed `cache verify` (its hashes were written after the inf)."""
    cache = root / "cache"
    bad = dict(sample("s5"))
    bad["keys_l0"] = bad["keys_l0"].clone()
    bad["keys_l0"][0, 1, 2] = float("inf")
    bad["values_l0"] = bad["values_l0"].clone()
    bad["values_l0"][1, 0, 0] = float("nan")
    with CacheWriter(root / "inf", meta(), shard_size=2) as w:
        w.add("s4", sample("s4"))
        w.add("s5", bad)
    problems = verify_cache(root / "inf")
    assert problems == [
        "sample 's5' in shard shard-00000.safetensors: keys_l0 (1 non-finite), values_l0 "
        "(1 non-finite) hold NaN/inf K/V (re-extract the cache; training on them would diverge)"
    ]
    before = snapshot(root)
    code, err = run_cli(capsys, "cache", "verify", str(root / "inf"))
    assert code == 1 and squash("keys_l0 (1 non-finite)") in err
    assert snapshot(root) == before
    assert verify_cache(cache) == []  # the finite cache still passes


@pytest.mark.parametrize("kind", ["file", "dangling symlink", "under a file"])
def test_a_cache_directory_that_is_not_a_directory_is_a_clear_error(root, kind):
    """`extract --out` a file or a dangling symlink gave a traceback (FileExistsError, NotADirectoryError)."""
    (root / "f").write_text("mine\n")
    (root / "link").symlink_to(root / "nowhere")
    out = {"file": root / "f", "dangling symlink": root / "link", "under a file": root / "f" / "c"}[kind]
    before = snapshot(root)
    with pytest.raises(CacheError, match="is a file, not a directory|which does not exist") as err:
        CacheWriter(out, meta())
    assert "a directory path" in err.value.fix
    assert snapshot(root) == before
