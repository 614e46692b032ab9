"""Instrument profiles: the shipped ones load, a broken one is refused with file and field named."""

from __future__ import annotations

import pytest

from shared.profiles import ProfileError, available_instruments, load_profile


def test_shipped_profiles_load():
    assert available_instruments() == ["FORS2", "HAWKI", "VIMOS"]
    for name in available_instruments():
        profile = load_profile(name)
        assert profile.instrument == name
        assert profile.pipe_support == (name != "FORS2")
    assert load_profile("HAWKI").resolve_overlay().is_file()


def test_unknown_instrument_lists_the_known_ones():
    with pytest.raises(ProfileError, match=r"unknown instrument 'XSHOOTER'.*known: FORS2, HAWKI, VIMOS"):
        load_profile("XSHOOTER")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('instrument = "HAWKI"\npipe_support = maybe\n', "not valid TOML"),
        ('instrument = "HAWKI"\nrecipe_timeout_s = -5\n', "recipe_timeout_s: Input should be greater than 0"),
        ('instrument = "HAWKI"\nmax_parallel_abs = 0\n', "max_parallel_abs"),
        ('instrument = "hawki"\n', "instrument: String should match pattern"),
        ('instrument = "HAWKI"\nemail = true\n', "email: Extra inputs are not permitted"),
    ],
)
def test_broken_profile_is_refused_with_file_and_field(tmp_path, text, expected):
    (tmp_path / "hawki.toml").write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile("HAWKI", tmp_path)
    assert str(tmp_path / "hawki.toml") in str(err.value) and expected in str(err.value)
