"""Bundle labels to coded segment properties: the built-in table, laterality, overrides."""

from __future__ import annotations

import pytest

from dicom_node.results.codes import ANATOMY, codes_for_label, read_overrides


@pytest.mark.parametrize(
    "label, type_code, modifier",
    [
        ("spleen", "78961009", None),
        ("kidney_left", "64033007", "7771000"),
        ("Kidney Right", "64033007", "24028007"),
        ("rib_right_4", "113197003", "24028007"),
        ("heart_atrium_left", "82471001", None),  # sided by name, not by modifier
        ("vertebrae_L5", "49668003", None),
        ("bone", "272673000", None),
    ],
)
def test_known_labels_get_codes_from_the_standard(label, type_code, modifier):
    codes = codes_for_label(label)
    assert codes.known and codes.label == label
    assert codes.property_type.value == type_code and codes.property_type.scheme_designator == "SCT"
    assert (codes.modifier.value if codes.modifier else None) == modifier


def test_an_unknown_label_gets_a_generic_valid_code_and_is_flagged():
    codes = codes_for_label("gluteus_maximus_left")
    assert not codes.known
    assert codes.category == ANATOMY and codes.property_type == ANATOMY
    assert codes.modifier.value == "7771000"  # the side is still read from the name


def test_overrides_replace_name_codes_and_colour(tmp_path):
    path = tmp_path / "segments.toml"
    path.write_text(
        '[gluteus_maximus_left]\nlabel = "Gluteus maximus, left"\n'
        'type = ["SCT", "181674001", "Gluteus maximus muscle"]\ncolor = [188, 95, 76]\n'
    )
    overrides = read_overrides(path)
    codes = codes_for_label("gluteus_maximus_left", overrides)
    assert codes.known and codes.label == "Gluteus maximus, left"
    assert codes.property_type.value == "181674001" and codes.color == (188, 95, 76)
    assert codes.modifier.value == "7771000"  # kept from the table's reading of the name


@pytest.mark.parametrize(
    "entry, message",
    [('colour = [1, 2, 3]', "unknown keys"), ('type = ["SCT", "1"]', "must be \\[scheme"), ("color = [1, 2]", "color")],
)
def test_malformed_overrides_name_the_file_and_label(tmp_path, entry, message):
    path = tmp_path / "segments.toml"
    path.write_text(f"[spleen]\n{entry}\n")
    with pytest.raises(ValueError, match=message):
        read_overrides(path)
