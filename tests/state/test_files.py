"""Instance files: atomic writes, and UIDs that can never escape the data folder."""

from __future__ import annotations

import shutil
import time

import pytest

from dicom_node.state.files import IncomingFiles, instance_path, write_durably


def test_write_leaves_only_the_final_file(tmp_path):
    path = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    write_durably(path, b"DICM" * 10)
    assert path.read_bytes() == b"DICM" * 10
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/4", "", "1" * 65])
def test_a_uid_that_is_not_a_uid_is_refused(tmp_path, uid):
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        instance_path(tmp_path, uid, "1.2", "1.2.3")


def made_ahead(folder) -> list[int]:
    """Sizes of the files in the incoming folder."""
    return [path.stat().st_size for path in folder.iterdir()]


def test_received_files_are_written_through_files_made_ahead(tmp_path):
    incoming = IncomingFiles(tmp_path / "incoming", batch=4)
    paths = [instance_path(tmp_path, "1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(10)]
    for number, path in enumerate(paths):
        incoming.write(path, b"DICM" * number)
    assert [path.read_bytes() for path in paths] == [b"DICM" * number for number in range(10)]
    incoming.write(paths[0], b"again")  # an instance sent again replaces its file
    assert paths[0].read_bytes() == b"again"
    assert set(made_ahead(tmp_path / "incoming")) <= {0}
    incoming.close()
    assert made_ahead(tmp_path / "incoming") == []


def test_a_full_batch_is_kept_in_reserve(tmp_path):
    """Refilled as soon as fewer than a batch are left, not at half a batch, which ran dry
    with four associations while the folder's flush waited behind the instances' own."""
    incoming = IncomingFiles(tmp_path / "incoming", batch=4)
    incoming.write(instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.1"), b"DICM")
    deadline = time.monotonic() + 10
    while len(made_ahead(tmp_path / "incoming")) < 4 + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(made_ahead(tmp_path / "incoming")) == 4 + 3
    incoming.close()


def test_files_made_ahead_and_removed_behind_the_nodes_back_are_passed_over(tmp_path):
    incoming = IncomingFiles(tmp_path / "incoming", batch=4)
    for slot in (tmp_path / "incoming").iterdir():
        slot.unlink()
    path = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    incoming.write(path, b"DICM")
    assert path.read_bytes() == b"DICM"
    incoming.close()


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    incoming = IncomingFiles(tmp_path / "incoming", batch=2)
    blocked = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    blocked.mkdir(parents=True)  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        incoming.write(blocked, b"DICM")
    assert set(made_ahead(tmp_path / "incoming")) <= {0} and blocked.is_dir()
    incoming.close()


def test_writes_fail_while_no_file_can_be_made_and_work_again_after(tmp_path):
    folder = tmp_path / "incoming"
    incoming = IncomingFiles(folder, batch=2)
    path = instance_path(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    shutil.rmtree(folder)  # the files made ahead are gone, and no new one can be made
    for _ in range(4):
        with pytest.raises(OSError):
            incoming.write(path, b"DICM")
    folder.mkdir()
    incoming.write(path, b"DICM")
    assert path.read_bytes() == b"DICM"
    incoming.close()


def test_a_series_folder_removed_behind_the_nodes_back_is_made_again(tmp_path):
    incoming = IncomingFiles(tmp_path / "incoming", batch=4)
    first, second = (instance_path(tmp_path, "1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in (1, 2))
    incoming.write(first, b"DICM")
    shutil.rmtree(first.parent.parent)  # as retention removes a purged study's folders
    incoming.write(second, b"DICM")  # at once: the instance is not refused
    assert second.read_bytes() == b"DICM"
    incoming.close()
