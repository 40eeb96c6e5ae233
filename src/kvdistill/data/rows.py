"""Reading the rows of a file or dataset source (`data.source` jsonl / csv / parquet / text / hf) through
`datasets`: data files into a throw-away cache (no network), a Hugging Face dataset in memory, saved with
`save_to_disk`, as a folder of data files or as a hub id (into the user's datasets cache). Bad input (no such
path, not UTF-8, empty, no such split) is refused with the key and the fix.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from kvdistill.config import DataConfig
from kvdistill.errors import KvdistillError

_BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
FILE_SUFFIXES = {"jsonl": (".jsonl", ".json"), "csv": (".csv",), "parquet": (".parquet",), "text": (".txt",)}
"""The file suffixes of each file source (any case): what a directory of that source holds, and how a
command's `--data FILE` names its format (`source_of_file`)."""


def source_of_file(path: str | Path) -> str | None:
    """The data source a file's suffix names (`FILE_SUFFIXES`), None for another suffix."""
    suffix = Path(path).suffix.lower()
    return next((source for source, suffixes in FILE_SUFFIXES.items() if suffix in suffixes), None)


def data_files(cfg: DataConfig) -> list[str]:
    path = Path(cfg.path)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(
            str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES[cfg.source]
        )
        if not files:
            raise KvdistillError(
                f"data.path '{cfg.path}' is a directory with no {cfg.source} files "
                f"({', '.join(FILE_SUFFIXES[cfg.source])})",
                "point data.path at a file, or set data.source to the files' format",
            )
        return files
    raise KvdistillError(
        f"data.path '{cfg.path}' does not exist",
        f"check the path (relative paths start from the current directory, {Path.cwd()})",
    )


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield datasets
    finally:
        if was_on:
            datasets.utils.logging.enable_progress_bar()


def read_rows(cfg: DataConfig, files: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, column names) of the files, read by `datasets` into a throw-away cache (no network)."""
    if all(not Path(f).read_bytes().strip() for f in files):
        raise empty_source(cfg)
    if cfg.source != "parquet":
        for f in files:
            _check_utf8(Path(f))
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="kvdistill-datasets-") as cache:
        try:
            ds = datasets.load_dataset(
                _BUILDERS[cfg.source], data_files=files, cache_dir=cache, split="train"
            )
        except Exception as err:  # any reader failure becomes one clear message
            if "corresponds to no data" in str(err):
                raise empty_source(cfg) from None
            cause = err.__cause__ or err.__context__ or err
            raise KvdistillError(
                f"could not read data.path '{cfg.path}' as {cfg.source}: {type(cause).__name__}: {cause}",
                "check data.source matches the file format (jsonl: one JSON object per line)",
            ) from err
        rows, columns = ds.to_list(), list(ds.column_names)
        del ds
    if not rows:
        raise empty_source(cfg)
    return rows, columns


def _check_utf8(path: Path) -> None:
    """Text data files must be UTF-8; the first bad byte is named with its line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise KvdistillError(
            f"data file '{path}' is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} (line "
            f"{line})",
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`) or drop that line",
        ) from None


def empty_source(cfg: DataConfig) -> KvdistillError:
    return KvdistillError(
        f"{source_label(cfg)} holds no records", "point data.path at a non-empty file or dataset"
    )


def dataset_split(dataset, cfg: DataConfig):
    """The `datasets.Dataset` to read: `dataset` itself, or its `data.split` when it is a DatasetDict
    (refused, listing the splits, when it has no such split); a split set for a plain Dataset is refused, not
    ignored."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        if cfg.split not in dataset:
            raise KvdistillError(
                f"data.split '{cfg.split}' is not a split of {source_label(cfg)} (splits: "
                f"{', '.join(dataset)})",
                f"set data.split to one of {', '.join(dataset)}",
            )
        dataset = dataset[cfg.split]
    elif "split" in cfg.model_fields_set:
        raise KvdistillError(
            f"data.split '{cfg.split}' is set, but {source_label(cfg)} holds a single split",
            "drop data.split",
        )
    if isinstance(dataset, datasets.IterableDataset):
        raise KvdistillError(
            f"{source_label(cfg)} is a streaming (iterable) dataset; training shuffles and splits every "
            "record",
            "load it without streaming=True (or pass ds.take(N) as a Dataset)",
        )
    if not isinstance(dataset, datasets.Dataset):
        raise KvdistillError(
            f"the dataset passed in is a {type(dataset).__name__}, not a datasets.Dataset",
            "pass a datasets.Dataset or DatasetDict (e.g. datasets.Dataset.from_list(rows))",
        )
    return dataset


def dataset_rows(cfg: DataConfig, dataset) -> tuple[list[dict[str, Any]], list[str], str]:
    """(rows, column names, name) of a Hugging Face dataset: in memory, a save_to_disk directory, a folder of
    data files, or a hub id (downloaded into the user's datasets cache)."""
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="kvdistill-datasets-") as cache:
        if dataset is None:
            if not cfg.path:
                raise KvdistillError(
                    "data.source 'hf' needs data.path (a hub id, a save_to_disk directory or a "
                    "folder of data files), or a dataset passed to train(..., dataset=)",
                    "set data.path",
                )
            dataset = _open_dataset(datasets, cfg, cache)
            name = Path(cfg.path).name if Path(cfg.path).exists() else cfg.path.replace("/", "_")
        else:
            name = "dataset"
        ds = dataset_split(dataset, cfg)
        rows, columns = ds.to_list(), list(ds.column_names)
    if not rows:
        raise empty_source(cfg)
    return rows, columns, name


def _open_dataset(datasets, cfg: DataConfig, cache: str):
    """`data.path` as a dataset: `load_from_disk` for a save_to_disk directory, else `load_dataset` (a folder
    of data files, read into the throw-away `cache`, or a hub id with data.subset / data.split, into the
    user's datasets cache)."""
    path = Path(cfg.path).expanduser()
    saved = path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )
    try:
        if saved:
            if cfg.subset is not None:
                raise KvdistillError(
                    f"data.subset is set, but '{cfg.path}' is a saved dataset (no configurations)",
                    "drop data.subset",
                )
            return datasets.load_from_disk(str(path))
        if path.is_file():
            raise KvdistillError(
                f"data.path '{cfg.path}' is a file, and data.source is hf",
                "set data.source to the file's format (jsonl, csv, parquet, text)",
            )
        if path.is_dir():
            return datasets.load_dataset(str(path), cfg.subset, split=cfg.split, cache_dir=cache)
        return datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
    except KvdistillError:
        raise
    except Exception as err:  # the hub, the network or a reader: one clear message
        cause = " ".join(str(err).split())[:300]
        where = "directory" if path.is_dir() else "hub dataset"
        raise KvdistillError(
            f"could not read the {where} '{cfg.path}' (data.split '{cfg.split}'"
            f"{f', data.subset {cfg.subset!r}' if cfg.subset else ''}): {type(err).__name__}: {cause}",
            "check data.path (a hub id such as 'openai/gsm8k', a directory written by save_to_disk, or a "
            "folder "
            "of data files), data.subset and data.split; offline, a hub dataset must already be in the "
            "datasets "
            "cache",
        ) from None


def source_label(cfg: DataConfig) -> str:
    return f"'{cfg.path}'" if cfg.path else "the dataset passed in"
