"""Instance files: atomic writes, and UIDs that can never escape the data folder."""

from __future__ import annotations

import pytest

from dicom_node.store import instance_path, write_durably


def test_write_leaves_only_the_final_file(tmp_path):
    path = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    write_durably(path, b"DICM" * 10)
    assert path.read_bytes() == b"DICM" * 10
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/4", "", "1" * 65])
def test_a_uid_that_is_not_a_uid_is_refused(tmp_path, uid):
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        instance_path(tmp_path, uid, "1.2", "1.2.3")
