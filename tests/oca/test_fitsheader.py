"""The fast header reader gives astropy's values and clear errors."""

from __future__ import annotations

import os

import pytest
from astropy.io import fits

from shared.fitsheader import FitsHeaderError, HeaderReader, read_keywords
from shared.oca import rule_header_keys

from .conftest import write_fits

ODD_CARDS = {
    "SIMPLE": True,
    "OBJECT": "it's a 'quoted' name",
    "ORIGFILE": "  leading kept, trailing dropped   ",
    "EMPTY": "",
    "BLANKS": "      ",
    "EXPTIME": 1.5e-10,
    "BIGNUM": -2.5e300,
    "NEGINT": -42,
    "FLAG": False,
    "INS.FILT1.NAME": "J",
    "DET.DIT": 10.0,
    "DET.NDIT": 6,
    "TEL.AIRM.START": 1.234567890123,
    "DPR.TECH": "IMAGE,PRE",
    "OCS.CON.QUAD": 3,
    "SEQ.SWITCH": True,
    "A.VERY.LONG.HIERARCH.KEYWORD.NAME": "long",
}


def _astropy_values(path, keys):
    header = fits.getheader(path)
    return {k: header[k] for k in keys if k in header}


def _same(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key] == theirs[key], key
        assert type(ours[key]) is type(theirs[key]), key


def _header_for_rules(rules, extra=0):
    cards = {"SIMPLE": True, "BITPIX": 8, "NAXIS": 0}
    for i, key in enumerate(rule_header_keys(rules)):
        dotted = key[4:].replace(" ", ".") if key.startswith("ESO ") else key
        cards[dotted] = [f"VALUE {i}", float(i) + 0.5, i, i % 2 == 0][i % 4]
    for i in range(extra):
        cards[f"QC.PAD{i}.VALUE"] = i * 1.5e-3
    return cards


def test_values_equal_astropy_for_odd_cards(tmp_path):
    path = write_fits(tmp_path / "odd.fits", ODD_CARDS)
    keys = [("ESO " + k.replace(".", " ")) if "." in k else k for k in ODD_CARDS] + ["NOPE"]
    ours = read_keywords(path, keys)
    _same(ours, _astropy_values(path, keys))
    assert ours["OBJECT"] == "it's a 'quoted' name"
    assert ours["ORIGFILE"] == "  leading kept, trailing dropped"
    assert ours["BLANKS"] == "" and ours["FLAG"] is False and "NOPE" not in ours
    # HIERARCH may be given explicitly
    assert read_keywords(path, ["HIERARCH ESO DPR TECH"]) == {"HIERARCH ESO DPR TECH": "IMAGE,PRE"}


@pytest.mark.parametrize("instrument", ["hawki", "vimos"])
def test_values_equal_astropy_for_every_rule_keyword(tmp_path, instrument, request):
    rules = request.getfixturevalue(f"{instrument}_rules")
    keys = rule_header_keys(rules)
    # 400 padding cards: the header spans more than the first read of 8 blocks
    path = write_fits(tmp_path / "rules.fits", _header_for_rules(rules, extra=400))
    assert os.path.getsize(path) > 2880 * 8
    ours = read_keywords(path, keys)
    theirs = _astropy_values(path, keys)
    assert len(theirs) == len(keys)
    _same(ours, theirs)


def test_d_exponent_and_undefined_value(tmp_path):
    path = tmp_path / "d.fits"
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8",
             "NAXIS   =                    0", "DVAL    =            1.5D+02 / a comment",
             "NOVAL   =", "HIERARCH ESO TPL EXPNO = 3 / exposure", "END"]
    text = "".join(c.ljust(80) for c in cards)
    path.write_bytes(text.ljust(2880).encode())
    keys = ["DVAL", "NOVAL", "ESO TPL EXPNO"]
    ours = read_keywords(path, keys)
    header = fits.getheader(path)
    assert ours["DVAL"] == header["DVAL"] == 150.0
    assert ours["ESO TPL EXPNO"] == header["ESO TPL EXPNO"] == 3
    assert ours["NOVAL"] is None  # astropy: Undefined


def _raw_fits(path, cards, pad=True):
    text = "".join(c.ljust(80) for c in cards)
    data = (text.ljust(2880) if pad else text).encode("latin-1")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_bytes(b"hello world" * 300), p)[1], "not a FITS file"),
        (lambda p: _raw_fits(p, ["SIMPLE  =                    T", "NAXIS   = 0"]),
         "truncated header: no END card"),
        (lambda p: _raw_fits(p, ["SIMPLE  =                    T", "END"], pad=False),
         "inside the header block that holds END"),
        (lambda p: _raw_fits(p, ["SIMPLE  =                    T", "OBJECT  = 'caf\xe9'", "END"]),
         "non-ASCII byte in card 2"),
        (lambda p: _raw_fits(p, ["SIMPLE  =                    T",
                                 "HIERARCH ESO DPR CATG = SCIENCE", "END"]),
         "malformed value of ESO DPR CATG"),
        (lambda p: _raw_fits(p, ["SIMPLE  =                    T",
                                 "HIERARCH ESO DPR CATG = 'SCIENCE", "END"]),
         "unterminated string"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, make, problem):
    path = make(tmp_path / "bad.fits")
    with pytest.raises(FitsHeaderError) as err:
        read_keywords(path, ["ESO DPR CATG"])
    assert str(err.value).startswith(f"{path}: ")
    assert problem in str(err.value)


def test_cache_by_path_size_and_mtime(tmp_path):
    path = write_fits(tmp_path / "c.fits", {"DPR.CATG": "SCIENCE"})
    reader = HeaderReader(["ESO DPR CATG"])
    assert reader.read(path) == {"ESO DPR CATG": "SCIENCE"}
    assert reader.read(path) == {"ESO DPR CATG": "SCIENCE"}
    assert reader.reads == 1
    write_fits(path, {"DPR.CATG": "CALIB"})
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert reader.read(path) == {"ESO DPR CATG": "CALIB"}
    assert reader.reads == 2
    good, bad = reader.read_many([path, tmp_path / "missing.fits"])
    assert list(good) == [path] and list(bad) == [tmp_path / "missing.fits"]
