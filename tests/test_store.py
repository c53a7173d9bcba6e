"""Instance files: atomic writes, and UIDs that can never escape the data folder."""

from __future__ import annotations

import pytest

from dicom_node.store import IncomingFiles, instance_path, write_durably


def test_write_leaves_only_the_final_file(tmp_path):
    path = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    write_durably(path, b"DICM" * 10)
    assert path.read_bytes() == b"DICM" * 10
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/4", "", "1" * 65])
def test_a_uid_that_is_not_a_uid_is_refused(tmp_path, uid):
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        instance_path(tmp_path, uid, "1.2", "1.2.3")


def test_received_files_are_written_through_files_made_ahead(tmp_path):
    incoming = IncomingFiles(tmp_path / "incoming", batch=4)
    paths = [instance_path(tmp_path, "1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(6)]
    for number, path in enumerate(paths):
        incoming.write(path, b"DICM" * number)
    assert [path.read_bytes() for path in paths] == [b"DICM" * number for number in range(6)]
    assert len(list((tmp_path / "incoming").iterdir())) == 2  # two batches of four, six used
    incoming.write(paths[0], b"again")  # an instance sent again replaces its file
    assert paths[0].read_bytes() == b"again"
    incoming.close()
    assert list((tmp_path / "incoming").iterdir()) == []


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    incoming = IncomingFiles(tmp_path / "incoming", batch=2)
    blocked = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    blocked.mkdir(parents=True)  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        incoming.write(blocked, b"DICM")
    assert len(list((tmp_path / "incoming").iterdir())) == 1  # the other one made ahead, still empty
    incoming.close()
