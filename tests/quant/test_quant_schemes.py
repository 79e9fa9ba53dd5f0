"""QType, parse_qtype and bits_per_weight."""

from __future__ import annotations

import dataclasses

import pytest

from moe_local.quant import QType, bits_per_weight, parse_qtype


def test_qtype_name_and_defaults() -> None:
    qt = QType(4, 64)
    assert qt.method == "rtn"
    assert qt.name == "int4-g64"
    assert qt.full_name == "int4-g64"
    assert qt.qmax == 15
    assert QType(3, 128, "hqq").full_name == "int3-g128-hqq"
    assert str(QType(2, 16, "hqq")) == "int2-g16-hqq"


def test_qtype_is_frozen_and_hashable() -> None:
    qt = QType(8, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        qt.bits = 4  # type: ignore[misc]
    assert {qt, QType(8, 32)} == {qt}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("int4-g64", QType(4, 64)),
        ("int8-g128", QType(8, 128)),
        ("int3-g16", QType(3, 16)),
        ("int2-g32-hqq", QType(2, 32, "hqq")),
        ("  INT4-G64  ", QType(4, 64)),
    ],
)
def test_parse_qtype(text: str, expected: QType) -> None:
    assert parse_qtype(text) == expected


def test_parse_qtype_method_argument() -> None:
    assert parse_qtype("int4-g64", method="hqq") == QType(4, 64, "hqq")
    assert parse_qtype("int4-g64-hqq", method="hqq") == QType(4, 64, "hqq")
    with pytest.raises(ValueError, match="names method"):
        parse_qtype("int4-g64-rtn", method="hqq")


def test_name_roundtrip() -> None:
    for bits in (8, 4, 3, 2):
        for group in (16, 32, 64, 128):
            for method in ("rtn", "hqq"):
                qt = QType(bits, group, method)
                assert parse_qtype(qt.full_name) == qt


@pytest.mark.parametrize(
    ("bits", "group", "method", "match"),
    [
        (5, 64, "rtn", r"unsupported bits 5; valid: 8, 4, 3, 2"),
        (16, 64, "rtn", r"unsupported bits"),
        (4, 48, "rtn", r"unsupported group size 48; valid: 16, 32, 64, 128"),
        (4, 256, "rtn", r"unsupported group size"),
        (4, 64, "awq", r"unsupported method 'awq'; valid: rtn, hqq, gptq"),
    ],
)
def test_qtype_rejects_bad_values(bits: int, group: int, method: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QType(bits, group, method)


@pytest.mark.parametrize("text", ["int5-g64", "int4-g48", "q4_0", "int4", "int4-g64-awq", ""])
def test_parse_qtype_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_qtype(text)


def test_parse_qtype_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_qtype(4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("qt", "bpw"),
    [(QType(4, 64), 4.5), (QType(8, 128), 8.25), (QType(3, 16), 5.0), (QType(2, 32), 3.0)],
)
def test_bits_per_weight(qt: QType, bpw: float) -> None:
    assert bits_per_weight(qt) == pytest.approx(bpw)
