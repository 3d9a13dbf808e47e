"""`sources.prepared_builder` when another process's first-use build of an offline dataset lands
while ours holds a builder opened before the data existed (multi-host jobs sharing a data dir)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest
import tensorflow_datasets as tfds

from cnnjax.data import sources


def _prepared_builder(builder, data_dir: str):
    return sources.prepared_builder(builder, "digits", data_dir, what="test: 'digits'",
                                    data_dir_label="data_dir", data_dir_setting="data.data_dir")


def _other_process_build(digits_dir: str, data_dir: str) -> Callable[[], None]:
    """Lands a finished `digits` build in `data_dir`, as another process's rename would."""
    return lambda: shutil.copytree(os.path.join(digits_dir, "digits"),
                                   os.path.join(data_dir, "digits"))


def _assert_reads_prepared_copy(builder, digits_dir: str) -> None:
    reference = tfds.builder("digits", data_dir=digits_dir).info.splits
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
        name: split.num_examples for name, split in reference.items()}
    assert len(list(builder.as_dataset(split="test"))) == reference["test"].num_examples


def test_data_landing_after_open_is_read(digits_dir, tmp_path):
    data_dir = str(tmp_path)
    builder = tfds.builder("digits", data_dir=data_dir)  # opened before the data exists
    _other_process_build(digits_dir, data_dir)()
    _assert_reads_prepared_copy(_prepared_builder(builder, data_dir), digits_dir)


def test_data_landing_before_tfds_reuses_it_is_read(digits_dir, tmp_path, monkeypatch):
    # Lands after our is_prepared() said no, just before tfds' own exists check, so
    # download_and_prepare logs "Reusing dataset" and leaves our builder's info empty.
    data_dir = str(tmp_path)
    builder = tfds.builder("digits", data_dir=data_dir)
    real_prepare = builder.download_and_prepare
    land = _other_process_build(digits_dir, data_dir)

    def other_process_first(*args, **kwargs):
        land()
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(builder, "download_and_prepare", other_process_first)
    _assert_reads_prepared_copy(_prepared_builder(builder, data_dir), digits_dir)


@pytest.mark.parametrize("prepared_at_open", [True, False])  # False: built here, first use
def test_prepared_copy_is_read_whoever_built_it(digits_dir, tmp_path, prepared_at_open):
    data_dir = str(tmp_path)
    if prepared_at_open:
        _other_process_build(digits_dir, data_dir)()
    builder = _prepared_builder(tfds.builder("digits", data_dir=data_dir), data_dir)
    _assert_reads_prepared_copy(builder, digits_dir)


@pytest.mark.parametrize("landed", [True, False])
def test_a_failed_rename_reads_the_other_build_or_raises(digits_dir, tmp_path, monkeypatch,
                                                         landed):
    """tfds' final rename fails with FileExistsError when another process's build landed
    first: its copy is read. With nothing prepared there, the error is ours and is re-raised,
    not hidden behind an empty builder."""
    data_dir = str(tmp_path)
    builder = tfds.builder("digits", data_dir=data_dir)
    land = _other_process_build(digits_dir, data_dir)

    def rename_fails(*args, **kwargs):
        if landed:
            land()
        raise FileExistsError("rename target exists")

    monkeypatch.setattr(builder, "download_and_prepare", rename_fails)
    if landed:
        _assert_reads_prepared_copy(_prepared_builder(builder, data_dir), digits_dir)
    else:
        with pytest.raises(FileExistsError, match="rename target exists"):
            _prepared_builder(builder, data_dir)
