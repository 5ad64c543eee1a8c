from pathlib import Path

import numpy as np
import pytest

from interclr_cli.errors import UserError
from interclr_cli.eval.subsets import stratified_subset, subset_from_list


def labels():
    return np.repeat(np.arange(5), [100, 40, 7, 1, 250])[np.random.default_rng(0).permutation(398)]


def test_stratified_counts_per_class():
    y = labels()
    idx = stratified_subset(y, 0.1, seed=0)
    assert np.all(np.diff(idx) > 0)
    counts = np.bincount(y[idx], minlength=5)
    assert counts.tolist() == [10, 4, 1, 1, 25]  # 0.7 -> 1, 0.1 -> at least 1
    assert stratified_subset(y, 1.0, seed=0).tolist() == list(range(len(y)))
    assert np.bincount(y[stratified_subset(y, 0.5, seed=0)]).tolist() == [50, 20, 4, 1, 125]  # 3.5 rounds up


def test_reproducible_and_seed_dependent():
    y = labels()
    a, b, c = (stratified_subset(y, 0.2, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(a) == len(c)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), "x"])
def test_bad_fraction(fraction):
    with pytest.raises(UserError, match=r"\(0, 1\]") as e:
        stratified_subset(labels(), fraction, seed=0)
    assert "\n" not in str(e.value)


def dataset():
    return [f"/data/imagenet/train/{wnid}/{wnid}_{i}.JPEG" for wnid in ("n01440764", "n01443537") for i in range(5)]


def test_subset_from_list_by_file_name_and_relative_path(tmp_path: Path):
    lst = tmp_path / "1percent.txt"
    lst.write_text("n01443537_3.JPEG\n\n# comment\nn01440764_0.JPEG\nn01440764/n01440764_4.JPEG 0\nn01440764_0.JPEG\n")
    assert subset_from_list(dataset(), lst).tolist() == [0, 4, 8]


def test_subset_from_list_missing_entries(tmp_path: Path):
    lst = tmp_path / "10percent.txt"
    lst.write_text("n01440764_0.JPEG\nn01440764_99.JPEG\nn09999999/n01443537_1.JPEG\n")
    with pytest.raises(UserError, match=r"2 of 3 entries .* first 'n01440764_99.JPEG'"):
        subset_from_list(dataset(), lst)
    with pytest.raises(UserError, match="cannot read"):
        subset_from_list(dataset(), tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="names no files"):
        subset_from_list(dataset(), empty)


def test_subset_from_list_ambiguous_name(tmp_path: Path):
    paths = ["train/a/x.jpg", "train/b/x.jpg"]
    lst = tmp_path / "l.txt"
    lst.write_text("x.jpg\n")
    with pytest.raises(UserError, match="matches 2 files"):
        subset_from_list(paths, lst)
    lst.write_text("b/x.jpg\n")
    assert subset_from_list(paths, lst).tolist() == [1]
